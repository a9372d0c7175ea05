"""fit() with NumPy arrays, as Keras' fit(x, y, ...): validation split/data, class and sample weights, resume."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN, read_metrics
from trainer import EarlyStopping, Trainer
from trainer.errors import UserError


def blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 4)) + y[:, None], y  # float64 and int64, as NumPy makes them


def make(**kwargs):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                   keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
                   progress_bar=False, log_every=5, **{"optimizer": lambda: keras.optimizers.Adam(1e-2), **kwargs})


def test_validation_split_holds_out_the_last_fraction_before_shuffling():
    """400 examples, validation_split=0.2: 320 train (10 steps of 32 an epoch), the last 80 evaluated, as Keras."""
    x, y = blobs()
    trainer = make()
    logs = trainer.fit(x, y, batch_size=32, epochs=2, validation_split=0.2)
    assert logs["step"] == 20 and trainer.steps_per_epoch == 10
    held = tf.data.Dataset.from_tensor_slices((x[320:].astype("float32"), y[320:])).batch(32)
    again = trainer.evaluate(held)
    assert (again["loss"] == pytest.approx(logs["loss"], rel=1e-5)
            and again["accuracy"] == pytest.approx(logs["accuracy"]))
    assert trainer.eval_batches == 3  # 80 examples, the partial last batch kept


def test_validation_data_with_sample_weights_and_no_eval_set_without_it():
    x, y = blobs()
    xv, yv = blobs(64, seed=1)
    trainer = make()
    weighted = trainer.fit(x, y, batch_size=32, steps=5, validation_data=(xv, yv, np.where(yv == 1, 2.0, 0.0)))
    plain = trainer.evaluate(tf.data.Dataset.from_tensor_slices((xv.astype("float32"), yv)).batch(32))
    per_example = keras.losses.sparse_categorical_crossentropy(yv, trainer.model(xv.astype("float32")),
                                                               from_logits=True).numpy()
    assert weighted["loss"] == pytest.approx(float(np.mean(per_example * np.where(yv == 1, 2.0, 0.0))), rel=1e-4)
    assert plain["loss"] == pytest.approx(float(np.mean(per_example)), rel=1e-4)
    assert make().fit(x, y, steps=3)["split"] == "train"  # no validation: the last train logs


def test_an_interrupted_run_resumes_on_the_same_batches(tmp_path):
    """12 steps straight == 7 steps, then a new Trainer resuming from the checkpoint to 12 (epochs of 10 steps:
    the resume crosses a reshuffle)."""
    x, y = blobs()
    straight = make(run_dir=tmp_path / "straight", seed=3)
    straight.fit(x, y, batch_size=32, steps=12, validation_split=0.2)
    make(run_dir=tmp_path / "resumed", seed=3, checkpoint_every=7).fit(x, y, batch_size=32, steps=7,
                                                                       validation_split=0.2)
    resumed = make(run_dir=tmp_path / "resumed", seed=3)
    resumed.fit(x, y, batch_size=32, steps=12, validation_split=0.2)
    assert resumed.weights_fingerprint() == straight.weights_fingerprint()
    other = make(seed=4)
    other.fit(x, y, batch_size=32, steps=12, validation_split=0.2)
    assert other.weights_fingerprint() != straight.weights_fingerprint()  # the seed orders the batches


def test_a_second_fit_on_the_same_arrays_goes_on_with_its_iterator(caplog):
    x, y = blobs()
    trainer = make()
    trainer.fit(x, y, batch_size=32, steps=4)
    with caplog.at_level("INFO", logger="trainer"):
        assert trainer.fit(x, y, batch_size=32, steps=8)["step"] == 8
    assert "skipping" not in caplog.text


def test_epochs_is_a_total_so_a_second_fit_says_it_trains_nothing_and_returns_the_last_logs(caplog, tmp_path):
    """Unlike Keras, fit(epochs=1) twice trains one epoch in all (epochs and steps are totals, as a resume needs):
    the second call says so, with the fix, and returns the logs the first one did. Arrays alone: one epoch."""
    x, y = blobs()
    trainer = make()
    first = trainer.fit(x, y, batch_size=32)  # neither steps nor epochs: one epoch, as Keras
    assert first["step"] == 12 and "loss" in first
    with caplog.at_level("WARNING", logger="trainer"):
        assert trainer.fit(x, y, batch_size=32, epochs=1) == first
    assert ("fit(epochs=1) trains until epoch 1 in total (a total, unlike Keras' epochs) and this run is already at "
            "step 12 of 12: nothing to train (epoch 1). Fix: fit(epochs=2)") in caplog.text
    assert trainer.fit(x, y, batch_size=32, epochs=2)["step"] == 24
    validated = make(run_dir=tmp_path)
    logs = validated.fit(x, y, batch_size=32, steps=3, validation_split=0.25)
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer"):
        again = make(run_dir=tmp_path).fit(x, y, batch_size=32, steps=3, validation_split=0.25)  # resumed, done
        assert again["split"] == "eval" and again["loss"] == pytest.approx(logs["loss"])
        fresh = make(run_dir=tmp_path).fit(x, y, batch_size=32, steps=3)  # no eval data: the run's record of step 3
        unrecorded = make(run_dir=tmp_path, loggers=[]).fit(x, y, batch_size=32, steps=3)  # no record to read
    assert "fit(steps=3) trains until step 3 in total" in caplog.text and "Fix: fit(steps=6)" in caplog.text
    logged = [r for r in read_metrics(tmp_path) if r["split"] == "train" and r["step"] == 3][-1]
    assert fresh["step"] == 3 and fresh["loss"] == logged["loss"] and fresh["accuracy"] == logged["accuracy"]
    assert unrecorded["step"] == 3 and np.isnan(unrecorded["loss"]) and np.isnan(unrecorded["accuracy"])


@pytest.mark.parametrize("call, message", [
    (lambda t, ds: t.fit(ds), "say how long to train: fit(epochs=...) or fit(steps=...), or Trainer(max_steps=...)"),
    (lambda t, ds: t.fit(ds, epochs=2), "epochs needs a training set of known size. Fix: fit(steps=...) or "
                                        "Trainer(max_steps=...)"),
    (lambda t, ds: t.fit(ds, ds.take(2), steps=2), "Fix: EarlyStopping(monitor=<one of them>):"),
])
def test_errors_from_python_name_the_python_form(call, message):
    x, y = blobs()
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32).repeat()
    with pytest.raises(UserError) as error:
        call(make(callbacks=[EarlyStopping(monitor="accuracyy")]), ds)
    assert message in str(error.value) and "from the CLI" not in str(error.value)  # only the form the user wrote


def test_class_weight_is_sample_weight_by_class_on_arrays_and_tf_data():
    x, y = blobs()
    weights = {0: 1.0, 1: 3.0}
    runs = {}
    for name, args, kwargs in (("class_weight", (x, y), {"class_weight": weights}),
                               ("sample_weight", (x, y), {"sample_weight": np.where(y == 1, 3.0, 1.0)}),
                               ("none", (x, y), {})):
        trainer = make(seed=1)
        trainer.fit(*args, batch_size=32, steps=6, **kwargs)
        runs[name] = trainer.weights_fingerprint()
    assert runs["class_weight"] == runs["sample_weight"] != runs["none"]
    ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32, drop_remainder=True)
    weighted_ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y,
                                                      np.where(y == 1, 3.0, 1.0).astype("float32")))
    by_class, by_sample = make(seed=1), make(seed=1)
    by_class.fit(ds, steps=6, class_weight=weights)
    by_sample.fit(weighted_ds.batch(32, drop_remainder=True), steps=6)
    assert by_class.weights_fingerprint() == by_sample.weights_fingerprint()


@pytest.mark.parametrize("call, message", [
    (lambda t, x, y: t.fit(x, y[:-1]), "different numbers of examples: x 400, y 399"),
    (lambda t, x, y: t.fit(x, y, class_weight={0: 1.0, 1: 2.0}, sample_weight=np.ones(400)),
     "cannot be given together"),
    (lambda t, x, y: t.fit(x, y, class_weight={0: -1.0}), "a finite weight >= 0"),
    (lambda t, x, y: t.fit(x, {"val": (x, y), "ood": (x, y)}), "this one is a dict of eval sets"),
    (lambda t, x, y: t.fit(x, y={"o": y}, class_weight={0: 2.0}), "class_weight is for a model with one output"),
    (lambda t, x, y: t.fit(x, eval_data=(x, y)), "eval_data= would be read as labels"),
    (lambda t, x, y: t.fit(x, y, initial_epoch=2), "initial_epoch (use Trainer(run_dir=...)"),
    (lambda t, x, y: t.fit(x, y, shuffle="batch"), "give True or False"),
    (lambda t, x, y: t.fit(x, y, validation_split=0.2, validation_data=(x, y)), "not both"),
    (lambda t, x, y: t.fit(x, y, validation_split=1.5), "must be in (0, 1)"),
    (lambda t, x, y: t.fit(x, y, validation_data=(x, y[:3])), "validation_data x 400, validation_data y 3"),
    (lambda t, x, y: t.fit(x, y, batch_size=500), "fewer than one batch"),
    (lambda t, x, y: t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), validation_split=0.1),
     "array input only"),
    (lambda t, x, y: t.fit(x, tf.data.Dataset.from_tensor_slices((x, y))), "the second argument is the labels y"),
])
def test_bad_array_input_is_a_user_error_that_says_the_fix(call, message):
    x, y = blobs()
    with pytest.raises(UserError) as error:
        call(make(), x, y)
    assert message in str(error.value)


def test_class_weight_weighs_the_training_part_of_a_validation_split_only():
    """As Keras: the split comes first. With the learning rate 0 the logged eval loss is the unweighted loss
    of the last 80 examples; the training part is weighted as sample weights on the first 320 would be."""
    x, y = blobs()
    frozen = make(optimizer=lambda: keras.optimizers.SGD(0.0))
    logs = frozen.fit(x, y, batch_size=32, epochs=1, validation_split=0.2, class_weight={0: 1.0, 1: 10.0})
    held = frozen.evaluate(tf.data.Dataset.from_tensor_slices((x[320:].astype("float32"), y[320:])).batch(32))
    assert logs["loss"] == pytest.approx(held["loss"], rel=1e-5) and logs["accuracy"] == pytest.approx(held["accuracy"])
    by_class, by_sample = make(seed=2), make(seed=2)
    by_class.fit(x, y, batch_size=32, steps=6, validation_split=0.2, class_weight={0: 1.0, 1: 10.0})
    by_sample.fit(x[:320], y[:320], batch_size=32, steps=6, sample_weight=np.where(y[:320] == 1, 10.0, 1.0))
    assert by_class.weights_fingerprint() == by_sample.weights_fingerprint()


def test_a_class_the_dict_leaves_out_weighs_one_as_in_keras():
    """{1: 3.0} is {0: 1.0, 1: 3.0}; {0: 2.0} leaves label 1 (above the largest key) at 1.0, on arrays and tf.data."""
    x, y = blobs()
    runs = {}
    for name, kwargs in (("partial", {"class_weight": {1: 3.0}}), ("full", {"class_weight": {0: 1.0, 1: 3.0}}),
                         ("above", {"class_weight": {0: 2.0}}),
                         ("sample", {"sample_weight": np.where(y == 0, 2.0, 1.0)})):
        trainer = make(seed=1)
        trainer.fit(x, y, batch_size=32, steps=3, **kwargs)
        runs[name] = trainer.weights_fingerprint()
    assert runs["partial"] == runs["full"] and runs["above"] == runs["sample"] != runs["full"]
    on_tf_data = make(seed=1)
    on_tf_data.fit(tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32), steps=3,
                   class_weight={0: 2.0})
    assert on_tf_data.evaluate(tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32))["loss"] > 0


def test_a_dataset_as_validation_data_and_keras_shuffle_and_validation_batch_size():
    x, y = blobs()
    val = tf.data.Dataset.from_tensor_slices((x[:64].astype("float32"), y[:64])).batch(16)
    trainer = make()
    logs = trainer.fit(x, y, batch_size=32, steps=3, validation_data=val)
    assert logs["loss"] == pytest.approx(trainer.evaluate(val)["loss"], rel=1e-5)
    in_order, from_ds = make(seed=1), make(seed=1)
    in_order.fit(x, y, batch_size=32, steps=6, shuffle=False, validation_split=0.2, validation_batch_size=16)
    assert in_order.eval_batches == 5  # the last 80 examples in batches of 16
    from_ds.fit(tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32, drop_remainder=True), steps=6)
    assert in_order.weights_fingerprint() == from_ds.weights_fingerprint()  # shuffle=False: file order


class SquaredOutput(keras.layers.Layer):
    def call(self, inputs):
        self.add_loss(keras.ops.mean(keras.ops.square(inputs)))
        return inputs


def two_inputs(add_loss=False):
    a, b = keras.Input((4,)), keras.Input((3,))
    out = keras.layers.Dense(2)(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], SquaredOutput()(out) if add_loss else out)


def test_several_inputs_as_a_list_or_a_tuple_and_unlabelled_arrays_as_in_keras():
    """A list x is several inputs (not stacked into one tensor); a tuple x without y is features, not (x, y);
    validation_split works without labels (a model with add_loss); x= and y= as keywords."""
    x, y = blobs()
    second = np.random.default_rng(1).normal(size=(400, 3))
    labelled = Trainer(model=two_inputs, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=keras.optimizers.SGD, progress_bar=False)
    assert labelled.fit([x, second], y, batch_size=32, steps=2, validation_split=0.2)["split"] == "eval"
    assert labelled.fit(x=[x, second], y=y, batch_size=32, steps=4)["step"] == 4
    unlabelled = Trainer(model=lambda: two_inputs(add_loss=True), optimizer=keras.optimizers.SGD, progress_bar=False)
    logs = unlabelled.fit((x, second), batch_size=32, steps=2, validation_split=0.25)
    assert logs["split"] == "eval" and logs["loss"] > 0 and unlabelled.eval_batches == 4


def test_overfit_batches_evaluates_each_named_set_on_the_unweighted_training_batches():
    """overfit_batches=2 with named eval sets keeps their names (a monitor of `ood/loss` works) and evaluates
    the first 2 training batches without the class weights (learning rate 0: as a run without them)."""
    from trainer import EarlyStopping

    x, y = blobs()
    logs = {}
    for name, kwargs in (("weighted", {"class_weight": {0: 1.0, 1: 10.0}}), ("plain", {})):
        trainer = make(overfit_batches=2, seed=1, optimizer=lambda: keras.optimizers.SGD(0.0),
                       callbacks=[EarlyStopping(monitor="ood/loss", patience=5)])
        logs[name] = trainer.fit(x, y, batch_size=32, steps=2, validation_split=0.2,
                                 validation_data={"ood": blobs(64, 1)}, **kwargs)
        assert trainer.eval_batches == 4  # 2 batches of each set
    assert logs["weighted"]["ood/loss"] == pytest.approx(logs["plain"]["ood/loss"], rel=1e-6)
    assert logs["weighted"]["val/loss"] == pytest.approx(logs["weighted"]["ood/loss"], rel=1e-6)  # the same batches


@pytest.mark.slow
def test_class_weight_from_the_cli(tmp_path, tiny):
    """data.class_weight weighs the training loss: all ones trains as no weights, a weighted class otherwise;
    a negative weight exits 2 with the fix."""
    from conftest import run_cli

    ones = ",".join(f"{c}:1.0" for c in range(10))
    fingerprints = {}
    for name, extra in (("none", []), ("ones", [f"data.class_weight={{{ones}}}"]),
                        ("weighted", [f"data.class_weight={{{ones[:-3]}5.0}}"]),
                        ("negative", ["data.class_weight={0:-1.0}"])):
        result = run_cli(*tiny, "trainer.max_steps=6", "trainer.log_every=3", *extra,
                         f"hydra.run.dir={tmp_path / name}")
        output = result.stdout + result.stderr
        if name == "negative":
            assert result.returncode == 2 and "a finite weight >= 0" in output
            continue
        assert result.returncode == 0, output[-3000:]
        fingerprints[name] = output.split("Weights fingerprint: ")[1].split()[0]
    assert fingerprints["ones"] == fingerprints["none"] != fingerprints["weighted"]


DISTRIBUTED_WEIGHTS = """
import json, keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import EarlyStopping, Trainer
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 256); x = rng.normal(size=(256, 4)).astype("float32")
out = {}
for replicas, strategy in ((1, tf.distribute.OneDeviceStrategy("/cpu:0")),
                           (2, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    t = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), strategy=strategy,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.SGD(0.0), progress_bar=False, log_every=8, seed=0)
    logs = t.fit(x, y, batch_size=32, epochs=1, class_weight={0: 0.5, 1: 1.0, 2: 4.0})
    per_example = keras.losses.sparse_categorical_crossentropy(y, t.model(x), from_logits=True).numpy()
    out[replicas] = [logs["loss"], float(np.mean(per_example * np.array([0.5, 1.0, 4.0])[y]))]
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow  # ~30 s on 2 loaded cores (a process with 2 logical CPUs): CI runs it in the slow stage
def test_class_weights_under_two_replicas_give_keras_weighted_mean(tmp_path):
    """With the learning rate 0, an epoch's logged loss is the mean over examples of weight x loss (Keras'
    sum_over_batch_size: not divided by the weights' sum), on one replica and on two."""
    script = tmp_path / "weights.py"
    script.write_text(DISTRIBUTED_WEIGHTS + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    for replicas in ("1", "2"):
        logged, expected = out[replicas]
        assert logged == pytest.approx(expected, rel=1e-5)


def test_train_data_and_eval_data_still_work_as_keywords():
    """fit(train_data=ds, eval_data=ds), as before fit took arrays."""
    x, y = blobs(96)
    data = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(32)
    logs = make().fit(train_data=data.repeat(), eval_data=data, steps=2)
    assert logs["step"] == 2 and logs["split"] == "eval"
    with pytest.raises(TypeError, match="train_data twice"):
        make().fit(data, train_data=data, steps=1)
