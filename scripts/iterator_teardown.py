#!/usr/bin/env python
"""What destroying a tf.data iterator costs, and what the Trainer's release thread saves.

With tf.data autotuning on (the default), an iterator's destruction can wait for the autotuner's next
wake-up: 10 ms after the iterator was made, then at doubling periods up to 60 s. Two measurements,
each side by side in one process:

  1. raw tf.data: an iterator over cached in-memory batches, consumed by a matmul "step" for ~2-3 s,
     then deleted: seconds the deletion takes, with autotuning on and off (`--rounds` each, interleaved).
  2. Trainer.evaluate() on a small MLP, `--rounds` times: the finished iterator dropped in the calling
     thread (what a plain loop does) vs handed to the Trainer's release thread (what it does).

Usage: python scripts/iterator_teardown.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def raw_deletion(rounds: int) -> dict:
    import tensorflow as tf

    batches = np.random.default_rng(0).random((8, 512, 784), dtype=np.float32)
    a = tf.random.normal((2048, 2048))

    @tf.function
    def step(b):
        return tf.reduce_sum(tf.matmul(a, a)) + tf.reduce_sum(b)

    def dataset(autotune: bool):
        options = tf.data.Options()
        options.autotune.enabled = autotune
        return tf.data.Dataset.from_tensor_slices(batches).cache().repeat().prefetch(2).with_options(options)

    out = {True: [], False: []}
    for r in range(rounds):
        for autotune in (True, False):
            iterator = iter(dataset(autotune))
            for _ in range(30 + 5 * r):
                step(next(iterator)).numpy()
            t = time.perf_counter()
            del iterator
            out[autotune].append(time.perf_counter() - t)
    return out


def evaluate_release(rounds: int) -> dict:
    import keras
    import tensorflow as tf

    import trainer.core as core
    from trainer import Trainer
    from trainer.data import release_in_background

    rng = np.random.default_rng(0)
    x = rng.random((24 * 512, 784), dtype=np.float32)
    y = rng.integers(0, 10, 24 * 512).astype("int32")

    def build():
        inputs = keras.Input((784,))
        h = keras.layers.Dense(2048, activation="relu")(inputs)
        h = keras.layers.Dense(2048, activation="relu")(h)
        return keras.Model(inputs, keras.layers.Dense(10)(h))

    t = Trainer(model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.Adam(1e-3), progress_bar=False, tensorboard=False)
    t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(512).repeat(), steps=2)
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(512).prefetch(tf.data.AUTOTUNE)  # autotuning on
    t.evaluate(data)  # trace
    modes = {"calling thread": lambda holder: holder.clear(), "release thread": release_in_background}
    out = {name: [] for name in modes}
    for _ in range(rounds):
        for name, release in modes.items():  # interleaved
            core.release_in_background = release
            s = time.perf_counter()
            t.evaluate(data)
            out[name].append(time.perf_counter() - s)
    core.release_in_background = release_in_background
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)

    raw = raw_deletion(args.rounds)
    print("1. deleting a tf.data iterator after 30-65 steps (seconds per deletion):")
    for autotune in (True, False):
        d = raw[autotune]
        print(f"   autotuning {'on ' if autotune else 'off'}: {' '.join(f'{v:.3f}' for v in d)}  "
              f"(total {sum(d):.2f} s, {sum(v > 0.05 for v in d)}/{len(d)} over 50 ms)")
    ev = evaluate_release(args.rounds)
    print("2. Trainer.evaluate() over 24 batches, autotuned pipeline (seconds per call):")
    for name, d in ev.items():
        print(f"   finished iterator dropped on the {name}: {' '.join(f'{v:.2f}' for v in d)}  "
              f"(median {statistics.median(d):.2f} s, total {sum(d):.2f} s)")


if __name__ == "__main__":
    main()
