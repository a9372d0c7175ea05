"""Monitored names (trainer.best_metric, early stopping, ReduceLROnPlateau): a wrong name is one error with the
name meant, no log line first that takes it for a good one. Tiny models through the public API."""
from __future__ import annotations

import logging

import pytest

from conftest import TINY, blobs, run_cli


def classifier(callbacks=(), **options):
    import keras

    from trainer import Trainer

    defaults = dict(log_every=5, eval_every=5, checkpoint_every=5, progress_bar=False, tensorboard=False, verbose=False)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.05),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                   callbacks=list(callbacks), **{**defaults, **options})


def said(caplog, text: str):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("where", ["best_metric", "early_stopping"])
def test_a_misspelt_val_name_is_only_an_error_not_first_read_as_the_sets_metric(tmp_path, caplog, where):
    """`val_acuracy` was logged as "the one eval set's 'acuracy'" (INFO) just before the error saying no such
    result exists: only the error is said now; a good `val_accuracy` is still explained in the log."""
    from trainer import EarlyStopping
    from trainer.config import ConfigError

    def make(name):
        if where == "best_metric":
            return classifier(run_dir=tmp_path / name, best_metric=name)
        return classifier([EarlyStopping(monitor=name)])

    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(ConfigError, match="did you mean"):
        make("val_acuracy").fit(blobs(), blobs(64), steps=5)
    assert not said(caplog, "the one eval set's"), caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        make("val_accuracy").fit(blobs(), blobs(64), steps=5)
    assert said(caplog, "='val_accuracy': the one eval set's 'accuracy'")


def test_a_misspelt_bare_name_with_several_sets_is_not_first_said_to_be_judged_on_the_first(caplog):
    from trainer import EarlyStopping
    from trainer.errors import UserError

    sets = {"val": blobs(64), "ood": blobs(64, shuffle=True)}
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(UserError, match="did you mean 'val/accuracy'"):
        classifier([EarlyStopping(monitor="acuracy")]).fit(blobs(), sets, steps=5)
    assert not said(caplog, "judged on the first"), caplog.text


def test_cli_a_misspelt_val_monitor_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, "callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val_acuracy",
                     f"hydra.run.dir={run_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "did you mean" in output and "the one eval set's" not in output and "Traceback" not in output


@pytest.mark.parametrize("where, name, meant", [
    ("early_stopping", "acc", "accuracy"),  # Keras 2's names
    ("early_stopping", "val_acc", "val_accuracy"),
    ("best_metric", "val_acc", "val_accuracy"),
    ("best_metric", "sparse_categorical_accuracy", "accuracy"),  # Keras' name for a metric made without name=
    ("early_stopping", "acuracy", "accuracy"),  # a close spelling, as before
    ("plateau", "train/learning_rate", "train/lr"),
    ("sets", "acc", "val/accuracy"),
    ("sets", "ood/acc", "ood/accuracy"),
])
def test_a_wrong_name_is_told_the_result_it_means_by_another_tools_name_too(tmp_path, where, name, meant):
    from trainer import EarlyStopping, ReduceLROnPlateau
    from trainer.errors import UserError

    eval_data = {"val": blobs(64), "ood": blobs(64, shuffle=True)} if where == "sets" else blobs(64)
    if where == "best_metric":
        trainer = classifier(run_dir=tmp_path, best_metric=name)
    else:
        callback = ReduceLROnPlateau(monitor=name, mode="min") if where == "plateau" else EarlyStopping(monitor=name)
        trainer = classifier([callback])
    with pytest.raises(UserError) as raised:
        trainer.fit(blobs(), eval_data, steps=5)
    assert f"did you mean {meant!r}?" in str(raised.value), str(raised.value)
    assert int(trainer.step.numpy()) == 0


def test_a_sweep_metric_by_keras_2s_name_is_told_the_name_meant():
    from omegaconf import OmegaConf

    from trainer.config import ConfigError
    from trainer.sweep import check_sweep_metric

    with pytest.raises(ConfigError, match="did you mean 'val_accuracy'"):
        check_sweep_metric(OmegaConf.create({"trainer": {"sweep_metric": "val_acc"}, "metrics": {"accuracy": {}}}))
