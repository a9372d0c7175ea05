"""Keras metrics a Trainer subclass holds itself (Keras' custom-step guide: `self.loss_tracker =
keras.metrics.Mean(name="loss")`), adopted as Trainer(metrics=...)'s are: restarted with every log window and
evaluation, logged as their value over the window, right on any number of replicas and across a resume."""
import json
import logging
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN, blobs, read_metrics
from trainer import Callback, Trainer

ENTROPY = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp():
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                     keras.layers.Dense(2)])


class Tracked(Trainer):
    """The Keras guide's step, with trackers held directly, in a list and in a dict."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.listed = [keras.metrics.Mean(name="listed")]
        self.named = {"batches": keras.metrics.Sum(name="batches")}

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = ENTROPY(y, logits)
        self.update(loss, tape)
        self.loss_tracker.update_state(loss)
        self.listed[0].update_state(loss)
        self.named["batches"].update_state(1.0)
        self.metrics["accuracy"].update_state(y, logits)
        return {"loss": self.loss_tracker.result(), "listed": self.listed[0].result(),
                "batches": self.named["batches"].result(), "acc": self.metrics["accuracy"].result(),
                "batch_loss": loss}

    def test_step(self, data):  # the guide's: the same tracker in evaluation
        x, y = data
        loss = ENTROPY(y, self.model(x, training=False))
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


class Recorder(Callback):
    def __init__(self):
        self.rows, self.evals = [], []

    def on_log(self, trainer, step, logs):
        self.rows.append(logs)

    def on_eval_end(self, trainer, step, logs):
        self.evals.append(logs)


def tracked(**options):
    defaults = dict(log_every=5, eval_every=0, progress_bar=False, tensorboard=False, verbose=False, seed=0)
    return Tracked(model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], **{**defaults, **options})


def test_a_metric_attribute_restarts_at_each_log_and_logs_its_value_over_the_window(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        t = tracked(run_dir=tmp_path)
        t.fit(blobs(), steps=20)
    train = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    for row in train:
        # the mean over the window's batches (batch_loss: each batch's loss averaged over the window), not a
        # running mean over the whole run; the same for the one in a list; the Sum counts the window's 5 batches
        assert row["loss"] == pytest.approx(row["batch_loss"], abs=1e-6)
        assert row["listed"] == pytest.approx(row["batch_loss"], abs=1e-6)
        assert row["batches"] == 5.0
        assert row["acc"] == pytest.approx(row["accuracy"], abs=1e-7)  # a Trainer metric's result(): its window value
    assert train[0]["loss"] > train[-1]["loss"] + 0.05  # it learns: the windows differ
    said = [r.getMessage() for r in caplog.records if "Keras metrics held by the Trainer" in r.getMessage()]
    assert len(said) == 1
    assert all(f"self.{name}" in said[0] for name in ("loss_tracker", "listed[0]", "named['batches']"))


def test_an_evaluation_inside_a_train_window_neither_adds_to_it_nor_is_added_to():
    """eval_every=3 with log_every=5: the tracker shared by train_step and test_step gives each its own value."""
    recorder = Recorder()
    t = tracked(eval_every=3, log_every=5, best_metric=None, callbacks=[recorder])
    t.fit(blobs(), blobs(), steps=10)
    rows, evals = recorder.rows, recorder.evals
    assert [r["step"] for r in rows] == [5, 10] and [e["step"] for e in evals] == [3, 6, 9, 10]
    for row in rows:
        assert row["loss"] == pytest.approx(row["batch_loss"], abs=1e-6)
        assert row["batches"] == 5.0
    x, y = (np.concatenate([b[i].numpy() for b in blobs()]) for i in (0, 1))
    per_batch = [float(ENTROPY(y[i:i + 16], t.model(x[i:i + 16]))) for i in range(0, len(x), 16)]
    assert evals[-1]["loss"] == pytest.approx(np.mean(per_batch), abs=1e-5)  # over the eval set only
    assert t.evaluate(blobs())["loss"] == pytest.approx(np.mean(per_batch), abs=1e-5)


def test_a_resumed_run_logs_what_a_run_never_stopped_logs(tmp_path):
    """The tracker restarts at every log window, as the Trainer's own metrics: a run resumed from a checkpoint
    (at a log step) logs the same values as one that never stopped."""
    options = dict(checkpoint_every=10, deterministic=True, best_metric=None)
    tracked(run_dir=tmp_path / "straight", **options).fit(blobs(shuffle=True), steps=20)
    tracked(run_dir=tmp_path / "resumed", **options).fit(blobs(shuffle=True), steps=10)
    tracked(run_dir=tmp_path / "resumed", **options).fit(blobs(shuffle=True), steps=20)  # a new process's Trainer
    straight, resumed = ([(r["step"], r["loss"], r["listed"], r["batches"]) for r in read_metrics(tmp_path / name)
                          if r["split"] == "train"] for name in ("straight", "resumed"))
    assert [s for s, *_ in resumed] == [5, 10, 15, 20]
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)


class Outside(Trainer):
    def __init__(self, make_tracker, **kwargs):
        super().__init__(**kwargs)
        self.loss_tracker = make_tracker()  # outside the strategy's scope, as the Keras guide writes it

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = ENTROPY(y, self.model(x, training=True))
        self.update(loss, tape)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result(), "batch_loss": loss}


class NoConfig(keras.metrics.Mean):
    """A metric whose config does not rebuild it (a required argument missing from get_config)."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale


def test_a_metric_made_outside_the_strategy_scope_is_made_anew_in_it(caplog):
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    t = Outside(lambda: keras.metrics.Mean(name="loss"), model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1),
                strategy=strategy, log_every=5, progress_bar=False, verbose=False)
    first = t.loss_tracker
    assert not strategy.extended.variable_created_in_scope(first.variables[0].value)
    logs = t.fit(blobs(), steps=10)
    assert t.loss_tracker is not first and t.loss_tracker.name == "loss"
    assert all(strategy.extended.variable_created_in_scope(v.value) for v in t.loss_tracker.variables)
    assert logs["loss"] == pytest.approx(logs["batch_loss"], abs=1e-6)

    with caplog.at_level(logging.WARNING, logger="trainer"):  # not made anew: on one replica still right
        t = Outside(lambda: NoConfig(2.0, name="scaled"), model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1),
                    strategy=strategy, log_every=5, progress_bar=False, verbose=False)
        logs = t.fit(blobs(), steps=5)
    assert logs["loss"] == pytest.approx(logs["batch_loss"], abs=1e-6)
    assert "made outside the strategy's scope" not in caplog.text


TWO_REPLICAS = """
import json, logging, sys, keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, %r)
from test_own_metrics import NoConfig, Outside, Recorder, mlp
from conftest import blobs
out = {}
for replicas, strategy in ((1, None), (2, tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))):
    recorder = Recorder()
    t = Outside(lambda: keras.metrics.Mean(name="loss"), model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1),
                strategy=strategy, log_every=5, progress_bar=False, verbose=False, seed=0, callbacks=[recorder])
    t.fit(blobs(), steps=15)
    out[replicas] = [(r["loss"], r["batch_loss"]) for r in recorder.rows]
said = []


class Said(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())


logging.getLogger("trainer").addHandler(Said())
t = Outside(lambda: NoConfig(2.0, name="scaled"), model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1),
            strategy=strategy, log_every=5, progress_bar=False)
t.fit(blobs(), steps=5)
t.fit(blobs(), steps=10)
out["said"] = [m for m in said if "made outside the strategy's scope" in m]
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow  # a process with 2 logical CPUs (~30 s on 2 loaded cores): CI runs it in the slow stage
def test_a_metric_attribute_on_two_replicas_logs_the_one_device_value(tmp_path):
    """Made outside the scope, as the Keras guide writes it: made anew in it, the value is one device's. One whose
    config does not rebuild it is named in a warning, once, with the fix."""
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(TWO_REPLICAS % str(Path(__file__).parent) + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT "):])
    one, two = np.array(out["1"]), np.array(out["2"])
    np.testing.assert_allclose(two[:, 0], two[:, 1], rtol=1e-5)  # the tracker: the window's mean batch loss
    np.testing.assert_allclose(two, one, rtol=1e-4)
    assert len(out["said"]) == 1, out["said"]
    said = out["said"][0]
    assert "self.loss_tracker (NoConfig 'scaled')" in said and "from_config" in said and "these 2 replicas" in said
    assert "with self.strategy.scope(): self.loss_tracker = ..." in said and "Trainer(metrics=...)" in said
