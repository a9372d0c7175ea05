"""trainer/sweep.py without a sweep: folder names and the table from job folders as a sweep leaves them."""
import csv
import json

import pytest

from trainer.sweep import job_folder
from trainer.sweep_table import format_table, summarize


def test_job_folder_names_are_unique_flat_and_bounded():
    assert job_folder(3, "") == "3"
    assert job_folder(0, "trainer.init_from=/a/b,x=1") == "0_trainer.init_from=_a_b,x=1"  # no nested folders
    assert len(job_folder(12, "k=" + "v" * 500)) <= 203


def test_job_folder_names_hold_the_swept_keys_only(tmp_path, monkeypatch):
    """A sweep's recorded swept keys (several values on the command line, or the sweeper's params) name the
    folder; without a record for this sweep folder, every override does (Hydra's override_dirname)."""
    from omegaconf import OmegaConf

    from trainer.sweep import SWEPT_KEYS_ENV, record_swept_keys

    monkeypatch.delenv(SWEPT_KEYS_ENV, raising=False)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {"params": {"seed": "range(0,2)"}},
                                         "overrides": {"task": ["model.hidden_units=[64]", "optimizer.lr=1e-3,1e-2",
                                                                "trainer.log_every=50",
                                                                "+optimizer.clipvalue=0.1,0.5"]}}})
    assert record_swept_keys(config) == ["optimizer.clipvalue", "optimizer.lr", "seed"]
    task = ["model.hidden_units=[64]", "optimizer.lr=0.01", "trainer.log_every=50", "+optimizer.clipvalue=0.5",
            "seed=1"]
    every = "+optimizer.clipvalue=0.5,model.hidden_units=[64],optimizer.lr=0.01,seed=1,trainer.log_every=50"
    assert job_folder(1, every, task, str(tmp_path)) == "1_+optimizer.clipvalue=0.5,optimizer.lr=0.01,seed=1"
    assert job_folder(1, every, task, str(tmp_path / "other")) == "1_" + every  # another sweep's record
    excluded = ["seed", "trainer.progress_bar"]  # hydra.job.config.override_dirname.exclude_keys: still honoured
    assert job_folder(1, every, task, str(tmp_path), excluded) == "1_+optimizer.clipvalue=0.5,optimizer.lr=0.01"


def test_table_reads_each_job_and_keeps_the_overrides_that_differ(tmp_path):
    rows = [{"step": 10, "split": "train", "loss": 1.0}, {"step": 10, "split": "eval", "loss": 0.7},
            {"step": 20, "split": "eval", "loss": 0.9}]
    done = tmp_path / "0_a=1,b=2"
    done.mkdir()
    (done / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (done / "trainer.log").write_text("[trainer.callbacks][INFO] - Done: 20 steps in 1.5s (to step 20).\n")
    (tmp_path / "1_a=1,b=3").mkdir()  # failed before its first log
    (tmp_path / "notajob").mkdir()
    table = summarize(tmp_path, None, "max")  # no best_metric: the loss, lower is better
    assert [(r["job"], r["overrides"], r["status"], r["steps"], r["seconds"]) for r in table] == [
        (0, "b=2", "done", 20, "1.5"), (1, "b=3", "failed", 0, "")]
    assert table[0]["best_loss"] == 0.7 and table[0]["final_loss"] == 0.9
    text = format_table(table)
    assert text.splitlines()[0].split() == ["job", "overrides", "status", "steps", "seconds", "best_loss", "final_loss"]


def test_the_sweeps_best_job_follows_best_mode_auto_as_the_best_checkpoint_does(tmp_path):
    """trainer.best_metric=loss with best_mode's default: the sweep ranked jobs by the largest final loss (max, the
    default before auto), printing the worse job as `Best:`. auto decides as the run's best checkpoint does."""
    import pytest

    from trainer.config import ConfigError, TrainerConfig
    from trainer.sweep import sweep_objective
    from trainer.sweep_table import best_job

    assert sweep_objective(TrainerConfig(best_metric="loss")) == ("loss", "min")
    assert sweep_objective(TrainerConfig(best_metric="val/accuracy")) == ("val/accuracy", "max")
    assert sweep_objective(TrainerConfig(best_metric="loss", best_mode="max")) == ("loss", "max")  # as given
    with pytest.raises(ConfigError, match=r"trainer.best_mode=auto cannot tell whether a larger 'dice' is better. "
                                          r"Fix: trainer.best_mode=min or trainer.best_mode=max."):
        sweep_objective(TrainerConfig(best_metric="dice"))

    for job, final in enumerate([0.9, 0.4]):
        folder = tmp_path / f"{job}_optimizer.lr={job}"
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 20, "split": "eval", "loss": final}) + "\n")
        (folder / "trainer.log").write_text("[trainer.callbacks][INFO] - Done: 20 steps in 1.5s (to step 20).\n")
    metric, mode = sweep_objective(TrainerConfig(best_metric="loss"))
    assert best_job(summarize(tmp_path, metric, mode), metric, mode)["job"] == 1


@pytest.mark.parametrize("best_metric, finals, said", [
    ("val_loss", [{"loss": 0.9}, {"loss": 0.4}], "final val_loss=0.4000 (min)"),  # one eval set: its `loss`
    ("eval/loss", [{"loss": 0.9}, {"loss": 0.4}], "final eval/loss=0.4000 (min)"),
    ("accuracy", [{"val/accuracy": 0.9, "ood/accuracy": 0.1}, {"val/accuracy": 0.4, "ood/accuracy": 0.8}],
     "final accuracy=0.9000 (max)"),  # several sets: the first set's
    # several sets, as the best checkpoint reads them (evalsets.resolve): Keras' val_loss is val/loss, eval/accuracy
    # the first set's accuracy
    ("val_loss", [{"ood/loss": 0.1, "val/loss": 0.9}, {"ood/loss": 0.8, "val/loss": 0.4}],
     "final val_loss=0.4000 (min)"),
    ("eval/accuracy", [{"val/accuracy": 0.9, "ood/accuracy": 0.1}, {"val/accuracy": 0.4, "ood/accuracy": 0.8}],
     "final eval/accuracy=0.9000 (max)"),
])
def test_the_sweeps_table_ranks_the_value_each_job_returned_to_the_sweeper(tmp_path, capsys, best_metric, finals,
                                                                           said):
    """trainer.best_metric=val_loss: each job returned its eval `loss` to the sweeper, but the table looked up a
    `val_loss` no record holds, so it printed no `Best:` line. It reads the key the job's value came from."""
    from omegaconf import OmegaConf

    from trainer.config import TrainerConfig
    from trainer.sweep import BASIC_SWEEPER, job_value
    from trainer.sweep_table import CSV_NAME, SweepSummary

    config = OmegaConf.create({"trainer": OmegaConf.structured(TrainerConfig(best_metric=best_metric, max_steps=20)),
                               "hydra": {"sweep": {"dir": str(tmp_path)}, "sweeper": {"_target_": BASIC_SWEEPER}}})
    returned = []
    for job, final in enumerate(finals):
        folder = tmp_path / f"{job}_optimizer.lr={job}"
        folder.mkdir()
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 20, "split": "eval", **final}) + "\n")
        (folder / "trainer.log").write_text("[trainer.callbacks][INFO] - Done: 20 steps in 1.5s (to step 20).\n")
        returned.append(job_value({"step": 20, **final}, config.trainer)[0])
    SweepSummary().on_multirun_end(config)
    printed = capsys.readouterr().out
    assert f"Best: job {returned.index((min if '(min)' in said else max)(returned))}, {said}: " in printed, printed
    with open(tmp_path / CSV_NAME, newline="") as f:
        column = [row[f"final_{best_metric}"] for row in csv.DictReader(f)]
    assert column == [f"{value:.4f}" for value in returned]  # the values the sweeper was given


def test_a_sweep_of_a_config_without_metrics_ranks_by_the_loss_as_its_best_checkpoints_do():
    """The default best_metric (accuracy) of a config without metrics ranks the best checkpoints by the eval loss
    (callbacks/best_metric.py): the sweep's default objective is the same (it was the accuracy no job logs)."""
    from trainer.config import TrainerConfig
    from omegaconf import OmegaConf

    from trainer.sweep import job_value, metric_names, register_resolver, sweep_objective

    def config(**root):
        return OmegaConf.create({"trainer": {"best_metric": "accuracy", "best_mode": "auto"}, **root})

    bare, scored = config(metrics={}), config(metrics={"accuracy": {}})
    assert sweep_objective(TrainerConfig(), metric_names(bare)) == ("loss", "min")
    assert sweep_objective(TrainerConfig(), metric_names(scored)) == ("accuracy", "max")
    own = config(metrics={}, trainer_class="trainer.recipes.gan.GAN")  # its step may log an accuracy
    assert sweep_objective(TrainerConfig(), metric_names(own)) == ("accuracy", "max")
    assert sweep_objective(TrainerConfig(best_metric="val_loss"), metric_names(bare))[0] == "val_loss"  # as given
    assert job_value({"step": 5, "loss": 0.3}, bare.trainer, metric_names(bare)) == (0.3, None)
    register_resolver()  # Optuna's direction: ${sweep_direction:${trainer}}, the composed config as _root_
    for root, direction in [(bare, "minimize"), (scored, "maximize")]:
        root.direction = "${sweep_direction:${trainer}}"
        assert root.direction == direction
