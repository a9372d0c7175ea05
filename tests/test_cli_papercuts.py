"""Papercuts a new user of the command line hit (a run folder reused, a sweep stopped, entry points' checks, logs
printed twice): each a cheap regression test of the real entry point, in this process, on tiny settings."""
import csv
import os
import re
import shlex
import signal

from conftest import TINY, read_metrics, run_cli
from trainer import Callback


def test_a_run_folder_reused_with_another_recipe_names_the_recipes_not_frozen(tmp_path):
    """A CLI user never set Trainer(frozen=...): the checkpoint's misfit is said as the recipe/model the folder's run
    had and this command's, with the fixes (another hydra.run.dir, or that run's recipe)."""
    run = tmp_path / "run"
    assert run_cli(*TINY, "trainer.max_steps=20", "trainer.eval_steps=1", "model.hidden_units=[8]",
                   f"hydra.run.dir={run}").returncode == 0
    result = run_cli("recipe=gan", *TINY, "trainer.max_steps=25", f"hydra.run.dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    err = result.stdout + result.stderr
    assert "holds a run of recipe=mnist model=mnist_mlp" in err and "this command runs recipe=gan model=gan" in err
    assert "another hydra.run.dir=" in err and "resume that run with recipe=mnist model=mnist_mlp" in err
    assert "frozen=" not in err and "Traceback" not in err
    assert read_metrics(run)[-1]["step"] == 20  # the run folder is left as it was

    other_model = run_cli(*TINY, "trainer.max_steps=25", "model=mnist_cnn", f"hydra.run.dir={run}")
    err = other_model.stdout + other_model.stderr
    assert other_model.returncode == 2 and f"The run folder {run} holds a run of recipe=mnist model=mnist_mlp" in err
    assert re.search(r"another model \([^)]*checkpoint \[", err), err[-3000:]  # the shapes that differ
    assert f"trainer.init_from={run} (a warm start: weights only)" in err


class TermOnce(Callback):
    """Sends SIGTERM to this process at the end of the loop of `step`, once per test process (the resumed sweep runs
    in the same process)."""
    sent = False

    def __init__(self, step):
        self.step = step

    def on_loop_end(self, trainer, step):
        if step == self.step and not TermOnce.sent:
            TermOnce.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_sweep_a_signal_stops_writes_its_table_and_says_the_command_that_resumes_every_job(tmp_path):
    """The sweep exited 143 with no sweep_summary.csv, and its "to resume, run:" line resumed job 0 alone (job 1
    never ran). The table of the jobs so far is written, and the sweep's own command, run again, finishes both.
    Over a list-valued key, with numbered job folders (TensorFlow reads `[8]` in a path as a glob pattern, see
    docs/sweeps.md): an interpolation among the overrides made every job fail when the command was made."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", *TINY, "trainer.eval_steps=1", "model.hidden_units=[8],[16]",
                     "hydra.sweep.subdir=${hydra.job.num}", "+callbacks.term._target_=test_cli_papercuts.TermOnce",
                     "+callbacks.term.step=20",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 143, out[-3000:]
    with (sweep / "sweep_summary.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["job"] == "0" and row["status"] == "interrupted" and row["steps"] == "20"
    resume = re.search(r"to resume, run: (.*)", out).group(1)
    assert "-m " in resume and "'model.hidden_units=[8],[16]'" in resume and f"hydra.sweep.dir={sweep}" in resume
    assert "'hydra.sweep.subdir=${hydra.job.num}'" in resume
    assert f"to resume the whole sweep, run: {resume}" in out

    again = run_cli(*shlex.split(resume)[3:], cwd=tmp_path)  # after `python -m trainer`
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    with (sweep / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["steps"]) for r in rows] == [("0", "done", "40"), ("1", "done", "40")]
    assert [r["overrides"] for r in rows] == ["model.hidden_units=[8]", "model.hidden_units=[16]"]

    # Run once more, every job finished: each says so (no "nothing to train" warning), and keeps its time.
    third = run_cli(*shlex.split(resume)[3:], cwd=tmp_path)
    out = third.stdout + third.stderr
    assert third.returncode == 0 and out.count("This sweep job is complete (step 40 of 40)") == 2, out[-3000:]
    assert "(a total) to train as much again" not in out
    with (sweep / "sweep_summary.csv").open() as f:
        assert [r["seconds"] for r in csv.DictReader(f)] == [r["seconds"] for r in rows]
