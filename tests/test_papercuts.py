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


def test_a_sweep_metric_the_run_does_not_log_fails_before_the_first_job(tmp_path):
    """Not 'set trainer.sweep_mode', nor trials that train and then fail: exit 2 naming what the run logs."""
    from tests.conftest import run_cli

    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/sweeper=optuna", "recipe=mnist", "trainer.sweep_metric=val_acc",
                     "hydra.sweeper.n_trials=2", "optimizer.lr=interval(1e-3,1e-2)", f"hydra.sweep.dir={sweep}",
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "trainer.sweep_metric=val_acc" in result.stderr and "loss, accuracy" in result.stderr, result.stderr[-3000:]
    assert "sweep_mode" not in result.stderr and "Traceback" not in result.stderr
    assert not sweep.exists() or not any(sweep.glob("*/metrics.jsonl"))  # no trial ran


def test_a_recipe_step_may_log_other_names_so_only_a_warning(caplog):
    from omegaconf import OmegaConf

    from trainer.config import ConfigError
    from trainer.sweep import check_sweep_metric

    cfg = OmegaConf.create({"trainer": {"sweep_metric": "d_loss"}, "metrics": {},
                            "trainer_class": "recipes.gan.GanTrainer"})
    check_sweep_metric(cfg)  # the GAN's step logs d_loss: a warning only
    assert "d_loss" in caplog.text and "trainer_class=recipes.gan.GanTrainer" in caplog.text
    check_sweep_metric(OmegaConf.create({"trainer": {"sweep_metric": "accuracy"}, "metrics": {"accuracy": {}}}))
    with pytest.raises(ConfigError, match="logs no 'acc'.*loss, accuracy"):
        check_sweep_metric(OmegaConf.create({"trainer": {"sweep_metric": "acc"}, "metrics": {"accuracy": {}}}))


@pytest.mark.parametrize("given, expected", [
    ("trainer.profile_steps=5", "trainer.profile_steps takes two steps: trainer.profile_steps=[N,M]"),
    ("logger=[jsonl,cvs]", "no logger named 'cvs'. Fix: did you mean logger=[jsonl,csv]? Or choose from csv, jsonl, "
                           "mlflow, tensorboard, wandb"),
])
def test_overrides_hydra_rejects_without_a_fix_exit_2_with_one(given, expected, monkeypatch, capsys):
    """Hydra's "int is not a ListConfig" / "Could not load 'logger/cvs'" (exit 1, no options) become exit 2."""
    from trainer.cli import main

    monkeypatch.setattr("sys.argv", ["trainer", "recipe=mnist", given])
    with pytest.raises(SystemExit) as exited:
        main()
    assert exited.value.code == 2 and expected in capsys.readouterr().err


def test_good_list_overrides_pass_the_check():
    from trainer.argv_check import problem_in

    assert problem_in(["logger=[jsonl,csv]", "trainer.profile_steps=[1,2]", "trainer.profile_steps=null",
                       "model.hidden_units=[64,32]"]) is None
    assert "no logger named 'cvs'" in problem_in(["-m", "logger=[jsonl],[cvs]"])  # each choice of a sweep


@pytest.mark.parametrize("command", ["trainer.doctor.__main__", "trainer.lr_find"])
def test_the_commands_taking_a_runs_overrides_say_a_mistake_as_the_run_does(command, capsys):
    """The doctor and lr_find printed Hydra's text after loading TensorFlow; now python -m trainer's line."""
    import importlib

    main = importlib.import_module(command).main
    assert main(["optimizer=sgd", "optimizer.learning_rate=0.1"]) == 2
    assert "optimizer.learning_rate=0.1: optimizer has no key 'learning_rate'. Fix: did you mean optimizer.lr=0.1?" \
        in capsys.readouterr().err


def test_resuming_with_another_use_ema_names_it_and_export_loading_is_no_warm_start(tmp_path, caplog):
    import logging

    from trainer.checkpoint import CheckpointError
    from trainer.load_weights import warm_start

    run = tmp_path / "run"
    first = _trainer(verbose=False, run_dir=run, checkpoint_every=2)
    first.fit(blobs(), steps=2)
    averaged = Trainer(model=lambda: keras.Sequential([keras.layers.Dense(8, activation="relu"),
                                                       keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.Adam(1e-2, use_ema=True), run_dir=run, verbose=False)
    with pytest.raises(CheckpointError, match="optimizer.use_ema"):
        averaged.fit(blobs(), steps=4)
    with caplog.at_level(logging.INFO, logger="trainer"):
        warm_start(first.model, str(run / "checkpoints"), purpose="Loading weights")  # as export and doctor load
    assert "Loading weights from" in caplog.text and "Warm start" not in caplog.text
