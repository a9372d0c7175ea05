"""The loss, the labels, the model and class_weight checked together before the first step (trainer/loss_fit.py),
and the command line's loss and metrics overrides checked before anything is built (trainer/loss_overrides.py):
each mistake a Keras user makes is one line naming the fix, not a silent no-op, a 100-line traceback or
Hydra's "Cannot instantiate config of type str"."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from conftest import TINY, run_cli


def _arrays(n=64, classes=3, one_hot=False):
    rng = np.random.default_rng(0)
    y = rng.integers(0, classes, n).astype("int32")
    x = rng.normal(size=(n, 4)).astype("float32") + y[:, None]
    return x, (np.eye(classes, dtype="float32")[y] if one_hot else y)


def _trainer(loss, last_activation=None, classes=3, **options):
    import keras

    from trainer import Trainer

    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)),
                                                   keras.layers.Dense(classes, activation=last_activation)]),
                   loss=loss, optimizer=lambda: keras.optimizers.SGD(0.05), progress_bar=False, tensorboard=False,
                   verbose=False, **options)


def test_a_categorical_loss_given_class_ids_is_refused_naming_the_sparse_loss():
    import keras

    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _trainer(keras.losses.CategoricalCrossentropy(from_logits=True)).fit(*_arrays(), steps=2)
    message = str(caught.value)
    assert "these labels are class ids (shape (batch,))" in message
    assert "Fix: Trainer(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))" in message


def test_a_sparse_loss_given_one_hot_rows_is_refused_naming_the_categorical_loss():
    import keras

    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"one-hot rows of the model's 3 outputs \(shape \(batch, 3\)\)\. Fix: "
                                          r"Trainer\(loss=keras\.losses\.CategoricalCrossentropy"):
        _trainer(keras.losses.SparseCategoricalCrossentropy(from_logits=True)).fit(*_arrays(one_hot=True), steps=2)


def test_matching_labels_train(caplog):
    import keras

    caplog.set_level(logging.WARNING)
    _trainer(keras.losses.CategoricalCrossentropy(from_logits=True)).fit(*_arrays(one_hot=True), steps=2)
    _trainer(keras.losses.SparseCategoricalCrossentropy(), last_activation="softmax").fit(*_arrays(), steps=2)
    assert "from_logits" not in caplog.text


@pytest.mark.parametrize("from_logits, activation, says", [
    (False, None, "linear (it outputs logits), and SparseCategoricalCrossentropy(from_logits=False) makes"),
    (True, "softmax", "last layer ends in a softmax (it outputs probabilities)"),
])
def test_from_logits_against_the_last_layer_is_warned_once(from_logits, activation, says, caplog):
    import keras

    caplog.set_level(logging.WARNING)
    trainer = _trainer(keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), activation)
    trainer.fit(*_arrays(), steps=2)
    trainer.fit(*_arrays(), steps=4)
    assert caplog.text.count(says) == 1, caplog.text
    assert f"Fix: SparseCategoricalCrossentropy(from_logits={not from_logits})" in caplog.text


@pytest.mark.parametrize("compiled", [False, True])
def test_a_loss_named_as_in_compile_on_a_logits_model_is_warned(compiled, caplog):
    """loss="sparse_categorical_crossentropy" (Keras' name, from_logits=False by default) on a linear last layer
    trained to a far worse model without a word, where the loss object was warned about: the Trainer's argument and
    compile()'s alike."""
    import keras

    from trainer import Trainer

    caplog.set_level(logging.WARNING)
    if compiled:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
        trainer = Trainer(model=model, progress_bar=False, verbose=False)
    else:
        trainer = _trainer("sparse_categorical_crossentropy")
    trainer.fit(*_arrays(), steps=2)
    assert ("the loss 'sparse_categorical_crossentropy' (from_logits=False, its default) makes the loss read them as "
            "probabilities") in caplog.text, caplog.text
    assert "Fix: loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)" in caplog.text


def test_class_weight_for_classes_the_model_lacks_is_refused():
    import keras

    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        _trainer(keras.losses.SparseCategoricalCrossentropy(from_logits=True)).fit(*_arrays(), steps=2,
                                                                                   class_weight={0: 1.0, 7: 3.0})
    assert str(caught.value).startswith("fit(class_weight=...) names classes [7] that the model does not have: it "
                                        "has 3 classes (0..2)")


def test_the_keras_names_of_the_shorthand_table_are_keras_classes():
    import keras

    from trainer.loss_overrides import LOSS_CLASSES, METRIC_CLASSES

    assert [n for n in LOSS_CLASSES if not isinstance(getattr(keras.losses, n, None), type)] == []
    assert [n for n in METRIC_CLASSES if not isinstance(getattr(keras.metrics, n, None), type)] == []


@pytest.mark.parametrize("override, says", [
    ("loss=categorical_crossentropy", "not Keras' string shorthand. Fix: "
                                      "loss._target_=keras.losses.CategoricalCrossentropy (the recipe's"),
    ("loss=mse", "Fix: loss._target_=keras.losses.MeanSquaredError ~loss.from_logits (MeanSquaredError takes no "
                 "from_logits"),
    ("metrics=[accuracy,auc]", "not Keras' list of names. Fix: "
                               "'++metrics.accuracy._target_=keras.metrics.SparseCategoricalAccuracy' "
                               "'++metrics.auc._target_=keras.metrics.AUC'"),
    ("model.hidden_units=16", "model.hidden_units=16: model.hidden_units takes a list, not '16'. "
                              "Fix: model.hidden_units=[16]"),
])
def test_keras_shorthand_on_the_command_line_exits_2_with_the_override_that_works(override, says, tmp_path):
    result = run_cli("recipe=mnist", override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_the_fixes_the_shorthand_messages_give_compose(tmp_path):
    result = run_cli("recipe=mnist", "'++metrics.auc._target_=keras.metrics.AUC'".strip("'"),
                     "loss._target_=keras.losses.CategoricalCrossentropy", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "_target_: keras.metrics.AUC" in result.stdout and "keras.losses.CategoricalCrossentropy" in result.stdout


@pytest.mark.parametrize("override, says", [
    ("loss._target_=keras.losses.SparseCategoricalCrossEntropy",
     "keras.losses has no 'SparseCategoricalCrossEntropy' (did you mean keras.losses.SparseCategoricalCrossentropy?). "
     "Fix: loss._target_=keras.losses.SparseCategoricalCrossentropy."),
    ("+metrics.auc._target_=keras.metrics.AUCC", "(did you mean keras.metrics.AUC?)"),
    ("loss._target_=keras.losses.MeanSquaredError", "MeanSquaredError takes no argument 'from_logits'"),
    ("loss._target_=keras.losses.MeanSquaredError ~loss.from_logits",  # the fix above, on 10 outputs: a graph error
     "loss MeanSquaredError compares labels with the model's outputs element by element, and these labels hold one "
     "value per example (shape (batch,)) for 10 outputs"),
    ("loss._target_=keras.losses.CategoricalCrossentropy",  # on fashion_mnist's class ids
     "Fix: loss._target_=keras.losses.SparseCategoricalCrossentropy for class ids"),
])
def test_a_wrong_loss_or_metric_class_exits_2_and_leaves_no_run_folder(override, says, tmp_path):
    result = run_cli("recipe=mnist", *TINY, "model.hidden_units=[8]", *override.split(),
                     f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr  # the run's log lines: stdout in this process, stderr in another
    assert result.returncode == 2, out[-3000:]
    assert says in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_class_weight_beyond_the_classes_exits_2_on_the_command_line(tmp_path):
    result = run_cli("recipe=mnist", *TINY, "model.hidden_units=[8]", "data.class_weight={0:1.0,12:3.0}",
                     f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    assert "data.class_weight names classes [12] that the model does not have: it has 10 classes" in out
    assert not (tmp_path / "run").exists()


def test_from_logits_false_on_the_recipes_logits_is_warned_with_the_override(tmp_path):
    result = run_cli("recipe=mnist", *TINY, "trainer.max_steps=2", "model.hidden_units=[8]",
                     "loss.from_logits=false", f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "loss.from_logits=false makes the loss read them as probabilities" in out
    assert "Fix: loss.from_logits=true" in out


def test_a_compute_loss_override_that_turns_the_labels_is_not_refused(caplog):
    """A compute_loss override (docs/research.md) that one-hots class ids for CategoricalCrossentropy: the loss
    meets the labels only after the override, so the label and from_logits checks stay out of its way."""
    import keras
    import tensorflow as tf

    from trainer import Trainer

    class Smooth(Trainer):
        def compute_loss(self, x, y, y_pred, sample_weight=None):
            return super().compute_loss(x, tf.one_hot(y, 3), y_pred, sample_weight)

    caplog.set_level(logging.WARNING)
    trainer = Smooth(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                     loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1),
                     optimizer=lambda: keras.optimizers.SGD(0.05), progress_bar=False, tensorboard=False,
                     verbose=False)
    trainer.fit(*_arrays(), steps=2)
    assert int(trainer.step) == 2
    assert "CategoricalCrossentropy takes one-hot labels" not in caplog.text


def test_a_loss_module_failing_on_its_own_import_names_that_error(tmp_path):
    """loss._target_ naming a module of the user's that is there but imports a package that is not: the error is
    that import's (it said "no module 'userloss' can be imported"), exit 2, no traceback."""
    (tmp_path / "userloss.py").write_text("import not_installed_dependency_xyz\n\nclass MyLoss:\n    pass\n")
    result = run_cli("recipe=mnist", *TINY, "loss._target_=userloss.MyLoss", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    out = result.stdout + result.stderr
    said = "importing 'userloss' failed: ModuleNotFoundError: No module named 'not_installed_dependency_xyz'"
    assert said in out, out
    assert "Traceback" not in out and not (tmp_path / "run").exists()
    absent = run_cli("recipe=mnist", *TINY, "loss._target_=nosuchloss.MyLoss", cwd=tmp_path)
    assert absent.returncode == 2 and "no module 'nosuchloss' can be imported" in absent.stdout + absent.stderr


def test_a_dense_subclass_with_its_own_softmax_is_not_taken_for_logits(caplog):
    """A Dense subclass whose call() applies a softmax over its linear `activation`: its output is probabilities,
    so from_logits=False is right and no warning says the last layer outputs logits."""
    import keras

    from trainer import Trainer

    class SoftmaxDense(keras.layers.Dense):
        def call(self, inputs):
            return keras.ops.softmax(super().call(inputs))

    caplog.set_level(logging.WARNING)
    Trainer(model=lambda: keras.Sequential([keras.Input((4,)), SoftmaxDense(3)]),
            loss=keras.losses.SparseCategoricalCrossentropy(), optimizer=lambda: keras.optimizers.SGD(0.05),
            progress_bar=False, tensorboard=False, verbose=False).fit(*_arrays(), steps=2)
    assert "from_logits" not in caplog.text, caplog.text
