"""A training process for kill/resume tests: a data set of unique ids, each step logs the ids it trains on.

Usage: python ids_worker.py RUN_DIR LOG_FILE STEPS [CHECKPOINT_EVERY]
Each line of LOG_FILE is "<step index> <ids of that batch>"; a step redone after a kill appears again,
and the last occurrence is the one that counts.
"""
import sys

import keras
import numpy as np
import tensorflow as tf

from trainer import Trainer

N_IDS, BATCH = 96, 8  # 12 steps per epoch


def data(ctx=None):
    ids = tf.data.Dataset.range(N_IDS)
    ds = ids.shuffle(N_IDS, seed=7, reshuffle_each_iteration=True)
    ds = ds.map(lambda i: ({"id": i, "x": tf.stack([tf.cast(i, tf.float32) / N_IDS, tf.cast(i % 7, tf.float32)])},
                           i % 2))
    return ds.batch(BATCH, drop_remainder=True).repeat().prefetch(2)


class LoggingTrainer(Trainer):
    def train_step(self, data):
        features, _ = data
        tf.print(self.step, features["id"], output_stream=f"file://{sys.argv[2]}", summarize=-1)
        super().train_step(data)


def model():
    inputs = {"id": keras.Input((), dtype="int64", name="id"), "x": keras.Input((2,), name="x")}
    hidden = keras.layers.Dense(8, activation="relu")(inputs["x"])
    hidden = keras.layers.Dropout(0.2)(hidden)
    return keras.Model(inputs, keras.layers.Dense(2, dtype="float32")(hidden))


if __name__ == "__main__":
    run_dir, steps = sys.argv[1], int(sys.argv[3])
    every = int(sys.argv[4]) if len(sys.argv) > 4 else 5
    trainer = LoggingTrainer(
        model=model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, progress_bar=False,
        tensorboard=False, checkpoint_every=every, log_every=every, deterministic=True, seed=3,
    )
    trainer.fit(data, steps=steps)
    np.savez(f"{run_dir}/final_weights.npz", *[v.numpy() for v in trainer.model.weights])
