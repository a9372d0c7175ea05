"""State a Trainer subclass holds itself (a MoCo queue of negatives in a tf.Variable, assigned in the step) is in every
checkpoint and restored on resume, through the public API; a checkpoint without it resumes, saying so."""
import logging
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN, blobs
from trainer import CheckpointError, Trainer
from trainer.callbacks import Callback
from trainer.config import ConfigError

SLOTS = 8


def mlp():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])


class Queued(Trainer):
    """A queue of the last batches' mean embeddings (MoCo's negatives, in small) that the loss reads: the weights
    depend on it, so a resume that lost it ends elsewhere."""

    def __init__(self, **options):
        super().__init__(**options)
        self.queue = tf.Variable(tf.zeros((SLOTS, 2)), trainable=False)
        self.queue_ptr = tf.Variable(0, dtype=tf.int32, trainable=False)
        self.stats = {"seen": tf.Variable(0.0, trainable=False)}
        self.noise = [tf.random.Generator.from_seed(5)]
        self.encoder = self.models["model"]  # the model again, and the Trainer's own variables: not saved twice
        self.counter = self.step

    def train_step(self, data):
        x, y = tf.cast(data[0], tf.float32), data[1]
        x = x + 0.1 * self.noise[0].normal(tf.shape(x))
        with tf.GradientTape() as tape:
            logits = self.encoder(x, training=True)
            negatives = tf.reduce_mean(tf.matmul(logits, self.queue, transpose_b=True))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            loss += 0.1 * negatives
        self.update(loss, tape)
        self.queue.scatter_nd_update([[self.queue_ptr]], tf.reduce_mean(logits, axis=0, keepdims=True))
        self.queue_ptr.assign((self.queue_ptr + 1) % SLOTS)
        self.stats["seen"].assign_add(tf.cast(tf.shape(x)[0], tf.float32))
        return {"loss": loss}


def queued(run_dir, cls=Queued):
    return cls(model=mlp, optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, verbose=False,
               checkpoint_every=5, deterministic=True)


def test_variables_held_by_the_trainer_are_saved_and_a_resume_ends_where_the_whole_run_ends(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        whole = queued(tmp_path / "whole")
        whole.fit(blobs(), steps=20)
    said = [r.message for r in caplog.records if r.message.startswith("State held by the Trainer")]
    assert len(said) == 1 and "self.queue (tf.Variable float32 [8, 2]), self.queue_ptr (tf.Variable int32 [])" \
        in said[0] and "self.stats['seen']" in said[0] and "self.noise[0] (Generator)" in said[0], said
    assert "self.encoder" not in said[0] and "self.counter" not in said[0]
    keys = [key for key, _ in tf.train.list_variables(str(tmp_path / "whole" / "checkpoints" / "ckpt-20"))]
    held = sorted(key for key in keys if key.startswith("held/"))
    assert held == ["held/noise/0/_state_var/.ATTRIBUTES/VARIABLE_VALUE", "held/queue/.ATTRIBUTES/VARIABLE_VALUE",
                    "held/queue_ptr/.ATTRIBUTES/VARIABLE_VALUE", "held/stats/seen/.ATTRIBUTES/VARIABLE_VALUE"], held
    assert sum(key.startswith("step/") for key in keys) == 1  # the Trainer's own, once

    queued(tmp_path / "resumed").fit(blobs(), steps=10)
    resumed = queued(tmp_path / "resumed")  # a new process would build it anew: the queue starts at zeros
    resumed.fit(blobs(), steps=20)
    assert resumed.weights_fingerprint() == whole.weights_fingerprint()
    np.testing.assert_array_equal(resumed.queue.numpy(), whole.queue.numpy())
    assert np.abs(whole.queue.numpy()).sum() > 0 and float(resumed.stats["seen"].numpy()) == 20 * 16


class Plain(Trainer):
    """The class before its queue was added (an old run folder): it holds nothing of its own."""


def test_a_checkpoint_without_them_resumes_saying_so_and_another_shape_is_an_error(tmp_path, caplog):
    def plain(run_dir):
        return Plain(model=mlp, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, verbose=False, checkpoint_every=5)

    plain(tmp_path / "old").fit(blobs(), steps=5)
    with caplog.at_level(logging.INFO, logger="trainer"):
        queued(tmp_path / "old").fit(blobs(), steps=10)  # the class gained its variables since: resumed, said
    warned = [r for r in caplog.records if "holds no saved value of" in r.message]
    assert len(warned) == 1 and warned[0].levelname == "WARNING", caplog.text
    assert "self.queue, self.queue_ptr, self.stats['seen'], self.noise[0]" in warned[0].message
    assert "start from their initial values" in warned[0].message and "new run folder" in warned[0].message
    saved = tf.train.list_variables(str(tmp_path / "old" / "checkpoints"))
    assert any(key.startswith("held/queue/") for key, _ in saved)  # saved from then on

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # and back: what it held is not restored, said
        plain(tmp_path / "old").fit(blobs(), steps=15)
    assert "state of attributes this Trainer no longer has (self.noise, self.queue, self.queue_ptr, self.stats)" \
        in caplog.text, caplog.text

    class Longer(Queued):
        def __init__(self, **options):
            super().__init__(**options)
            self.queue = tf.Variable(tf.zeros((SLOTS * 2, 2)), trainable=False)

    queued(tmp_path / "shape").fit(blobs(), steps=5)
    with pytest.raises(CheckpointError, match=r"ckpt-5: its saved held state does not fit this Trainer's .*Fix: run "
                                              r"with the code the run was started with, or start a new run folder"):
        queued(tmp_path / "shape", Longer).fit(blobs(), steps=10)


def test_a_variable_added_between_fit_calls_is_saved_from_then_on(tmp_path, caplog):
    trainer = Plain(model=mlp, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path, verbose=False)
    trainer.fit(blobs(), steps=2)
    assert not any(k.startswith("held/") for k, _ in tf.train.list_variables(str(tmp_path / "checkpoints")))
    trainer.temperature = tf.Variable(0.5)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs(), steps=4)
    assert "self.temperature (tf.Variable float32 [])" in caplog.text
    assert "held/temperature/.ATTRIBUTES/VARIABLE_VALUE" in dict(tf.train.list_variables(str(tmp_path / "checkpoints")))



class Nested(Trainer):
    """Variables deep in containers, under keys a checkpoint path could confuse, and a Keras metric."""

    def __init__(self, **options):
        super().__init__(**options)
        self.nested = {"q": [tf.Variable(0.0)], "pairs": ({"r": tf.Variable(0.0)},)}
        self.keyed = {"a/b": tf.Variable(0.0), "a_b": tf.Variable(0.0), "a.b": tf.Variable(0.0)}
        self.tracker = keras.metrics.Mean(name="tracked")

    def train_step(self, data):
        self.nested["q"][0].assign_add(1.0)
        self.nested["pairs"][0]["r"].assign_add(2.0)
        for i, v in enumerate(self.keyed.values()):
            v.assign_add(float(i + 1))
        self.tracker.update_state(1.0)
        return super().train_step(data)


def plain_options(run_dir):
    return dict(model=mlp, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, verbose=False, checkpoint_every=5)


def test_state_deep_in_containers_is_saved_under_keys_that_stay_apart_and_a_metric_is_not(tmp_path):
    Nested(**plain_options(tmp_path)).fit(blobs(), steps=5)
    held = sorted(key.split("/.ATTRIBUTES")[0] for key, _ in tf.train.list_variables(str(tmp_path / "checkpoints"))
                  if key.startswith("held/"))
    assert held == ["held/keyed/a..b", "held/keyed/a.Sb", "held/keyed/a_b", "held/nested/pairs/0/r",
                    "held/nested/q/0"], held  # TensorFlow's escapes: '.' as '..', '/' as '.S'; no metric
    resumed = Nested(**plain_options(tmp_path))
    resumed.fit(blobs(), steps=7)
    assert float(resumed.nested["q"][0].numpy()) == 7 and float(resumed.nested["pairs"][0]["r"].numpy()) == 14
    assert [float(v.numpy()) for v in resumed.keyed.values()] == [7, 14, 21]  # each restored from its own

    class Twins(Plain):
        def __init__(self, **options):
            super().__init__(**options)
            self.twins = {1: tf.Variable(0.0), "1": tf.Variable(1.0)}

    with pytest.raises(ConfigError, match=r"self.twins has the keys 1 and '1', which a checkpoint names alike"):
        Twins(**plain_options(tmp_path / "twins")).fit(blobs(), steps=1)


class MadeLate(Trainer):
    """State made after fit() starts: a generator by a callback's on_train_begin, a layer built by the step."""

    noise_rng = None

    def __init__(self, **options):
        super().__init__(**options)
        self.head = keras.layers.Dense(2)

    def train_step(self, data):
        x, y = data
        x = x + tf.cast(self.noise_rng.normal(tf.shape(x)), x.dtype) * 0.1
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            loss += 0.1 * tf.reduce_mean(self.head(logits))
        self.update(loss, tape)
        return {"loss": loss}


class MakeRng(Callback):
    def on_train_begin(self, trainer):
        if trainer.noise_rng is None:
            trainer.noise_rng = tf.random.Generator.from_seed(7)


def test_state_made_after_fit_starts_is_said_loudly_and_an_error_when_deterministic(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        with pytest.raises(ConfigError, match=r"deterministic=true, but: State held by the Trainer was made after "
                                              r"fit\(\) started.*no checkpoint holds it: self.head \(Dense\), "
                                              r"self.noise_rng \(Generator\).*Fix: make it in __init__ "
                                              r"\(before fit\(\)\)"):
            MadeLate(**plain_options(tmp_path / "exact"), deterministic=True, callbacks=[MakeRng()]).fit(
                blobs(), steps=10)
    assert "a tf.random.Generator of your own (self.noise_rng), which no checkpoint holds" in caplog.text
    assert not list((tmp_path / "exact").glob("checkpoints/*.index"))  # said before any save

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        MadeLate(**plain_options(tmp_path / "loose"), callbacks=[MakeRng()]).fit(blobs(), steps=5)
    late = [r for r in caplog.records if "made after fit() started" in r.message]
    assert len(late) == 1 and late[0].levelname == "WARNING" and "self.noise_rng (Generator)" in late[0].message
    assert not any(k.startswith("held/") for k, _ in tf.train.list_variables(str(tmp_path / "loose" / "checkpoints")))

TWO_REPLICAS = """
import contextlib, sys, keras, numpy as np, tensorflow as tf
from trainer import Trainer

class Queued(Trainer):
    def __init__(self, scoped, **options):
        super().__init__(**options)
        # mirrored, or one copy that every replica writes
        with self.strategy.scope() if scoped else contextlib.nullcontext():
            agg = tf.VariableAggregation.ONLY_FIRST_REPLICA if scoped else tf.VariableAggregation.NONE
            self.queue = tf.Variable(tf.zeros((8, 2)), trainable=False, aggregation=agg)
            self.queue_ptr = tf.Variable(0, dtype=tf.int32, trainable=False, aggregation=agg)

    def train_step(self, data):
        x, y = tf.cast(data[0], tf.float32), data[1]
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            loss += 0.1 * tf.reduce_mean(tf.matmul(logits, self.queue, transpose_b=True))
        self.update(loss, tape)
        row = tf.reduce_mean(logits, axis=0, keepdims=True)
        self.queue.assign(tf.tensor_scatter_nd_update(self.queue, [[self.queue_ptr]], row))
        self.queue_ptr.assign((self.queue_ptr + 1) % 8)
        return {"loss": loss}

rng = np.random.default_rng(0)
y = rng.integers(0, 2, 256).astype("int32")
x = rng.normal(size=(256, 4)).astype("float32") + y[:, None]
data = lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
for scoped in (False, True):
    def run(folder, steps):
        t = Queued(scoped, model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=f"{sys.argv[1]}/{folder}{scoped}",
                   verbose=False, checkpoint_every=5, deterministic=True,
                   strategy={"name": "mirrored", "logical_cpus": 2})
        t.fit(data(), steps=steps)
        return t
    whole = run("whole", 20)
    run("resumed", 10)
    resumed = run("resumed", 20)
    same = (whole.weights_fingerprint() == resumed.weights_fingerprint()
            and np.array_equal(whole.queue.numpy(), resumed.queue.numpy()))
    print("SCOPED" if scoped else "OUTSIDE", whole.strategy.num_replicas_in_sync, "same" if same else "differ")
"""


@pytest.mark.slow  # a process of its own for 2 logical CPUs, and 6 traces
def test_two_replicas_resume_exactly_with_variables_made_in_or_outside_the_scope(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_REPLICAS + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OUTSIDE 2 same" in result.stdout and "SCOPED 2 same" in result.stdout, result.stdout + result.stderr[-3000:]
