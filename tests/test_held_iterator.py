"""A second data stream the step reads itself (FixMatch's unlabelled batches, through an iterator the Trainer subclass
holds): its position is in every checkpoint, so a resumed run reads on where the run stopped (it read again from the
start, silently); one TensorFlow cannot save (a dataset running Python) is said, an error under deterministic=true."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import Trainer
from trainer.config import ConfigError

UNLABELLED = np.random.default_rng(1).normal(size=(200, 4)).astype("float32")


def unlabelled(python: bool = False):
    """Rows of UNLABELLED with their index, batched by 8 (a prefetch buffer too): the index says where it reads."""
    if python:
        rows = tf.data.Dataset.from_generator(lambda: iter(range(200)), output_signature=tf.TensorSpec((), tf.int64))
        rows = rows.map(lambda i: (tf.gather(UNLABELLED, i), i))
    else:
        rows = tf.data.Dataset.from_tensor_slices((UNLABELLED, tf.range(200, dtype=tf.int64)))
    return rows.repeat().batch(8).prefetch(2)


class PseudoLabels(Trainer):
    def __init__(self, python=False, **options):
        super().__init__(**options)
        self.unlabelled = iter(unlabelled(python))

    def train_step(self, data):
        x, y = data
        u, index = next(self.unlabelled)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, self.model(x), from_logits=True))
            guess = tf.stop_gradient(tf.argmax(self.model(u), -1))
            loss += 0.5 * tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(guess, self.model(u),
                                                                                     from_logits=True))
        self.update(loss, tape)
        return {"loss": loss, "unlabelled_row": tf.cast(index[0], tf.float32)}


def pseudo_labels(run_dir, python=False, deterministic=True):
    return PseudoLabels(python, model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                        optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, checkpoint_every=5,
                        log_every=5, deterministic=deterministic, verbose=False)


def test_a_held_data_iterator_is_saved_and_a_resume_reads_on_where_the_run_stopped(tmp_path, caplog):
    whole = pseudo_labels(tmp_path / "whole")
    with caplog.at_level(logging.INFO, logger="trainer"):
        whole_logs = whole.fit(blobs(), steps=20)
    assert "self.unlabelled (tf.data iterator: its position and buffers)" in caplog.text
    pseudo_labels(tmp_path / "resumed").fit(blobs(), steps=10)
    resumed = pseudo_labels(tmp_path / "resumed")
    resumed_logs = resumed.fit(blobs(), steps=20)
    assert resumed.weights_fingerprint() == whole.weights_fingerprint()
    # the last window (steps 16-20) read rows from 120 on, the mean of its first rows: 8 * 17 (not 8 * 7)
    assert resumed_logs["unlabelled_row"] == whole_logs["unlabelled_row"] == 8 * 17
    saved = dict(tf.train.list_variables(str(tmp_path / "whole" / "checkpoints")))
    assert any(key.startswith("held/unlabelled/") for key in saved)


def test_an_iterator_no_checkpoint_can_hold_is_said_and_an_error_when_deterministic(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer"):
        pseudo_labels(tmp_path / "said", python=True, deterministic=False).fit(blobs(), steps=5)
    warned = [r.getMessage() for r in caplog.records if "cannot be saved" in r.getMessage()]
    assert len(warned) == 1 and "self.unlabelled" in warned[0]
    assert "Fix: zip it into the data given to fit()" in warned[0]
    with pytest.raises(ConfigError, match="deterministic=true.*self.unlabelled.*from_generator"):
        pseudo_labels(tmp_path / "refused", python=True).fit(blobs(), steps=5)
    checkpoints = tmp_path / "refused" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # refused before any save


def test_a_stateful_random_op_is_named_and_lr_find_leaves_such_an_iterator_alone(tmp_path, caplog):
    from trainer.lr_finder import lr_find

    class RandomCrops(PseudoLabels):
        def __init__(self, **options):
            super().__init__(**options)
            rows = tf.data.Dataset.from_tensor_slices((UNLABELLED, tf.range(200, dtype=tf.int64)))
            self.unlabelled = iter(rows.map(lambda u, i: (u + tf.random.uniform((4,)), i)).repeat().batch(8))

    trainer = RandomCrops(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                          optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path, verbose=False)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit(blobs(), steps=2)
    assert "cannot be saved: self.unlabelled (RandomUniform is stateful)" in caplog.text
    assert "tf.random.stateless_*" in caplog.text
    assert len(lr_find(trainer, blobs(), steps=15, min_lr=1e-4, max_lr=1e-2).lrs) > 0  # its snapshot: no iterator


def test_an_iterator_replaced_between_fit_calls_is_the_one_the_step_reads_and_saves(tmp_path):
    trainer = pseudo_labels(tmp_path)
    assert trainer.fit(blobs(), steps=5)["unlabelled_row"] == 16  # rows 0, 8, .. 32: their mean
    trainer.unlabelled = iter(unlabelled())  # from its start again
    assert trainer.fit(blobs(), steps=10)["unlabelled_row"] == 16  # read the new one (56 from the old)
