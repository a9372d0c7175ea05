"""Papercuts a new user hit trying the documented features: each a cheap regression test."""
import keras
import pytest

from tests.conftest import blobs
from trainer import Trainer


def _trainer(**options):
    return Trainer(
        model=lambda: keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
        log_every=5, **options,
    )


def test_verbose_false_prints_no_eval_bar(capfd):
    """verbose=False: neither the train bar nor the eval bar ('eval: 8batch [...]') reaches the terminal."""
    logs = _trainer(verbose=False).fit(blobs(), blobs(128), steps=10)
    err = capfd.readouterr().err
    assert "loss" in logs
    assert "eval:" not in err and "batch" not in err and "train:" not in err, err[-2000:]
