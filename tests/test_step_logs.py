"""What an overridden step returns as logs is checked where it is traced: a log that is not one number is named,
with its shape and the fix; found at the first evaluation, the steps trained since the last checkpoint are saved
before the error ends fit()."""
import json

import keras
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import Trainer
from trainer.errors import UserError


class PerClassRecall(Trainer):
    """A test_step that logs a vector: the recall of each class in one log."""

    def test_step(self, data):
        x, y = data
        predicted = tf.argmax(self.model(x, training=False), axis=1, output_type=tf.int32)
        recalls = [tf.reduce_sum(tf.cast((y == c) & (predicted == c), tf.float32))
                   / tf.maximum(tf.reduce_sum(tf.cast(y == c, tf.float32)), 1.0) for c in range(2)]
        return {"recall_0": recalls[0], "recall_vec": tf.stack(recalls)}


def make(cls, run_dir=None):
    return cls(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=run_dir, eval_every=6, checkpoint_every=4,
               best_metric=None, progress_bar=False, verbose=False)


def test_a_vector_eval_log_is_named_with_its_shape_and_the_trained_steps_are_saved_first(tmp_path):
    with pytest.raises(UserError) as raised:
        make(PerClassRecall, tmp_path).fit(blobs(), blobs(), steps=10)
    said = str(raised.value)
    assert "test_step returned 'recall_vec' of shape (2,)" in said and "'recall_0'" not in said, said  # no dict dump
    assert "tf.reduce_mean" in said and "{'recall_vec_0': v[0]" in said, said
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-6")  # not only ckpt-4
    resumed = make(Trainer, tmp_path)
    resumed.fit(blobs(), blobs(), steps=10)  # the same run, its test_step fixed (the default one here)
    assert int(resumed.step.numpy()) == 10
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if row.get("split") == "eval"] == [6, 10]  # step 6's, evaluated at the resume


class LogsPerExample(Trainer):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            per_example = keras.losses.sparse_categorical_crossentropy(y, self.model(x, training=True),
                                                                       from_logits=True)
            loss = tf.reduce_mean(per_example)
        self.update(loss, tape)
        return {"loss": loss, "per_example": per_example}


def test_a_train_log_per_example_is_refused_before_a_step_with_its_shape(tmp_path):
    with pytest.raises(UserError, match=r"train_step returned 'per_example' of shape \(16,\), but a log is one "
                                        r"number per step.*tf\.reduce_mean"):
        make(LogsPerExample, tmp_path).fit(blobs(), steps=2)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")) is None
