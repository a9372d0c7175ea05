"""A first user's mistakes (the h44d trial) are said as one error of the project's type, naming the cause and the fix,
before any step is traced: a strategy by name, a subclass without super().__init__, a dataset not batched, a metric's
name misspelt in a step, text in a step's logs, a list of (x, y) pairs, other tools' keyword names; and the log says
what the user gave (model names, the default best metric without metrics). Tiny models, in this process."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import trainer as trainer_module
from conftest import blobs
from trainer import Trainer
from trainer.errors import UserError


def parts(**options):
    return {"model": lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
            "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "optimizer": lambda: keras.optimizers.SGD(0.05), "progress_bar": False, "tensorboard": False,
            "verbose": False, **options}


def test_a_strategy_is_taken_by_the_clis_names():
    one = Trainer(**parts(strategy="one_device"))
    assert isinstance(one.strategy, tf.distribute.OneDeviceStrategy)
    assert one.fit(blobs(), steps=2)["loss"] > 0
    assert Trainer(**parts(strategy={"name": "default"})).strategy is tf.distribute.get_strategy()


@pytest.mark.parametrize("strategy, said", [
    ("mirrord", "Trainer(strategy='mirrord'): did you mean 'mirrored'? It takes a tf.distribute.Strategy, a name"),
    ({"name": "mirrored", "logical_cpu": 2}, "'logical_cpu' is no field of StrategyConfig"),
    (5, "Trainer(strategy=5) (int): it takes a tf.distribute.Strategy"),
])
def test_a_strategy_it_cannot_make_names_what_it_takes(strategy, said):
    with pytest.raises(UserError) as raised:
        Trainer(**parts(strategy=strategy))
    assert said in str(raised.value) and '"logical_cpus": 2}' in str(raised.value), str(raised.value)


def test_a_strategy_dict_without_the_name_its_fields_need_names_it():
    """{"logical_cpus": 2} without a name was the default strategy: 1 replica, silently."""
    with pytest.raises(UserError) as raised:
        Trainer(**parts(strategy={"logical_cpus": 2}))
    assert str(raised.value) == (
        "Trainer(strategy={'logical_cpus': 2}): logical_cpus is a field of the mirrored or multi_worker strategy, and "
        "the default strategy (one device) would ignore it. Fix: Trainer(strategy={'name': 'mirrored', "
        "'logical_cpus': 2}).")


def test_the_strategys_fields_as_trainer_arguments_name_the_strategy_dict():
    with pytest.raises(UserError, match=r"Fix: logical_cpus is the strategy's: Trainer\(strategy=\{'name': "
                                        r"'mirrored', 'logical_cpus': 2\}\)"):
        Trainer(**parts(logical_cpus=2))


def test_a_subclass_that_forgets_super_init_is_told_at_construction():
    class Forgot(Trainer):
        def __init__(self, **kwargs):
            self.extra = keras.metrics.Mean(name="extra")

    with pytest.raises(UserError, match=r"Forgot.__init__ did not call Trainer.__init__.*Fix: call "
                                        r"super\(\).__init__\(...\) in your __init__"):
        Forgot(**parts())

    class Called(Trainer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.extra = 1

    class Deeper(Called):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    assert Deeper(**parts()).fit(blobs(), steps=2)["loss"] > 0


def test_a_subclass_of_one_that_forgets_super_init_names_the_classes_that_may_have():
    class Forgot(Trainer):
        def __init__(self, **kwargs):
            self.extra = 1

    class Inherits(Forgot):  # no __init__ of its own: Forgot's runs, as the outermost
        pass

    class Calls(Forgot):  # calls its parent's, which forgets: the parent is named too
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    for kind, said in [(Inherits, "Inherits's Forgot.__init__ did not call Trainer.__init__"),
                       (Calls, "Calls.__init__ or a parent's: Forgot did not call Trainer.__init__")]:
        with pytest.raises(UserError) as raised:
            kind(**parts())
        assert str(raised.value).startswith(said) and "Fix: call super().__init__(...)" in str(raised.value), \
            str(raised.value)


def test_a_dataset_not_batched_is_told_to_batch():
    with pytest.raises(UserError, match=r"single examples, not batches: its input has shape \(4,\) and the model "
                                        r"takes \(None, 4\).*Fix: batch the dataset, e.g. dataset.batch\(32"):
        Trainer(**parts()).fit(blobs().unbatch(), steps=2)


@pytest.mark.parametrize("input_shape, x_shape", [((1,), (1,)), ((None, 1), (8, 1))])
def test_shapes_keras_takes_are_not_called_unbatched(input_shape, x_shape):
    """Keras adds a missing trailing axis of 1: Input((1,)) takes a batch of one (1,), Input((None, 1)) a (B, 1)."""
    def model():
        inputs = keras.Input(input_shape)
        pooled = keras.layers.GlobalAveragePooling1D()(inputs) if len(input_shape) > 1 else inputs
        return keras.Model(inputs, keras.layers.Dense(2)(pooled))

    x, y = np.ones((64,) + x_shape[1:], np.float32), np.zeros(64, np.int32)
    batched = tf.data.Dataset.from_tensor_slices((x, y)).batch(x_shape[0]).repeat()
    assert Trainer(**parts(model=model)).fit(batched, steps=2)["loss"] > 0


class MisnamedMetric(Trainer):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = self.compute_loss(x, y, logits)
        self.update(loss, tape)
        self.metrics["acc"].update_state(y, logits)
        return {"loss": loss}


def test_a_metric_name_misspelt_in_a_step_names_the_metrics():
    trainer = MisnamedMetric(**parts(metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")]))
    with pytest.raises(UserError) as raised:
        trainer.fit(blobs(), steps=2)
    assert isinstance(raised.value, KeyError)
    said = str(raised.value)
    assert said.startswith("self.metrics['acc']: this Trainer has no metric named 'acc'; its metrics are "
                           "['accuracy'] (did you mean 'accuracy'?). Fix:"), said
    assert int(trainer.step.numpy()) == 0
    with pytest.raises(UserError, match=r"it has none. Fix: give the metric to the Trainer: Trainer\(metrics="):
        MisnamedMetric(**parts()).fit(blobs(), steps=2)


def test_a_mistake_found_while_a_step_is_traced_shows_no_frames_of_the_library_unless_keras_is_asked():
    """A UserError from inside a traced step came after ~35 frames of the Trainer, tf.function and autograph: it
    leaves fit() with the user's frames only, as Keras' fit filters its own; Keras' switch shows them all."""
    import traceback

    package = str(Path(trainer_module.__file__).parent)

    def frames_of(trainer):
        with pytest.raises(UserError) as raised:
            trainer.fit(blobs(), steps=2)
        return [f.filename for f in traceback.extract_tb(raised.value.__traceback__)]

    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    shown = frames_of(MisnamedMetric(**parts(metrics=metrics)))
    assert shown[0] == __file__ and [f for f in shown if f.startswith(package)] == [
        str(Path(package) / "user_traceback.py")], shown  # this test's call, then the re-raise: nothing between
    keras.config.disable_traceback_filtering()
    try:
        shown = frames_of(MisnamedMetric(**parts(metrics=metrics)))
    finally:
        keras.config.enable_traceback_filtering()
    assert len([f for f in shown if f.startswith(package)]) > 5 and any("tensorflow" in f for f in shown), shown


def test_text_in_a_steps_logs_names_the_key():
    class Texts(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self.model(x, training=True))
            self.update(loss, tape)
            return {"loss": loss, "temperature": 0.5, "note": "warm"}

    with pytest.raises(UserError, match=r"train_step returned 'note': a string value, which cannot be logged: a log "
                                        r"is a number .*Fix: return numbers only"):
        Texts(**parts()).fit(blobs(), steps=2)


def test_a_list_of_pairs_is_told_to_give_x_and_y_apart():
    x = np.zeros((64, 4), np.float32)
    pairs = list(zip(x.tolist(), [0, 1] * 32))
    with pytest.raises(UserError) as raised:
        Trainer(**parts()).fit(pairs, steps=2)
    said = str(raised.value)
    assert "x is a list of 64 tuples of 2, one per example ((x, y) pairs?)" in said and "Fix:" in said, said
    assert len(said) < 500, said


def test_arrays_of_different_sizes_list_a_few_of_them():
    x = tuple(np.zeros((8 + i % 2, 4), np.float32) for i in range(40))
    with pytest.raises(UserError) as raised:
        Trainer(**parts()).fit(x, np.zeros(8, np.int32), steps=2)
    said = str(raised.value)
    assert "x[5] 9, ... (41 arrays). Fix: give one row per example" in said and len(said) < 400, said


@pytest.mark.parametrize("name, meant", [("log_freq", "log_every"), ("eval_frequency", "eval_every"),
                                         ("val_check_interval", "eval_every"), ("num_steps", "max_steps"),
                                         ("save_steps", "checkpoint_every")])
def test_other_tools_keyword_names_name_ours(name, meant):
    with pytest.raises(UserError, match=rf"Fix: did you mean Trainer\({meant}=10\)\? \({name} is another tool's"):
        Trainer(**parts(**{name: 10}))


@pytest.mark.parametrize("name, fix", [
    ("num_steps", "Fix: did you mean fit(steps=20)? (num_steps is another tool's name for it)."),
    ("num_epochs", "Fix: did you mean fit(epochs=20)?"),
    ("log_every", "Fix: log_every is a Trainer setting: Trainer(log_every=20)."),
    ("log_freq", "Fix: log_freq is another tool's name for a Trainer setting: Trainer(log_every=20)."),
    ("step", "Fix: did you mean fit(steps=20)?"),
])
def test_fit_names_the_keyword_meant(name, fix):
    with pytest.raises(UserError) as raised:
        Trainer(**parts()).fit(blobs(), **{name: 20})
    assert isinstance(raised.value, TypeError) and fix in str(raised.value), str(raised.value)


def test_the_log_names_models_by_their_keys_and_says_how_to_turn_the_fused_kernels_off(caplog):
    class Two(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                logits = self.models["head"](self.models["encoder"](x))
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            self.update(loss, tape, "encoder")
            return {"loss": loss}

    models = {"encoder": lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
              "head": lambda: keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])}
    options = {k: v for k, v in parts().items() if k != "model"}
    with caplog.at_level("INFO", logger="trainer"):
        Two(**{**options, "models": models, "optimizer": lambda: keras.optimizers.Adam(1e-3), "frozen": ["head"],
               "verbose": True}).fit(blobs(), steps=1)
    assert "Model encoder: " in caplog.text and "Model head: " in caplog.text and "sequential" not in caplog.text
    assert ("Optimizer encoder: Adam with TensorFlow's fused update kernels (set trainer.fused_optimizer=false for "
            "Keras' ops)") in caplog.text, caplog.text


def test_without_metrics_the_best_checkpoints_are_ranked_by_the_loss(tmp_path, caplog):
    with caplog.at_level("INFO", logger="trainer"):
        Trainer(**parts(run_dir=tmp_path, eval_every=5, checkpoint_every=5, verbose=True)).fit(blobs(), blobs(64),
                                                                                              steps=10)
    assert ("The default trainer.best_metric='accuracy' is not among the eval results ['loss']: best checkpoints are "
            "ranked by the eval loss (Trainer(best_metric=<a metric>) names another).") in caplog.text
    assert "the smallest loss" in caplog.text and "largest accuracy" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("trainer")], caplog.text
    assert list((tmp_path / "checkpoints" / "best").glob("ckpt-*"))


def test_the_loss_ranking_is_said_once_per_trainer_and_names_the_eval_set(tmp_path, caplog):
    """Said at the first fit() that evaluates: a fit without eval data has no eval results to name."""
    trainer = Trainer(**parts(run_dir=tmp_path, eval_every=5, checkpoint_every=5, verbose=True))

    def said():
        return [r.getMessage() for r in caplog.records
                if "best checkpoints are ranked by the eval loss" in r.getMessage()]

    with caplog.at_level("INFO", logger="trainer"):
        trainer.fit(blobs(), steps=5)
        assert said() == []
        for steps in (10, 15):
            trainer.fit(blobs(), {"val": blobs(64), "ood": blobs(64)}, steps=steps)
    assert len(said()) == 1 and "ranked by the eval loss of the first eval set ('val/loss'; " in said()[0], said()
    assert "trainer.best_metric='loss'" not in caplog.text and "Trainer(best_metric='loss')" not in caplog.text


def test_an_accuracy_asked_for_without_metrics_is_an_error_not_the_loss(tmp_path):
    with pytest.raises(UserError, match=r"Trainer\(best_metric='accuracy'\) is not among the eval results \['loss'\]"):
        Trainer(**parts(run_dir=tmp_path, best_metric="accuracy", eval_every=5)).fit(blobs(), blobs(64), steps=5)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("ckpt-*"))


def test_a_resumed_run_that_ranked_by_the_default_accuracy_starts_ranking_by_the_loss(tmp_path, caplog):
    """A run saved while the default ranked by an accuracy it did not have (here: a test_step of its own; before,
    any run without metrics) recorded ("accuracy", "max") and the best value -3.4e38, which no loss beats."""
    class OwnResults(Trainer):
        def test_step(self, data):
            return {"score": tf.constant(0.5)}

    options = parts(run_dir=tmp_path, eval_every=5, checkpoint_every=5)
    OwnResults(**options).fit(blobs(), blobs(64), steps=5)
    assert not list((tmp_path / "checkpoints" / "best").glob("ckpt-*"))  # accuracy: no best kept
    with caplog.at_level("INFO", logger="trainer"):
        resumed = Trainer(**{**options, "verbose": True})
        resumed.fit(blobs(), blobs(64), steps=10)
    assert ("the checkpoint resumed (step 5) ranked them by the largest accuracy; this run ranks them by the smallest "
            "loss, so the ranking starts now") in caplog.text, caplog.text
    assert 0 < float(resumed.best.numpy()) < 10  # the eval loss, not -3.4e38
    assert list((tmp_path / "checkpoints" / "best").glob("ckpt-10*"))
