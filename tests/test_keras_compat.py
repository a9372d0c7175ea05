"""Keras habits taken as Keras takes them (trainer/keras_compat.py, arrays.py): a compiled model's compile()
settings, compile()'s string identifiers and metric functions, evaluate(x, y), batch_size checks. Tiny models
through the public API; Keras' own model.evaluate is the reference."""
from __future__ import annotations

import logging
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN
from trainer import Trainer
from trainer.errors import UserError

QUIET = dict(progress_bar=False, verbose=False, log_every=5)


def arrays(n=256, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n).astype("int32")
    x = rng.normal(size=(n, 4)).astype("float32") + 2.0 * y[:, None]
    return x, y


def model(outputs=3):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(outputs)])


def compiled(**compile_args):
    keras.utils.set_random_seed(0)  # built before the Trainer (which seeds): the same weights in every test order
    m = model()
    m.compile(**{"optimizer": keras.optimizers.Adam(5e-2),
                 "loss": keras.losses.SparseCategoricalCrossentropy(from_logits=True), **compile_args})
    return m


def test_a_compiled_model_trains_with_its_compile_settings_and_model_evaluate_agrees(caplog):
    x, y = arrays()
    xv, yv = arrays(96, seed=1)
    m = compiled(metrics=["accuracy"], weighted_metrics=["accuracy"])
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer = Trainer(model=m, **QUIET)
    assert "training with its compile() optimizer Adam, loss sparse_categorical_crossentropy, metrics [accuracy, " \
           "weighted_accuracy]" in caplog.text, caplog.text
    assert trainer.optimizer is m.optimizer
    logs = trainer.fit(x, y, epochs=4, validation_data=(xv, yv))
    assert {"loss", "accuracy", "weighted_accuracy"} <= set(logs) and logs["accuracy"] > 0.6
    # sample weights: compile(metrics=) unweighted, weighted_metrics= weighted, the loss weighted, as Keras computes
    w = np.where(yv == 1, 3.0, 0.5).astype("float32")
    ours = trainer.evaluate(xv, yv, sample_weight=w)
    keras_own = m.evaluate(xv, yv, sample_weight=w, return_dict=True, verbose=0)
    for name in ("loss", "accuracy", "weighted_accuracy"):
        assert ours[name] == pytest.approx(keras_own[name], rel=1e-5), (name, ours, keras_own)
    assert ours["accuracy"] != pytest.approx(ours["weighted_accuracy"])


def test_trainer_arguments_win_over_compile_and_a_warning_names_what_goes_unused(caplog):
    x, y = arrays()
    m = compiled(metrics=["accuracy"])
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer = Trainer(model=m, optimizer=lambda: keras.optimizers.SGD(0.1), **QUIET)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "compile() optimizer Adam are not used" in warnings[0], warnings
    assert "model.evaluate()" in warnings[0] and "Fix:" in warnings[0]
    assert "loss sparse_categorical_crossentropy, metrics [accuracy]" in caplog.text  # the rest is compile()'s
    assert isinstance(trainer.optimizer, keras.optimizers.SGD)
    assert "accuracy" in trainer.fit(x, y, steps=3)


def test_keras_strings_and_metric_functions_train_as_the_objects_they_name():
    x, y = arrays()

    def fit(**arguments):
        keras.utils.set_random_seed(0)
        trainer = Trainer(model=model, seed=0, **QUIET, **arguments)
        return trainer.fit(x, y, steps=6, validation_split=0.25)

    named = fit(loss="sparse_categorical_crossentropy", optimizer="adam",
                metrics=["accuracy", keras.metrics.sparse_categorical_accuracy, "SparseCategoricalCrossentropy"])
    objects = fit(loss=lambda y_true, p: keras.losses.sparse_categorical_crossentropy(y_true, p),
                  optimizer=lambda: keras.optimizers.Adam(), metrics=[
                      keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                      keras.metrics.SparseCategoricalAccuracy(name="sparse_categorical_accuracy"),
                      keras.metrics.SparseCategoricalCrossentropy(name="SparseCategoricalCrossentropy")])
    assert named == pytest.approx(objects, rel=1e-6)
    assert named["accuracy"] == named["sparse_categorical_accuracy"]


@pytest.mark.parametrize("outputs, labels, keras_metric", [
    (1, lambda y: (y > 0).astype("float32"), keras.metrics.BinaryAccuracy),
    (3, lambda y: y, keras.metrics.SparseCategoricalAccuracy),
    (3, lambda y: np.eye(3, dtype="float32")[y], keras.metrics.CategoricalAccuracy),
])
def test_accuracy_and_crossentropy_by_name_are_chosen_by_the_shapes_as_compile_does(outputs, labels, keras_metric):
    x, y = arrays()
    y = labels(y)
    trainer = Trainer(model=lambda: model(outputs), loss="crossentropy", optimizer="sgd", metrics=["acc"], **QUIET)
    trainer.fit(x, y, steps=2)
    predictions = trainer.predict(x)
    reference = keras_metric()
    reference.update_state(y, predictions)
    assert trainer.evaluate(x, y)["acc"] == pytest.approx(float(reference.result()), rel=1e-6)


def test_evaluate_takes_arrays_as_fit_does():
    x, y = arrays()
    xv, yv = arrays(100, seed=1)  # 100: a partial last batch, kept in evaluation
    trainer = Trainer(model=model, loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"],
                      **QUIET)
    trainer.fit(x, y, steps=4)
    dataset = trainer.evaluate(tf.data.Dataset.from_tensor_slices((xv, yv)).batch(32))
    assert trainer.evaluate((xv, yv)) == pytest.approx(dataset)
    assert trainer.evaluate(xv, yv, batch_size=7) == pytest.approx(dataset, rel=1e-5)
    assert trainer.evaluate(x=xv, y=yv) == pytest.approx(dataset)  # Keras' keywords
    w = (yv == 1).astype("float32")
    as_validation = trainer.evaluate((xv, yv, w))
    assert trainer.evaluate(xv, yv, sample_weight=w) == pytest.approx(as_validation)
    assert as_validation["accuracy"] == pytest.approx(float(np.mean(trainer.predict(xv)[yv == 1].argmax(-1) == 1)))
    assert trainer.evaluate({"a": (xv, yv), "b": (xv, yv, w)})["b/loss"] == pytest.approx(as_validation["loss"])


@pytest.mark.parametrize("make, said", [
    (lambda: Trainer(model=model, loss={"a": "mse", "b": "mse"}, optimizer="adam"), "a loss per output"),
    (lambda: Trainer(model=model, loss="sparse_categorial_crossentropy", optimizer="adam"),
     "did you mean 'sparse_categorical_crossentropy'?"),
    (lambda: Trainer(model=model, loss="mse", optimizer="adamm"), "did you mean 'adam'?"),
    (lambda: Trainer(model=model, loss="mse", optimizer="adam", metrics=["accurcy"]), "did you mean 'accuracy'?"),
    (lambda: Trainer(model=model, loss=3, optimizer="adam"), "is not a loss"),
    (lambda: Trainer(model=compiled(loss={"a": "mse"})), "the model's compile(loss=...): a loss per output"),
    (lambda: Trainer(model=compiled(metrics={"out": "accuracy"})), "compile(metrics=...) gives metrics per output"),
    (lambda: Trainer(model=compiled(loss_weights=[0.5])), "compile(loss_weights=[0.5]) is not taken over"),
])
def test_what_cannot_be_taken_is_refused_at_construction_with_the_fix(make, said):
    with pytest.raises(UserError) as raised:
        make()
    assert said in str(raised.value) and "Fix:" in str(raised.value), str(raised.value)


@pytest.mark.parametrize("call, said", [
    (lambda t, x, y, ds: t.fit(x, y, batch_size="32", steps=2), "batch_size='32' is not a whole number"),
    (lambda t, x, y, ds: t.fit(x, y, validation_batch_size=0, validation_split=0.2, steps=2),
     "validation_batch_size=0 is not a whole number"),
    (lambda t, x, y, ds: t.fit(ds, batch_size=64, steps=2), "the data is a tf.data.Dataset, which is batched already"),
    (lambda t, x, y, ds: t.evaluate(ds, batch_size=64), "the data is a tf.data.Dataset, which is batched already"),
    (lambda t, x, y, ds: t.evaluate(ds, y), "with labels y, x must be arrays"),
    (lambda t, x, y, ds: t.evaluate(x, sample_weight=y), "sample weights go with arrays x and y"),
    (lambda t, x, y, ds: t.evaluate(x, y[:10]), "evaluate(): the arrays have different numbers of examples"),
])
def test_batch_sizes_and_evaluate_arguments_are_checked_before_anything_runs(call, said):
    x, y = arrays()
    trainer = Trainer(model=model, loss="sparse_categorical_crossentropy", optimizer="adam", **QUIET)
    with pytest.raises(UserError, match="Fix:") as raised:
        call(trainer, x, y, tf.data.Dataset.from_tensor_slices((x, y)).batch(32))
    assert said in str(raised.value), str(raised.value)
    assert trainer.traces == {"train": 0, "eval": 0}



def test_evaluate_and_predict_take_keras_harmless_arguments_and_refuse_the_others_with_the_fix(capsys):
    x, y = arrays(100)
    trainer = Trainer(model=model, loss="sparse_categorical_crossentropy", optimizer="adam", metrics=["accuracy"],
                      progress_bar=True, verbose=True, log_every=5)
    trainer.fit(x, y, steps=2)
    plain = trainer.evaluate(x, y)
    assert "eval" in capsys.readouterr().err  # the bar, as the Trainer's config says
    assert trainer.evaluate(x, y, verbose=0, return_dict=True) == pytest.approx(plain)
    assert "eval" not in capsys.readouterr().err  # Keras' verbose=0: no bar
    trainer.evaluate(x, y, steps=2, verbose=2)
    assert trainer.eval_batches == 2
    predictions = trainer.predict(x, verbose=0)
    assert np.array_equal(trainer.predict(x, batch_size=10, steps=2, verbose=0), predictions[:20])
    for call, said in [
        (lambda: trainer.evaluate(x, y, return_dict=False), "evaluate(return_dict=False): Trainer.evaluate returns a "
                                                            "dict"),
        (lambda: trainer.evaluate(x, y, callbacks=[keras.callbacks.History()]), "Trainer.evaluate calls no callbacks"),
        (lambda: trainer.evaluate(x, y, batchsize=10), "Fix: did you mean evaluate(batch_size=10)?"),
        (lambda: trainer.predict(x, callbacks=[keras.callbacks.History()]), "Trainer.predict calls no callbacks"),
        (lambda: trainer.predict(x, step=2), "Fix: did you mean predict(steps=2)?"),
        (lambda: trainer.predict(x, steps=0), "predict(steps=0): steps is the number of batches"),
    ]:
        with pytest.raises(UserError, match="Fix:") as raised:
            call()
        assert said in str(raised.value), str(raised.value)


@pytest.mark.parametrize("call, said", [
    (lambda t, x, y: t.evaluate(x, y, steps=-1), "evaluate(steps=-1): steps is the number of batches to read, a whole "
                                                 "number >= 1 (None: all of them)"),  # it returned a dict with no loss
    (lambda t, x, y: t.evaluate(x, y, steps=2.5), "evaluate(steps=2.5): steps is the number"),  # a raw TypeError
    (lambda t, x, y: t.evaluate(x, y, steps=0), "evaluate(steps=0): steps is the number"),  # it read every batch
    (lambda t, x, y: t.evaluate(x, y, steps=True), "evaluate(steps=True): steps is the number"),
    (lambda t, x, y: t.predict(x, steps=-2), "predict(steps=-2): steps is the number"),
    (lambda t, x, y: t.evaluate(x, y, verbose=3), "evaluate(verbose=3): verbose is 0 (silent), 1 (a progress bar), 2 "
                                                  "or 'auto', as in Keras"),
    (lambda t, x, y: t.predict(x, verbose="silent"), "predict(verbose='silent'): verbose is 0"),
    (lambda t, x, y: t.evaluate(x, y, max_steps=3), "Fix: did you mean evaluate(steps=3)?"),  # it said Trainer(...)
    (lambda t, x, y: t.predict(x, max_steps=3), "Fix: did you mean predict(steps=3)?"),
    (lambda t, x, y: t.evaluate(x, y, validation_steps=3), "Fix: did you mean evaluate(steps=3)?"),
    (lambda t, x, y: t.predict(x, x=x), "predict() got the data twice: as an argument and as x=."),
    (lambda t, x, y: t.predict(), "predict() missing the data."),
])
def test_evaluate_and_predict_refuse_what_keras_refuses_too_with_the_fix(call, said):
    x, y = arrays(64)
    trainer = Trainer(model=model, loss="sparse_categorical_crossentropy", optimizer="adam", **QUIET)
    with pytest.raises(UserError, match="Fix:") as raised:
        call(trainer, x, y)
    assert said in str(raised.value), str(raised.value)
    assert "Trainer(max_steps" not in str(raised.value)


def test_a_set_shorter_than_steps_gives_its_batches_and_a_warning_naming_both_counts(caplog):
    x, y = arrays(64)
    trainer = Trainer(model=model, loss="sparse_categorical_crossentropy", optimizer="adam", verbose=False,
                      progress_bar=True)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        logs = trainer.evaluate(x, y, batch_size=16, steps=10, verbose=False)  # Keras' 0, as False is
        predicted = trainer.predict(x=x, batch_size=16, steps=10)  # Keras' keyword x=
    assert trainer.eval_batches == 4 and logs == pytest.approx(trainer.evaluate(x, y, batch_size=16))
    assert np.array_equal(predicted, trainer.predict(x))
    assert "evaluate(steps=10): the eval set has only 4 batches, so the results are of those 4" in caplog.text
    assert "predict(steps=10): the data has only 4 batches, so the outputs are of those 4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer.evaluate({"a": (x, y), "b": (x[:16], y[:16])}, batch_size=16, steps=2)
    assert "evaluate(steps=2): the eval set 'b' has only 1 batches" in caplog.text
    assert "'a'" not in caplog.text


def test_the_per_output_fixes_read_the_models_own_outputs_and_run():
    """A list's outputs were shown y['cls'], and the loss fix named keras.losses.mse, which Keras 3 lacks."""
    x, y = arrays()
    inputs = keras.Input((4,))
    listed = keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(1)(inputs)])
    trainer = Trainer(model=listed, loss=lambda y, p: tf.reduce_mean(p[1], -1), optimizer="adam", metrics=["accuracy"],
                      **QUIET)
    with pytest.raises(UserError) as raised:
        trainer.fit(x, [y, x[:, :1]], steps=1)
    assert ("metrics={'output_0_accuracy': lambda y, p: keras.metrics.sparse_categorical_accuracy(y[0], p[0])}"
            in str(raised.value)), str(raised.value)
    assert "y['cls']" not in str(raised.value)
    with pytest.raises(UserError) as raised:
        Trainer(model=two_outputs, loss={"cls": "sparse_categorical_crossentropy", "reg": "mse"}, optimizer="adam")
    fix = str(raised.value).split("e.g. loss=")[1].split("; or")[0]
    assert fix == ("lambda y, p: keras.losses.mean_squared_error(y['cls'], p['cls']) + "
                   "keras.losses.mean_squared_error(y['reg'], p['reg'])"), fix
    outputs = {"cls": tf.ones((2, 1)), "reg": tf.zeros((2, 1))}
    assert eval(fix, {"keras": keras})(outputs, outputs).shape == (2,)  # the fix as written runs


def two_outputs():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, {"cls": keras.layers.Dense(3)(hidden), "reg": keras.layers.Dense(1)(hidden)})


def joint_loss(y, p):
    return (keras.losses.sparse_categorical_crossentropy(y["cls"], p["cls"], from_logits=True)
            + keras.losses.mean_squared_error(y["reg"], p["reg"]))


def test_metrics_per_output_are_refused_naming_the_fix_and_the_fix_trains():
    x, y = arrays()
    labels = {"cls": y, "reg": x[:, :1]}
    make = lambda **given: Trainer(model=two_outputs, loss=joint_loss, optimizer="adam", **QUIET, **given)  # noqa
    per_output = "metrics per output"
    with pytest.raises(UserError, match="Fix: a metric function of the label and output dicts") as raised:
        make(metrics={"cls": ["accuracy"], "reg": ["mae"]})  # Keras' compile() form: said before anything is built
    assert "the entry 'cls': ['accuracy'] reads as " + per_output in str(raised.value), str(raised.value)
    trainer = make(metrics=["accuracy", keras.metrics.MeanAbsoluteError()])
    with pytest.raises(UserError, match="Fix: a metric function of the label and output dicts") as raised:
        trainer.fit(x, labels, steps=2)  # it failed inside the traced step: 'dict' object has no attribute 'shape'
    assert ("the model's outputs are a dict ['cls', 'reg'], and the metrics ['accuracy', 'mean_absolute_error'] "
            f"compare one output with its labels: {per_output} are not supported") in str(raised.value)
    assert trainer.traces == {"train": 0, "eval": 0}

    class OwnTrainStep(Trainer):  # the default test_step still gives 'accuracy' the dicts: said at its trace
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(joint_loss(y, self.model(x, training=True)))
            self.update(loss, tape)

    own = OwnTrainStep(model=two_outputs, loss=joint_loss, optimizer="adam", metrics=["accuracy"], **QUIET)
    with pytest.raises(UserError, match="The metric 'accuracy' compares one output with its labels, but the outputs "
                                        "are a dict"):
        own.fit(x, labels, steps=2, validation_data=(x, labels))
    fixed = make(metrics={"cls_accuracy": lambda y, p: keras.metrics.sparse_categorical_accuracy(y["cls"], p["cls"])})
    logs = fixed.fit(x, labels, steps=40, validation_data=(x, labels))
    predicted = fixed.predict(x)["cls"].argmax(-1)
    assert logs["cls_accuracy"] == pytest.approx(float(np.mean(predicted == y)), abs=1e-6)

def test_a_run_with_the_compiled_optimizer_resumes_as_a_straight_run_and_warm_starts_weights_only(tmp_path):
    x, y = arrays(512)
    run = dict(**QUIET, seed=1, checkpoint_every=5)
    straight = Trainer(model=compiled(), **run)
    straight.fit(x, y, steps=10, batch_size=32)
    Trainer(model=compiled(), run_dir=tmp_path / "run", **run).fit(x, y, steps=5, batch_size=32)
    resumed = Trainer(model=compiled(), run_dir=tmp_path / "run", **run)  # model.optimizer is the `optimizer` root
    resumed.fit(x, y, steps=10, batch_size=32)
    assert resumed.weights_fingerprint() == straight.weights_fingerprint()
    assert int(resumed.optimizer.iterations.numpy()) == 10
    warm = compiled()
    Trainer(model=warm, init_from=tmp_path / "run", **QUIET).fit(x, y, steps=2, batch_size=32)
    assert int(warm.optimizer.iterations.numpy()) == 2  # the weights only, not the run's optimizer state


def test_a_model_made_for_mixed_float16_trains_with_loss_scaling_or_is_refused(caplog):
    x, y = arrays()
    keras.mixed_precision.set_dtype_policy("mixed_float16")  # as Keras' guide: the policy, then build and compile
    m = compiled()
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
    with pytest.raises(UserError, match=r'Fix: Trainer\(precision="mixed_float16"\)') as raised:
        Trainer(model=m, precision="float32", **QUIET)
    assert "LossScaleOptimizer" in str(raised.value) and "without loss scaling" in str(raised.value)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer = Trainer(model=m, **QUIET)  # no precision given: the model's
    assert trainer.precision.policy == "mixed_float16" and "Training in precision mixed_float16" in caplog.text
    trainer.fit(x, y, steps=3)
    assert trainer.updaters["model"].loss_scale.mode == "dynamic"
    assert trainer.optimizer is m.optimizer.inner_optimizer
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    uncompiled = model()  # float16 layers alone say it too
    keras.mixed_precision.set_dtype_policy("float32")
    with pytest.raises(UserError, match="its layers compute in float16"):
        Trainer(model=uncompiled, loss="sparse_categorical_crossentropy", optimizer="adam",
                precision="mixed_bfloat16", **QUIET)


COMPILED_UNDER_TWO_REPLICAS = """
import keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
from trainer.errors import UserError
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 256).astype("int32"); x = rng.normal(size=(256, 4)).astype("float32")
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
def compile_(m):
    m.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
with strategy.scope():
    outside = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
compile_(outside)
try:
    Trainer(model=outside, strategy=strategy, progress_bar=False)
except UserError as e:
    print("REFUSED", type(e).__name__, e)
with strategy.scope():
    inside = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    compile_(inside)
t = Trainer(model=inside, strategy=strategy, progress_bar=False)
t.fit(x, y, steps=4, batch_size=32)
print("ITERATIONS", int(inside.optimizer.iterations.numpy()), int(t.step.numpy()))
"""


@pytest.mark.slow  # a process with 2 logical CPUs
def test_a_compiled_optimizer_made_outside_the_strategy_scope_is_refused_with_compile_in_the_fix(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(COMPILED_UNDER_TWO_REPLICAS + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED StrategyError" in result.stdout and "call model.compile() under strategy.scope()" in result.stdout
    assert "ITERATIONS 4 4" in result.stdout  # compiled under the scope: one count per update
