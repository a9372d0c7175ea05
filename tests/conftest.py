"""Shared helpers: run the real CLI on tiny settings, read what a run wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Shrinking overrides for the real config: a few steps, small batches, no progress bar.
TINY = [
    "trainer.max_steps=40",
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.eval_steps=10",
    "trainer.checkpoint_every=20",
    "trainer.progress_bar=false",
    "data.batch_size=64",
]


def run_cli(*args: str, module: str = "trainer", cwd: Path | None = None, timeout: int = 600, env=None):
    """Runs `python -m trainer ARGS` in a subprocess and returns the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=full_env,
    )


def blobs(n: int = 256, features: int = 4, batch: int = 16, shuffle: bool = False):
    """Two Gaussian blobs as a batched tf.data.Dataset: a tiny, learnable, seeded classification set."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n).astype("int32")
    x = rng.normal(size=(n, features)).astype("float32") + y[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(n, seed=0)
    return ds.batch(batch, drop_remainder=True)


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    """Each test starts from a fresh Keras/TF graph state and the float32 policy: without this, graphs and
    names pile up over the suite (a model conversion took 37 s after 20 tests instead of 4 s alone)."""
    yield
    import keras  # here, not at the top: TF_CPP_MIN_LOG_LEVEL must be set before TensorFlow loads

    keras.mixed_precision.set_dtype_policy("float32")
    keras.backend.clear_session(free_memory=True)
