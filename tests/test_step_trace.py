"""Python code in a step runs when TensorFlow traces it, not at each step: the habits of eager code that go silently
wrong there are said at the trace. A data iterator made in the step (every step reads the first batch) and a plain
value of the Trainer changed by the step (it counts traces) are WARNINGs naming the fix; a tensor an earlier trace
kept on the Trainer, read by the next trace, is a ConfigError naming the attribute, instead of TensorFlow's 'out of
scope' error, which points into the framework; one written before it is read (a value passed between methods) works
and says nothing."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import Trainer
from trainer.config import ConfigError


def make(cls, **kwargs):
    return cls(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False, verbose=False, **kwargs)


def supervised_update(trainer, data):
    x, y = data
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, trainer.model(x, training=True),
                                                                           from_logits=True))
    trainer.update(loss, tape)
    return loss


class SecondStream(Trainer):
    """Reads a second data set beside fit()'s (FixMatch's unlabelled batches); `how` makes its iterator."""

    def __init__(self, how, **kwargs):
        super().__init__(**kwargs)
        self.how = how
        self.unlabelled_ds = tf.data.Dataset.range(400).batch(4).repeat()  # batch i holds 4i .. 4i+3
        self.unlabelled = iter(self.unlabelled_ds) if how == "in_init" else None
        self.last_read = tf.Variable(-1, dtype=tf.int64, trainable=False)

    def train_step(self, data):
        if self.how == "in_step":
            unlabelled = next(iter(self.unlabelled_ds))
        elif self.how == "in_init":
            unlabelled = next(self.unlabelled)
        else:  # a data set made in the step from the step's tensors: read anew on purpose
            unlabelled = next(iter(tf.data.Dataset.from_tensor_slices(tf.range(8, dtype=tf.int64)).batch(4)))
        self.last_read.assign(tf.reduce_max(unlabelled))
        return {"loss": supervised_update(self, data)}


def test_a_data_iterator_made_in_the_step_is_said_with_the_fix(caplog):
    said = "train_step makes a data iterator at every call"
    for how, last in [("in_step", 3), ("in_init", 19), ("made_in_graph", 3)]:
        caplog.clear()
        trainer = make(SecondStream, how=how)
        with caplog.at_level(logging.WARNING, logger="trainer"):
            trainer.fit(blobs(), steps=5)
        assert int(trainer.last_read.numpy()) == last, how  # in the step: the first batch at every step
        warnings = [r.getMessage() for r in caplog.records if said in r.getMessage()]
        assert len(warnings) == (how == "in_step"), (how, warnings)
        if warnings:
            text = warnings[0]
            assert "the Trainer holds the data set self.unlabelled_ds" in text, text
            assert "self.unlabelled = iter(self.unlabelled_ds)" in text and "tf.data.Dataset.zip" in text, text


class CountsInPython(Trainer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls, self.evals, self.beta = 0, 0, 0.5
        self.seen = np.zeros(2, np.float32)

    def train_step(self, data):
        self.calls += 1  # once per trace: the throwaway trace for the logs, then the loop's
        self.seen += 1.0  # in place
        return {"loss": supervised_update(self, data), "beta": self.beta}  # beta is only read: fine

    def test_step(self, data):
        self.evals += 1
        x, y = data
        per_example = keras.losses.sparse_categorical_crossentropy(y, self.model(x), from_logits=True)
        return {"loss": tf.reduce_mean(per_example)}


def test_a_python_value_the_step_changes_is_named_once_with_the_fix(caplog):
    trainer = make(CountsInPython, eval_every=4)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit(blobs(), blobs(64), steps=8)
    assert trainer.calls == 2 and trainer.seen.tolist() == [2.0, 2.0]  # traces, not the 8 steps
    said = [r.getMessage() for r in caplog.records if "while TensorFlow traced it" in r.getMessage()]
    assert len(said) == 2, said  # the train step's once (over its two traces), the eval step's once
    train, test = said
    assert train.startswith("train_step changed self.calls (0 -> 1), self.seen (a NumPy array, changed in place)")
    assert "self.beta" not in train and "self.calls = tf.Variable(0, trainable=False)" in train, train
    assert "self.calls.assign_add(1)" in train and "once per trace" in train, train
    assert test.startswith("test_step changed self.evals (0 -> 1)"), test

    caplog.clear()  # the default step, deterministic: nothing of this said
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(Trainer, eval_every=4, deterministic=True).fit(blobs(), blobs(64), steps=8)
    assert not [r for r in caplog.records if "traced it" in r.getMessage() or "iterator" in r.getMessage()]


class KeepsATensor(Trainer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.ema = 0.0

    def train_step(self, data):
        loss = supervised_update(self, data)
        self.ema = 0.9 * self.ema + 0.1 * loss
        return {"loss": loss, "ema": self.ema}


class KeepsATensorInComputeLoss(Trainer):
    """The default step, with a compute_loss that keeps the loss on self for the step to read (written, then read, in
    every trace), a flag set at the first trace and a phase's name: correct code, nothing said."""

    def compute_loss(self, x, y, y_pred, sample_weight=None):
        loss = super().compute_loss(x, y, y_pred, sample_weight)
        self.history = [loss]
        self._built_extra = True
        self.phase = "train"
        return loss + 0.0 * self.history[0]


def test_a_tensor_an_earlier_trace_kept_on_self_is_an_error_naming_it(tmp_path, caplog):
    with pytest.raises(ConfigError) as raised:
        make(KeepsATensor, run_dir=tmp_path / "ema").fit(blobs(), steps=2)
    said = str(raised.value)
    assert said.startswith("train_step read a tensor an earlier trace stored on the Trainer: self.ema."), said
    assert "self.ema = tf.Variable(0.0, trainable=False)" in said and "self.ema.assign(" in said, said
    assert not (tmp_path / "ema" / "checkpoints").exists()  # before any step
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(KeepsATensorInComputeLoss, eval_every=2).fit(blobs(), blobs(64), steps=4)
    assert not [r for r in caplog.records if "traced it" in r.getMessage()], caplog.text
