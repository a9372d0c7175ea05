"""hydra/sweeper=optuna: the real plugin and the real CLI on tiny MNIST runs. Each trial's value is the job's
final trainer.sweep_metric, as its metrics.jsonl has it, optimized in that metric's direction; a failed job is
a failed trial; the sweep ends with its table and the best job's command; without the plugin, the install line."""
import csv
import math
import re
import shlex
import sys

import pytest

from conftest import read_metrics, run_cli
from trainer.config import ConfigError, TrainerConfig
from trainer.sweep import job_value, sweep_direction, sweep_objective

SMALL_MODEL = "model.hidden_units=[16]"


def optuna_sweep(tmp_path, tiny, *overrides):
    """Runs the sweep with a seeded sampler and a study kept in SQLite; returns (result, sweep folder, study)."""
    optuna = pytest.importorskip("optuna")
    sweep, storage = tmp_path / "sweep", f"sqlite:///{tmp_path / 'optuna.db'}"
    result = run_cli("-m", "hydra/sweeper=optuna", *overrides, "hydra.sweeper.sampler.seed=0",
                     f"hydra.sweeper.storage={storage}",
                     "hydra.sweeper.study_name=test", *tiny, SMALL_MODEL, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result, sweep, optuna.load_study(study_name="test", storage=storage)


def job_of(sweep, trial):
    (folder,) = sweep.glob(f"{trial.number}_*")  # a fresh study: trial number = job number
    assert f"optimizer.lr={trial.params['optimizer.lr']}" in (folder / ".hydra" / "overrides.yaml").read_text()
    return folder


def final_eval(folder, metric):
    return [r for r in read_metrics(folder) if r["split"] == "eval"][-1][metric]


def best_line(stdout):
    """`Best: job N, final METRIC=VALUE (MODE): COMMAND` -> (N, COMMAND)."""
    match = re.search(r"^Best: job (\d+), final \w+=[\d.]+ \((?:max|min)\): (.+)$", stdout, re.M)
    assert match, stdout[-2000:]
    return int(match.group(1)), match.group(2)


def test_the_objective_follows_sweep_metric_best_metric_and_their_modes():
    assert sweep_objective(TrainerConfig()) == ("accuracy", "max")  # the recipe's best_metric
    assert sweep_objective(TrainerConfig(best_metric=None)) == ("loss", "min")
    assert sweep_objective(TrainerConfig(sweep_metric="loss")) == ("loss", "min")
    assert sweep_objective(TrainerConfig(best_metric="loss", best_mode="min", sweep_metric="loss")) == ("loss", "min")
    assert sweep_objective(TrainerConfig(sweep_metric="auc", sweep_mode="max")) == ("auc", "max")
    with pytest.raises(ConfigError, match="trainer.sweep_mode=max or trainer.sweep_mode=min"):
        sweep_objective(TrainerConfig(sweep_metric="auc"))
    assert [sweep_direction(TrainerConfig(sweep_metric=m)) for m in ("accuracy", "loss")] == ["maximize", "minimize"]
    logs = {"loss": 0.5, "accuracy": 0.75, "step": 40}
    assert job_value(logs, TrainerConfig(sweep_metric="loss")) == (0.5, None)
    value, problem = job_value(logs, TrainerConfig(sweep_metric="auc", sweep_mode="max"))
    assert math.isnan(value) and "'auc' is not in the run's final logs (loss, accuracy)" in problem
    assert "cannot rank" in job_value({"loss": math.nan}, TrainerConfig(sweep_metric="loss"))[1]


@pytest.mark.slow
def test_an_optuna_sweep_maximizes_the_recipes_metric_and_ends_with_its_trials(tmp_path, tiny):
    import matplotlib.image

    from trainer.plot import main as plot_main

    result, sweep, study = optuna_sweep(tmp_path, tiny, "optimizer.lr=tag(log,interval(1e-5,1e-2))",
                                        "hydra.sweeper.n_trials=3")
    assert study.direction.name == "MAXIMIZE"  # recipe=mnist keeps its best checkpoint by accuracy
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert len({t.params["optimizer.lr"] for t in study.trials}) == 3
    for trial in study.trials:
        assert 1e-5 <= trial.params["optimizer.lr"] <= 1e-2
        assert trial.value == pytest.approx(final_eval(job_of(sweep, trial), "accuracy"), abs=1e-12)

    table = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [(int(r["job"]), r["status"]) for r in table] == [(0, "done"), (1, "done"), (2, "done")]
    for row, trial in zip(table, study.trials):
        assert row["overrides"] == f"optimizer.lr={trial.params['optimizer.lr']}"  # what differs: the params
        assert float(row["final_accuracy"]) == round(trial.value, 4)
    number, command = best_line(result.stdout)
    assert number == study.best_trial.number and command == table[number]["command"]
    assert [r["best"] for r in table] == [str(job == number) for job in range(3)]
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "trainer"] and f"optimizer.lr={study.best_trial.params['optimizer.lr']}" in argv
    assert SMALL_MODEL in argv and not any(a.startswith(("hydra", "-m")) for a in argv[3:])  # a single run of it

    # Each job's summary points to trainer.plot; the sweep folder stands for its three jobs.
    job = job_of(sweep, study.trials[0])
    plot_command = re.search(r"Plot: (python -m trainer\.plot .+)", (job / "trainer.log").read_text()).group(1)
    assert shlex.split(plot_command)[3] == str(job)
    plot_main([str(sweep), "--out", str(tmp_path / "sweep.png")])
    image = matplotlib.image.imread(tmp_path / "sweep.png")
    # loss, accuracy and lr (the trials differ in it) panels
    assert image.shape[:2] == (780, 800) and image[..., :3].std() > 0.05


@pytest.mark.slow  # the default stage: the Optuna sweep above (the plugin's wiring, the table, the best job),
# test_cli.py's multirun whose failed job fails alone, the objective's min/max test at the top
def test_a_diverging_trial_fails_alone_and_a_loss_is_minimized(tmp_path, tiny):
    result, sweep, study = optuna_sweep(tmp_path, tiny, "optimizer.lr=choice(0.001,10000000.0)",
                                        "trainer.sweep_metric=loss", "hydra.sweeper.n_trials=2")
    assert study.direction.name == "MINIMIZE"
    states = {t.params["optimizer.lr"]: t.state.name for t in study.trials}
    assert states == {0.001: "COMPLETE", 10000000.0: "FAIL"}  # the seeded sampler tries both
    (done,) = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert done.value == pytest.approx(final_eval(job_of(sweep, done), "loss"), abs=1e-12)
    assert "Failed experiment: exit code 3 as a single run: NumericalError" in result.stdout + result.stderr
    table = {int(r["job"]): r for r in csv.DictReader((sweep / "sweep_summary.csv").open())}
    assert {t.number: table[t.number]["status"] for t in study.trials} == {
        t.number: "done" if t.number == done.number else "failed" for t in study.trials}
    assert best_line(result.stdout)[0] == done.number


def test_without_the_plugin_hydra_sweeper_optuna_says_how_to_install_it(tmp_path, monkeypatch):
    """Without the plugin (hidden: importing it raises ImportError, as when it is not installed)."""
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_optuna_sweeper", None)
    sweep = tmp_path / "sweep"
    result = run_cli("-m", "hydra/sweeper=optuna", "optimizer.lr=tag(log,interval(1e-5,1e-2))",
                     f"hydra.sweep.dir={sweep}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "hydra/sweeper=optuna needs the Hydra plugin hydra_plugins.hydra_optuna_sweeper, which is not installed. " \
           "Fix: pip install -e '.[sweep]'" in result.stderr
    assert "Traceback" not in result.stderr and not sweep.exists()
