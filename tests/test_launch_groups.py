"""`python -m trainer.launch` with real 2-worker groups on loopback (the slow stage): a plain run, a SIGKILLed
worker restarted to the same weights, no restart left, a SIGTERM to the launcher, SLURM's variables simulated
on one host. The launcher's errors and group logic with fake workers: tests/test_launch.py."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_until
from trainer.launch.cluster import free_ports

# The slow stage: real 2-worker groups. Deterministic, so an interrupted run can be compared with a whole one.
STEPS = 200
COMMON = [f"trainer.max_steps={STEPS}", "trainer.log_every=20", "trainer.checkpoint_every=20", "trainer.eval_every=0",
          "trainer.eval_steps=2", "trainer.progress_bar=false", "data.batch_size=64", "trainer.deterministic=true"]


def _start(out: Path, *args, cwd=None, env=None):
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "trainer.launch", *args], stdout=f, stderr=subprocess.STDOUT,
                                text=True, cwd=cwd, env=env)


def _fingerprints(text: str) -> dict:
    return dict(re.findall(r"^\[(w\d)\]\s+Weights fingerprint: (\w+)", text, re.M))


def _worker_pid(out: Path, index: int, proc) -> int:
    wait_until(lambda: f"worker {index}: process" in out.read_text(), proc, f"worker {index} started")
    return int(re.search(rf"worker {index}: process (\d+)", out.read_text()).group(1))


def _kill_worker_1(outs, procs, condition, what: str):
    """SIGKILLs worker 1 (named in the last launcher's output) once `condition()` holds, then waits for every
    launcher: (their exit codes, their outputs). A launcher still running when the test fails is killed."""
    try:
        pid = _worker_pid(outs[-1], 1, procs[-1])
        wait_until(condition, procs[0], what)
        os.kill(pid, signal.SIGKILL)
        codes = [p.wait(timeout=1200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return codes, [o.read_text() for o in outs]


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted 2-worker run: (exit code, output, run folder)."""
    folder = tmp_path_factory.mktemp("whole")
    out = folder / "launch.out"
    proc = _start(out, "--workers", "2", "--", *COMMON, f"hydra.run.dir={folder / 'run'}")
    return proc.wait(timeout=1200), out.read_text(), folder / "run"


@pytest.mark.slow
def test_two_workers_on_one_host_share_one_run_folder(whole_run):
    code, text, run = whole_run
    assert code == 0, text[-3000:]
    prints = _fingerprints(text)
    assert set(prints) == {"w0", "w1"} and prints["w0"] == prints["w1"], text[-3000:]
    assert "[w1] " in text and "task worker/1, 2 replicas in sync" in text
    assert (run / "trainer.worker1.log").exists() and (run / f"checkpoints/ckpt-{STEPS}.index").exists()
    assert "Waiting for tf.data" not in text  # each worker frees its Trainer and ends at once (trainer/cli.py)
    own, chiefs = (run / "trainer.worker1.log").read_text(), (run / "trainer.log").read_text()
    assert "Recipe: mnist" in own and "task worker/1" in own  # from worker 1's first line: none in the chief's
    assert "task worker/1" not in chiefs and chiefs.count("Recipe: mnist") == 1


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_ends_with_the_whole_runs_weights(whole_run, tmp_path):
    """SIGKILL to worker 1 once a checkpoint exists: the launcher stops worker 0, starts both again, they
    resume from the newest complete checkpoint and end with the uninterrupted run's fingerprint."""
    out, run = tmp_path / "launch.out", tmp_path / "run"
    proc = _start(out, "--workers", "2", "--max-restarts", "1", "--", *COMMON, f"hydra.run.dir={run}")
    [code], [text] = _kill_worker_1([out], [proc], (run / "checkpoints/ckpt-20.index").exists, "the first checkpoint")
    assert code == 0, text[-3000:]
    assert "worker 1 was killed by SIGKILL: starting the group again in 1 s (restart 1 of 1)" in text
    resumed = re.findall(r"^\[(w\d)\].*Resuming from .*\(step (\d+)\)", text, re.M)
    assert sorted(w for w, _ in resumed) == ["w0", "w1"] and 20 <= int(resumed[0][1]) < STEPS
    assert _fingerprints(text) == _fingerprints(whole_run[1]), text[-3000:]


@pytest.mark.slow
def test_no_restart_left_names_the_worker_and_its_last_lines(tmp_path):
    out = tmp_path / "launch.out"
    proc = _start(out, "--workers", "2", "--max-restarts", "0", "--", *COMMON, f"hydra.run.dir={tmp_path / 'run'}")
    [code], [text] = _kill_worker_1([out], [proc],
                                    lambda: "[w1] " in out.read_text() and "First loop" in out.read_text(), "training")
    assert code == 137, text[-3000:]
    assert "worker 1 was killed by SIGKILL, after 0 restart(s) of at most 0; exit 137. Its last lines:" in text
    assert "restart 1" not in text


@pytest.mark.slow
@pytest.mark.parametrize("signum, to_workers_too", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_signal_to_the_launcher_makes_every_worker_save_once(tmp_path, signum, to_workers_too):
    """SIGINT (Ctrl-C) is passed on as SIGTERM, so the workers save at one step (each stopped on its own SIGINT
    where it was, and one waited in a collective the other had left); the chief alone says how to resume, with the
    launcher's command. `to_workers_too`: as SLURM signals every process of a step, each worker also gets the
    SIGTERM directly (so twice): still one save, at one step."""
    out, run = tmp_path / "launch.out", tmp_path / "run"
    proc = _start(out, "--workers", "2", "--", *COMMON, f"hydra.run.dir={run}")
    try:
        wait_until(lambda: len(re.findall(r"^\[w\d\].*First loop", out.read_text(), re.M)) == 2, proc, "both training")
        if to_workers_too:
            for index in (0, 1):
                subprocess.run(["kill", "-TERM", str(_worker_pid(out, index, proc))], check=True)
        proc.send_signal(signum)
        code = proc.wait(timeout=1200)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 128 + signum, text[-3000:]
    saved = re.findall(r"^\[(w\d)\].*every worker saved step (\d+)", text, re.M)
    assert sorted(w for w, _ in saved) == ["w0", "w1"] and saved[0][1] == saved[1][1], text[-3000:]
    assert "starting the group again" not in text and "Traceback" not in text and "saved None" not in text
    assert (run / f"checkpoints/ckpt-{saved[0][1]}.index").exists()
    resume = re.findall(r"^\[(w\d)\].*to resume, run: (.*?)\.?$", text, re.M)
    assert [w for w, _ in resume] == ["w0"], text[-3000:]
    assert shlex.split(resume[0][1]) == [*"python -m trainer.launch --workers 2 --".split(), *COMMON,
                                         f"hydra.run.dir={run}"]
    assert "[w1] " in text and "the chief (worker 0) says how to resume" in text
    if signum == signal.SIGINT:
        assert "[launch] received SIGINT: passed it on to 2 worker(s) as SIGTERM" in text
        _resumed_in_one_process_is_refused(run, int(saved[0][1]))


def _resumed_in_one_process_is_refused(run: Path, step: int):
    """The 2-worker run resumed by a plain python -m trainer (one input pipeline) would read other examples: under
    trainer.deterministic=true that is refused, naming both counts and the launcher command, nothing written."""
    from conftest import run_cli

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = run_cli(*COMMON, f"hydra.run.dir={run}")
    assert result.returncode == 2, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert "trainer.deterministic=true and the run this one resumes read its training data as 2 workers" in said
    assert "Fix: resume with python -m trainer.launch --workers 2 -- and the same overrides" in said
    assert f"Resuming from {run / 'checkpoints' / f'ckpt-{step}'}" in said
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_slurm_tasks_simulated_on_one_host_restart_their_own_workers(whole_run, tmp_path):
    """Two launchers, as srun starts one per task: each starts its task's worker from the SLURM variables, both
    name the same run folder (the job's and step's ids) without hydra.run.dir. Worker 1 SIGKILLed: its launcher restarts
    it, worker 0 fails on the lost connection and its launcher restarts it; the group re-forms, resumes and
    ends with the uninterrupted run's weights."""
    port = next(p for p in free_ports(4) if _free(p + 1))
    procs, outs = [], []
    for rank in (0, 1):
        env = {**_without_cluster(), "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURMD_NODENAME": "localhost",
               "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2"}
        outs.append(tmp_path / f"task{rank}.out")
        procs.append(_start(outs[-1], "--port", str(port), "--", *COMMON, cwd=tmp_path, env=env))
    run = tmp_path / "runs/mnist/slurm-4242-0"
    codes, texts = _kill_worker_1(outs, procs, (run / "checkpoints/ckpt-20.index").exists, "the first checkpoint")
    assert codes == [0, 0], [t[-2000:] for t in texts]
    assert "[launch] 2 worker(s), SLURM; this launcher starts worker 1" in texts[1]
    assert "worker 1 was killed by SIGKILL: starting the group again in 1 s (restart 1 of 3)" in texts[1]
    assert "worker 0 exited 1: starting the group again in 1 s (restart 1 of 3)" in texts[0]
    assert {**_fingerprints(texts[0]), **_fingerprints(texts[1])} == _fingerprints(whole_run[1])
    assert (run / f"checkpoints/ckpt-{STEPS}.index").exists()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _without_cluster() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
