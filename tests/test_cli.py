"""The real CLI end to end on Fashion-MNIST (real data, offline), on tiny settings."""
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tensorflow as tf

from conftest import TINY, read_metrics, run_cli, wait_until


def _tensorboard_tags(folder: Path):
    tags = set()
    for event_file in folder.rglob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


def _trainers_alive() -> int:
    import gc

    from trainer.trainer import Trainer

    return sum(isinstance(o, Trainer) for o in gc.get_objects())


def test_short_run_learns_and_writes_run_folder(tmp_path):
    run_dir = tmp_path / "run"
    alive = _trainers_alive()
    result = run_cli(
        "trainer.max_steps=300",
        "trainer.log_every=50",
        "trainer.eval_every=150",
        "trainer.checkpoint_every=150",
        "trainer.progress_bar=false",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The CLI freed its Trainer when the run was done: its own reference cycles kept it (and its train iterator,
    # whose teardown the exit waited for) alive until the exit hook, which told the user to `del trainer`.
    assert _trainers_alive() == alive
    out = result.stdout + result.stderr
    assert "fashion_mnist from" in out  # says plainly which data it uses

    rows = read_metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [50, 100, 150, 200, 250, 300]
    assert [r["step"] for r in evals] == [150, 300]
    for r in train:
        assert {"loss", "accuracy", "examples_per_sec", "grad_norm", "lr"} <= r.keys()
        assert r["examples_per_sec"] > 0
    assert train[-1]["loss"] < 0.75 * train[0]["loss"]
    assert evals[-1]["accuracy"] > 0.75  # chance is 0.10

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "ckpt-150.index").exists() and (ckpts / "ckpt-300.index").exists()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert {"loss", "accuracy", "examples_per_sec"} <= _tensorboard_tags(run_dir / "tensorboard" / "train")
    assert {"loss", "accuracy"} <= _tensorboard_tags(run_dir / "tensorboard" / "eval")
    assert "Final eval" in out and f"Run folder: {run_dir}" in out

    # The same command again: the run is finished, so nothing is trained, logged or saved anew.
    again = run_cli("trainer.max_steps=300", "trainer.log_every=50", "trainer.eval_every=150",
                    "trainer.checkpoint_every=150", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already at step 300 of 300: nothing to train" in again.stdout + again.stderr
    assert read_metrics(run_dir) == rows


def test_multirun_two_jobs(tmp_path, tiny):
    """Job folders are named by their swept overrides; the sweep ends with a table of the jobs, also as CSV."""
    sweep = tmp_path / "sweep"
    tiny = [o if o != "trainer.eval_every=0" else "trainer.eval_every=20" for o in tiny]
    result = run_cli("-m", "optimizer.lr=1e-3,3e-4", *tiny, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {}
    for num, lr in ((0, "0.001"), (1, "0.0003")):  # as Hydra's sweeper spells the values
        (folder,) = sweep.glob(f"{num}_*")
        assert folder.name == f"{num}_optimizer.lr={lr}", folder.name  # the swept key only, not the shrinking overrides
        rows = read_metrics(folder)
        assert rows[-1]["step"] == 40
        assert (folder / "checkpoints" / "ckpt-40.index").exists()
        jobs[lr] = (folder, rows)
    assert {lr: round(rows[0]["lr"], 6) for lr, (_, rows) in jobs.items()} == {"0.001": 0.001, "0.0003": 0.0003}

    import csv

    table = list(csv.DictReader((sweep / "sweep_summary.csv").open()))
    assert [r["overrides"] for r in table] == ["optimizer.lr=0.001", "optimizer.lr=0.0003"]  # only what differs
    for r, (folder, rows) in zip(table, jobs.values()):
        evals = [x["accuracy"] for x in rows if x["split"] == "eval"]
        assert r["folder"] == folder.name and r["status"] == "done" and r["steps"] == "40" and float(r["seconds"]) > 0
        assert float(r["best_accuracy"]) == round(max(evals), 4) and float(r["final_accuracy"]) == round(evals[-1], 4)
    assert "Sweep of 2 jobs" in result.stdout and "best_accuracy" in result.stdout
    assert "optimizer.lr=0.0003" in result.stdout.split("Sweep of 2 jobs")[1]


def test_a_failing_multirun_job_does_not_stop_the_sweep(tmp_path, tiny):
    """Job 0 fails with a user error (exit 2 as a single run); job 1 still runs; the sweep exits non-zero.
    A path in an override does not nest the job's folder; the CSV has both jobs."""
    sweep = tmp_path / "sweep"
    result = run_cli("-m", f"trainer.init_from={tmp_path / 'nowhere'},null", *tiny, f"hydra.sweep.dir={sweep}")
    assert result.returncode != 0
    assert "exit code 2 as a single run: CheckpointError" in result.stderr and "Traceback" not in result.stderr
    (failed,) = sweep.glob("0_*")
    (ran,) = sweep.glob("1_*")
    assert "nowhere" in (failed / "trainer.log").read_text()
    assert read_metrics(ran)[-1]["step"] == 40
    import csv

    assert [r["status"] for r in csv.DictReader((sweep / "sweep_summary.csv").open())] == ["failed", "done"]


def test_wheel_ships_configs_and_runs_from_anywhere(tmp_path):
    """A non-editable install must carry conf/ and recipes/ inside the package."""
    repo = Path(__file__).resolve().parents[1]
    import subprocess
    import sys

    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(repo)],
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("trainer-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"trainer/conf/config.yaml", "trainer/conf/recipe/mnist.yaml", "trainer/recipes/mnist.py"} <= names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    probe = subprocess.run(
        [sys.executable, "-c", "import trainer, trainer.conf; print(trainer.__file__)"],
        capture_output=True, text=True, cwd=elsewhere, env={**__import__("os").environ, **env},
    )
    assert probe.stdout.strip().startswith(str(site)), probe.stdout + probe.stderr
    result = run_cli("--cfg", "job", cwd=elsewhere, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainer.recipes.mnist.build_model" in result.stdout


def test_a_config_error_and_cfg_job_answer_before_tensorflow_loads(tmp_path):
    """Composing and checking the config (every recipe's schema, check_config) loads neither TensorFlow nor
    Keras nor NumPy: a config error (a range; a group option or a key Hydra reported before), --cfg job, --help
    and --info answer in half a second, not after the 4 s TensorFlow takes to load. One interpreter runs them
    through trainer.cli.main; a run still loads them."""
    script = textwrap.dedent("""
        import importlib.util, sys
        from hydra.core.global_hydra import GlobalHydra
        from trainer.cli import main
        codes = []
        for argv in (["trainer.max_steps=-5"], ["precision=bf16"], ["max_steps=5"], ["optimizer.learning_rate=1e-3"],
                     ["--cfg", "job"], ["--help"], ["--info"]):
            sys.argv = [importlib.util.find_spec("trainer.__main__").origin, *argv]  # as python -m trainer has it
            try:
                main()
                codes.append(0)
            except SystemExit as e:
                codes.append(e.code)
            GlobalHydra.instance().clear()
        print(codes, [name for name in ("tensorflow", "keras", "numpy") if name in sys.modules])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    last_line = done.stdout.strip().splitlines()[-1]
    assert last_line == "[2, 2, 2, 2, 0, 0, 0] []", done.stdout[-2000:] + done.stderr[-2000:]
    assert "trainer.max_steps=-5 is out of range: must be in [1, 9223372036854775807]" in done.stderr, done.stderr
    for fix in ("precision=mixed_bfloat16?", "trainer.max_steps=5?", "optimizer.lr=1e-3?"):  # Hydra reported them
        assert f"did you mean {fix}" in done.stderr, done.stderr
    assert "_target_: trainer.recipes.mnist.build_model" in done.stdout and "max_steps:" in done.stdout
    assert not (tmp_path / "runs").exists()  # neither made a run folder


def test_help_is_hydras_listing_options_not_schemas(tmp_path):
    """--help prints Hydra's app help (its template: the groups, then the config composed) without Hydra's slow
    listing of the groups, and without the base_* schemas Hydra lists among their options. Hydra itself answers
    a command line naming other configs (an empty --config-dir here): the same text, but for the schemas."""
    import re

    ours = run_cli("recipe=resnet", "optimizer.lr=0.5", "--help")
    hydras = run_cli("recipe=resnet", "optimizer.lr=0.5", "--help", "--config-dir", str(tmp_path))
    assert ours.returncode == hydras.returncode == 0, ours.stderr[-2000:] + hydras.stderr[-2000:]
    assert "\noptimizer: adam, adamw, sgd\n" in ours.stdout and "base_" not in ours.stdout.split("== Config ==")[0]
    assert "_target_: trainer.recipes.resnet.build_model" in ours.stdout and "lr: 0.5" in ours.stdout
    assert "\noptimizer: adam, adamw, base_adam, base_adamw, base_sgd, sgd\n" in hydras.stdout
    assert ours.stdout == re.sub(r"base_\w+, ", "", hydras.stdout)


@pytest.mark.slow
def test_sigterm_prints_the_command_that_resumes_the_default_run_folder(tmp_path):
    """The default folder (runs/<recipe>/<date_time>) is new at every start: the message gives the command
    with hydra.run.dir set, and that command, run as printed, resumes the same run."""
    args = ["trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.log_every=10",
            "trainer.progress_bar=false", "data.batch_size=32"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: list((tmp_path / "runs").glob("*/*/metrics.jsonl")), proc, "training started")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    (run_dir,) = list((tmp_path / "runs" / "mnist").iterdir())
    printed = re.search(r"to resume, run: (.*)$", out + err, re.MULTILINE)
    assert printed, (out + err)[-2000:]
    command = shlex.split(printed.group(1))
    assert command[:3] == ["python", "-m", "trainer"] and f"hydra.run.dir={run_dir}" in command
    saved = max(int(p.name[5:-6]) for p in (run_dir / "checkpoints").glob("ckpt-*.index"))
    command = [a if not a.startswith("trainer.max_steps=") else f"trainer.max_steps={saved + 10}" for a in command[3:]]
    resumed = run_cli(*command, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Done: 10 steps" in resumed.stdout + resumed.stderr
    assert list((tmp_path / "runs" / "mnist").iterdir()) == [run_dir]  # no new folder


def test_without_the_progress_bar_the_log_has_a_line_per_event(tmp_path, tiny):
    """trainer.progress_bar=false: each log and eval event is a line of trainer.log (as Keras' verbose=2),
    not only a row of metrics.jsonl."""
    run_dir = tmp_path / "run"
    result = run_cli(*tiny, "trainer.eval_every=20", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = (run_dir / "trainer.log").read_text()
    for step in (10, 20, 30, 40):
        assert re.search(rf"step {step}/40: loss=\d+\.\d{{4}}, accuracy=\d+\.\d{{4}} \(\d+ ex/s\)", text), text[-3000:]
    # Hydra configures logging for the CLI: fit() adds no handler of its own (trainer/console.py), no line twice
    assert text.count("Done: 40 steps") == 1 and (result.stdout + result.stderr).count("Done: 40 steps") == 1
    for step in (20, 40):
        assert re.search(rf"eval @ step {step} \(10 batches\): loss=\d+\.\d{{4}}, accuracy=\d+\.\d{{4}}",
                         text), text[-3000:]


@pytest.mark.parametrize(
    "overrides, code, says",
    [
        # A user error, named: sys.exit(2) from Hydra's run-start callback (trainer/runlock.py). An unknown key or a
        # wrong type (trainer.nonexistent=1, trainer.max_steps=1.5) ends by sys.exit(2) too, before Hydra
        # (trainer/argv_check.py): tests/test_config.py checks their messages and exit codes in process.
        (["data.batch_size=0"], 2, "data.batch_size=0 is out of range"),
        (["optimizer.lr=1e6"], 3, "trainer.divergence_factor=100"),  # training diverged
    ],
)
def test_exit_codes_of_a_real_process(tmp_path, overrides, code, says):
    """Most CLI tests run the command in the test's process (tests/cli_runner.py); these keep the exit path
    itself honest: a real interpreter, its exit code, no traceback. 143: the SIGTERM test above; 130 (and 143):
    test_checkpoint.py's signal test (slow stage)."""
    result = run_cli(*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", process=True)
    output = result.stdout + result.stderr
    assert result.returncode == code, output[-2000:]
    assert says in output and "Traceback" not in output
