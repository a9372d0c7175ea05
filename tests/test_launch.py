"""`python -m trainer.launch`: its own errors and where it reads the cluster from (in this process, cheap), and
2-worker groups on loopback (the slow stage): a plain run, a SIGKILLed worker restarted to the same weights,
no restart left, a SIGTERM to the launcher, SLURM's variables simulated on one host."""
from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli, wait_until
from trainer.launch.cluster import LaunchError, expand_hostlist, free_ports, placement


def launch(*args, **kwargs):
    return run_cli(*args, module="trainer.launch", **kwargs)


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers 0: a group has at least 1 worker"),
    (["--workers", "-2"], "--workers -2"),
    ([], "--workers N is needed on one host"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--workers", "2", "--", "strategy=mirrored"], "strategy=mirrored: the launcher runs one strategy=multi_worker run"),
    (["--workers", "2", "--", "-m", "optimizer.lr=1e-3,1e-2"], "-m: the launcher runs one strategy=multi_worker run"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, expected, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    result = launch(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr
    assert result.stderr.startswith("[launch] error: ")


def test_a_port_in_use_is_named(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = launch("--workers", "2", "--port", str(port - 1))
    assert result.returncode == 2
    assert f"port {port} is in use" in result.stderr and "leave --port out" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_worker_that_cannot_start_is_named(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    result = launch("--workers", "2", "--", "trainer.max_steps=1")
    assert result.returncode == 2
    assert "error: worker 0 could not start:" in result.stderr and "no-python" in result.stderr
    assert signal.getsignal(signal.SIGTERM) is not None  # the launcher put its handlers back


def test_bad_input_in_a_worker_is_not_restarted(monkeypatch, tmp_path):
    """Exit 2 (a config error) would repeat at every restart: the launcher stops there, naming the worker."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    result = launch("--workers", "2", "--max-restarts", "3", "--", "trainer.max_steps=-1", f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"\[launch\] worker [01] exited 2, not restarted: the same input fails the same way; exit 2\. "
                     r"Its last lines:\n.*trainer.max_steps", result.stderr), result.stderr[-2000:]
    assert "starting the group again" not in result.stderr and "[w0] " in result.stderr + result.stdout


def test_the_launcher_loads_no_tensorflow():
    """It runs beside its workers for the whole run: TensorFlow would cost seconds and hundreds of MB there."""
    code = "import sys, trainer.launch.__main__; assert 'tensorflow' not in sys.modules, 'tensorflow loaded'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_NODELIST": "node[09-10],gpu1",
         "SLURM_STEP_TASKS_PER_NODE": "2(x2),1"}


def test_slurm_tasks_become_workers_as_slurm_cluster_resolver_orders_them():
    """TensorFlow's SlurmClusterResolver's order: hosts sorted, each host's tasks on port, port+1, ...;
    a task's index is its SLURM_PROCID. The run folder's name is the job's, the same on every node."""
    port = free_ports(1)[0]
    found = placement({**SLURM, "SLURM_PROCID": "3"}, None, port)
    config = json.loads(found.tf_configs[0])
    assert config == {"cluster": {"worker": [f"gpu1:{port}", f"node09:{port}", f"node09:{port + 1}", f"node10:{port}",
                                             f"node10:{port + 1}"]}, "task": {"type": "worker", "index": 3}}
    assert found.indices == [3] and found.run_time == "slurm-77" and found.size == 5
    assert expand_hostlist("n[1-2],m5,o[3-4,6,7-9]") == ["n1", "n2", "m5", "o3", "o4", "o6", "o7", "o8", "o9"]


@pytest.mark.parametrize("env, workers, expected", [
    ({**SLURM, "SLURM_PROCID": "0"}, 4, "--workers 4, but SLURM describes a cluster of 5 workers"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"}, None, "gives 1 nodes, SLURM_STEP_NODELIST 3"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n[1-"}, None, "not a SLURM host list"),
    ({"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]}, "task": {"type": "chief", "index": 0}})},
     None, "strategy=multi_worker takes workers only"),
    ({"TF_CONFIG": "{not json"}, None, "TF_CONFIG is set but is not a cluster"),
])
def test_cluster_descriptions_that_do_not_fit_are_errors(env, workers, expected):
    with pytest.raises(LaunchError, match=re.escape(expected)):
        placement(env, workers, free_ports(1)[0])


def test_a_tf_config_set_by_the_platform_needs_a_shared_run_folder(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}}))
    monkeypatch.delenv("TRAINER_RUN_TIME", raising=False)
    result = launch("--", "trainer.max_steps=1")
    assert result.returncode == 2 and "every worker must name the same run folder" in result.stderr, result.stderr


def test_a_tf_config_set_by_the_platform_is_used_as_it_is():
    text = json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}})
    found = placement({"TF_CONFIG": text, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "3"}, 2, None)
    assert found.tf_configs == [text] and found.indices == [1] and found.where == "TF_CONFIG"


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


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_ends_with_the_whole_runs_weights(whole_run, tmp_path):
    """SIGKILL to worker 1 once a checkpoint exists: the launcher stops worker 0, starts both again, they
    resume from the newest complete checkpoint and end with the uninterrupted run's fingerprint."""
    out, run = tmp_path / "launch.out", tmp_path / "run"
    proc = _start(out, "--workers", "2", "--max-restarts", "1", "--", *COMMON, f"hydra.run.dir={run}")
    try:
        pid = _worker_pid(out, 1, proc)
        wait_until(lambda: (run / "checkpoints/ckpt-20.index").exists(), proc, "the first checkpoint")
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        code = proc.wait(timeout=1200)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 0, text[-3000:]
    assert "worker 1 was killed by SIGKILL: starting the group again (restart 1 of 1)" in text
    resumed = re.findall(r"^\[(w\d)\].*Resuming from .*\(step (\d+)\)", text, re.M)
    assert sorted(w for w, _ in resumed) == ["w0", "w1"] and 20 <= int(resumed[0][1]) < STEPS
    assert _fingerprints(text) == _fingerprints(whole_run[1]), text[-3000:]


@pytest.mark.slow
def test_no_restart_left_names_the_worker_and_its_last_lines(tmp_path):
    out = tmp_path / "launch.out"
    proc = _start(out, "--workers", "2", "--max-restarts", "0", "--", *COMMON, f"hydra.run.dir={tmp_path / 'run'}")
    try:
        pid = _worker_pid(out, 1, proc)
        wait_until(lambda: "[w1] " in out.read_text() and "First loop" in out.read_text(), proc, "training")
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        code = proc.wait(timeout=1200)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 137, text[-3000:]
    assert "worker 1 was killed by SIGKILL, after 0 restart(s) of at most 0; exit 137. Its last lines:" in text
    assert "restart 1" not in text


@pytest.mark.slow
@pytest.mark.parametrize("to_workers_too", [False, True])
def test_sigterm_to_the_launcher_makes_every_worker_save_once(tmp_path, to_workers_too):
    """`to_workers_too`: as SLURM signals every process of a step, each worker also gets the SIGTERM directly
    (so twice): still one save, at one step."""
    out, run = tmp_path / "launch.out", tmp_path / "run"
    proc = _start(out, "--workers", "2", "--", *COMMON, f"hydra.run.dir={run}")
    try:
        wait_until(lambda: len(re.findall(r"^\[w\d\].*First loop", out.read_text(), re.M)) == 2, proc, "both training")
        if to_workers_too:
            for index in (0, 1):
                subprocess.run(["kill", "-TERM", str(_worker_pid(out, index, proc))], check=True)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=1200)
    finally:
        proc.kill()
    text = out.read_text()
    assert code == 143, text[-3000:]
    saved = re.findall(r"^\[(w\d)\].*every worker saved step (\d+)", text, re.M)
    assert sorted(w for w, _ in saved) == ["w0", "w1"] and saved[0][1] == saved[1][1], text[-3000:]
    assert "starting the group again" not in text
    assert (run / f"checkpoints/ckpt-{saved[0][1]}.index").exists()


@pytest.mark.slow
def test_slurm_tasks_simulated_on_one_host_restart_their_own_workers(whole_run, tmp_path):
    """Two launchers, as srun starts one per task: each starts its task's worker from the SLURM variables, both
    name the same run folder (the job's id) without hydra.run.dir. Worker 1 SIGKILLed: its launcher restarts
    it, worker 0 fails on the lost connection and its launcher restarts it; the group re-forms, resumes and
    ends with the uninterrupted run's weights."""
    port = next(p for p in free_ports(4) if _free(p + 1))
    procs, outs = [], []
    for rank in (0, 1):
        env = {**_without_cluster(), "SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2"}
        outs.append(tmp_path / f"task{rank}.out")
        procs.append(_start(outs[-1], "--port", str(port), "--", *COMMON, cwd=tmp_path, env=env))
    run = tmp_path / "runs/mnist/slurm-4242"
    try:
        pid = _worker_pid(outs[1], 1, procs[1])
        wait_until(lambda: (run / "checkpoints/ckpt-20.index").exists(), procs[0], "the first checkpoint")
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        codes = [p.wait(timeout=1200) for p in procs]
    finally:
        for p in procs:
            p.kill()
    texts = [o.read_text() for o in outs]
    assert codes == [0, 0], [t[-2000:] for t in texts]
    assert "[launch] 2 worker(s), SLURM; this launcher starts worker 1" in texts[1]
    assert "worker 1 was killed by SIGKILL: starting the group again (restart 1 of 3)" in texts[1]
    assert "worker 0 exited 1: starting the group again (restart 1 of 3)" in texts[0]
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
    import os

    return {k: v for k, v in os.environ.items() if k != "TF_CONFIG" and not k.startswith("SLURM_")}
