"""fit() with NumPy arrays, as Keras' fit(x, y, ...): validation split/data, class and sample weights, resume."""
import json
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Trainer
from trainer.errors import UserError


def blobs(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return rng.normal(size=(n, 4)) + y[:, None], y  # float64 and int64, as NumPy makes them


def make(**kwargs):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-2), metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
                   progress_bar=False, log_every=5, **kwargs)


def test_validation_split_holds_out_the_last_fraction_before_shuffling():
    """400 examples, validation_split=0.2: 320 train (10 steps of 32 an epoch), the last 80 evaluated, as Keras."""
    x, y = blobs()
    trainer = make()
    logs = trainer.fit(x, y, batch_size=32, epochs=2, validation_split=0.2)
    assert logs["step"] == 20 and trainer.steps_per_epoch == 10
    held = tf.data.Dataset.from_tensor_slices((x[320:].astype("float32"), y[320:])).batch(32)
    again = trainer.evaluate(held)
    assert again["loss"] == pytest.approx(logs["loss"], rel=1e-5) and again["accuracy"] == pytest.approx(logs["accuracy"])
    assert trainer.eval_batches == 3  # 80 examples, the partial last batch kept


def test_validation_data_with_sample_weights_and_no_eval_set_without_it():
    x, y = blobs()
    xv, yv = blobs(64, seed=1)
    trainer = make()
    weighted = trainer.fit(x, y, batch_size=32, steps=5, validation_data=(xv, yv, np.where(yv == 1, 2.0, 0.0)))
    plain = trainer.evaluate(tf.data.Dataset.from_tensor_slices((xv.astype("float32"), yv)).batch(32))
    per_example = keras.losses.sparse_categorical_crossentropy(yv, trainer.model(xv.astype("float32")), from_logits=True).numpy()
    assert weighted["loss"] == pytest.approx(float(np.mean(per_example * np.where(yv == 1, 2.0, 0.0))), rel=1e-4)
    assert plain["loss"] == pytest.approx(float(np.mean(per_example)), rel=1e-4)
    assert make().fit(x, y, steps=3)["split"] == "train"  # no validation: the last train logs


def test_an_interrupted_run_resumes_on_the_same_batches(tmp_path):
    """12 steps straight == 7 steps, then a new Trainer resuming from the checkpoint to 12 (epochs of 10 steps:
    the resume crosses a reshuffle)."""
    x, y = blobs()
    straight = make(run_dir=tmp_path / "straight", seed=3)
    straight.fit(x, y, batch_size=32, steps=12, validation_split=0.2)
    make(run_dir=tmp_path / "resumed", seed=3, checkpoint_every=7).fit(x, y, batch_size=32, steps=7, validation_split=0.2)
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
    weighted_ds = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y, np.where(y == 1, 3.0, 1.0).astype("float32")))
    by_class, by_sample = make(seed=1), make(seed=1)
    by_class.fit(ds, steps=6, class_weight=weights)
    by_sample.fit(weighted_ds.batch(32, drop_remainder=True), steps=6)
    assert by_class.weights_fingerprint() == by_sample.weights_fingerprint()


@pytest.mark.parametrize("call, message", [
    (lambda t, x, y: t.fit(x, y[:-1]), "different numbers of examples: x 400, y 399"),
    (lambda t, x, y: t.fit(x, y, class_weight={0: 1.0, 1: 2.0}, sample_weight=np.ones(400)), "cannot be given together"),
    (lambda t, x, y: t.fit(x, y, class_weight={0: 1.0, 2: 2.0}), "no weight for the classes [1]"),
    (lambda t, x, y: t.fit(x, y, validation_split=0.2, validation_data=(x, y)), "not both"),
    (lambda t, x, y: t.fit(x, y, validation_split=1.5), "must be in (0, 1)"),
    (lambda t, x, y: t.fit(x, y, validation_data=(x, y[:3])), "validation_data x 400, validation_data y 3"),
    (lambda t, x, y: t.fit(x, y, batch_size=500), "fewer than one batch"),
    (lambda t, x, y: t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), validation_split=0.1), "array input only"),
    (lambda t, x, y: t.fit(x, tf.data.Dataset.from_tensor_slices((x, y))), "the second argument is the labels y"),
])
def test_bad_array_input_is_a_user_error_that_says_the_fix(call, message):
    x, y = blobs()
    with pytest.raises(UserError) as error:
        call(make(), x, y)
    assert message in str(error.value)


def test_class_weight_from_the_cli(tmp_path, tiny):
    """data.class_weight weighs the training loss: all ones trains as no weights, a weighted class otherwise;
    a class with no weight exits 2 with the fix."""
    from conftest import run_cli

    ones = ",".join(f"{c}:1.0" for c in range(10))
    fingerprints = {}
    for name, extra in (("none", []), ("ones", [f"data.class_weight={{{ones}}}"]),
                        ("weighted", [f"data.class_weight={{{ones[:-3]}5.0}}"]), ("missing", ["data.class_weight={0:1.0,2:1.0}"])):
        result = run_cli(*tiny, "trainer.max_steps=6", "trainer.log_every=3", *extra, f"hydra.run.dir={tmp_path / name}")
        output = result.stdout + result.stderr
        if name == "missing":
            assert result.returncode == 2 and "no weight for the classes [1]" in output
            continue
        assert result.returncode == 0, output[-3000:]
        fingerprints[name] = output.split("Weights fingerprint: ")[1].split()[0]
    assert fingerprints["ones"] == fingerprints["none"] != fingerprints["weighted"]


DISTRIBUTED_WEIGHTS = """
import json, keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
rng = np.random.default_rng(0)
y = rng.integers(0, 3, 256); x = rng.normal(size=(256, 4)).astype("float32")
out = {}
for replicas, strategy in ((1, tf.distribute.OneDeviceStrategy("/cpu:0")), (2, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    t = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]), strategy=strategy,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=lambda: keras.optimizers.SGD(0.0),
                progress_bar=False, log_every=8, seed=0)
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
    script.write_text(DISTRIBUTED_WEIGHTS)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    for replicas in ("1", "2"):
        logged, expected = out[replicas]
        assert logged == pytest.approx(expected, rel=1e-5)
