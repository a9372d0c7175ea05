"""`python -m trainer.launch`: its own errors, where it reads the cluster from, and the group logic with fake
workers (in this process, cheap). Real 2-worker groups on loopback: tests/test_launch_groups.py (slow stage)."""
from __future__ import annotations

import json
import os
import time
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli
import trainer.launch.__main__ as launch_main
from trainer.launch.__main__ import worker_command
from trainer.launch.cluster import LaunchError, expand_hostlist, expand_tasks_per_node, free_ports, placement
from trainer.launch.group import Group, names


def launch(*args, **kwargs):
    return run_cli(*args, module="trainer.launch", **kwargs)


@pytest.fixture
def no_cluster(monkeypatch):
    """The test's environment names no cluster (CI's may run inside one)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)


@pytest.mark.parametrize("args, expected", [
    (["--workers", "0"], "--workers 0: a group has at least 1 worker"),
    (["--workers", "-2"], "--workers -2"),
    ([], "--workers N is needed on one host"),
    (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
    (["--workers", "2", "--", "strategy=mirrored"],
     "strategy=mirrored: the launcher runs one strategy=multi_worker run"),
    (["--workers", "2", "--", "-m", "optimizer.lr=1e-3,1e-2"], "-m: the launcher runs one strategy=multi_worker run"),
    (["--workers", "2", "--port", "65535"], "--port 65535 with --workers 2: ports 65535..65536 go past 65535"),
    (["--workers", "2", "--grace-period", "nan"], "--grace-period nan: seconds, 0 or more"),
    (["--workers", "2", "--grace-period", "-1"], "--grace-period -1.0: seconds, 0 or more"),
    (["--worker", "2", "trainer.max_steps=5"],
     "--worker: not an option of the launcher (nor an override of python -m trainer). Fix: --workers."),
    (["--workers", "2", "--", "trainer.max_steps=5", "--max-restart=1"],
     "--max-restart=1: not an option of the launcher"),
    (["--workers", "2", "--", "trainer.max_step=60"],  # checked once, before any worker starts
     "trainer.max_step=60: trainer has no key 'max_step'. Fix: did you mean trainer.max_steps=60?"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, expected, no_cluster):
    result = launch(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr, result.stderr
    assert result.stderr.startswith("[launch] error: ")


FAKE_PRELUDE = "import json, os, signal, sys, time\nindex = json.loads(os.environ['TF_CONFIG'])['task']['index']\n"


def fake_command(body: str):
    """A fake worker: Python `body` with `index` (its TF_CONFIG's) set; cheap where the group logic is tested."""
    return [sys.executable, "-c", FAKE_PRELUDE + textwrap.dedent(body)]


def fake_launch(monkeypatch, capsys, body: str, *args):
    """`python -m trainer.launch ARGS` in this process with fake workers: (exit code, stderr)."""
    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setattr(launch_main, "worker_command", lambda overrides, where: fake_command(body))
    capsys.readouterr()
    with pytest.raises(SystemExit) as ended:
        launch_main.main(list(args))
    return ended.value.code, capsys.readouterr().err


def test_a_port_in_use_is_named(no_cluster):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = launch("--workers", "2", "--port", str(port - 1))
    assert result.returncode == 2
    assert f"port {port} is in use" in result.stderr and "leave --port out" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_a_worker_that_cannot_start_is_named(monkeypatch, tmp_path, no_cluster):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    result = launch("--workers", "2", "--", "trainer.max_steps=1")
    assert result.returncode == 2
    assert "error: worker 0 could not start:" in result.stderr and "no-python" in result.stderr
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # the launcher put them back


def test_bad_input_in_a_worker_is_not_restarted(monkeypatch, capsys):
    """Exit 2 (a config error) would repeat at every restart: the launcher stops there, naming the worker."""
    code, err = fake_launch(monkeypatch, capsys, """
        if index == 1:
            print("error: trainer.max_steps=-1: must be positive", file=sys.stderr)
            sys.exit(2)
        time.sleep(600)
    """, "--workers", "2", "--max-restarts", "3")
    assert code == 2, err
    assert re.search(r"\[launch\] worker 1 exited 2, not restarted: the same input fails the same way; exit 2\. "
                     r"Its last lines:\n.*trainer.max_steps", err), err
    assert "starting the group again" not in err and "[w1] error: trainer.max_steps" in err


def _group(body: str, n: int = 1):
    envs = [{**os.environ, "TF_CONFIG": json.dumps({"task": {"index": i}})} for i in range(n)]
    return Group(fake_command(body), envs, list(range(n)))


def test_an_undecodable_byte_in_a_workers_output_does_not_block_it(capsys):
    """The relay goes on past it (replaced), so a worker writing a lot after it is not blocked on a full pipe."""
    group = _group("""
        sys.stdout.buffer.write(b"bad \\xff\\n" + b"x" * 99 + b"\\n")
        sys.stdout.buffer.write((b"y" * 99 + b"\\n") * 2000)
        print("done")
    """)
    ending = group.wait(grace_s=60)
    out = capsys.readouterr().out
    assert ending.codes == [0] and not ending.failed and list(group.workers[0].last)[-1] == "done"
    assert "[w0] bad \ufffd\n" in out and out.count("[w0] " + "y" * 99 + "\n") == 2000


def _ended(group: Group) -> None:
    """Until every worker's process has ended (a zombie not yet reaped), without reaping it."""
    for w in group.workers:
        while os.waitid(os.P_PID, w.process.pid, os.WEXITED | os.WNOWAIT) is None:
            pass


def test_workers_that_fail_within_one_poll_are_all_named():
    group = _group("sys.exit(1 if index == 0 else 3)", n=2)
    _ended(group)
    ending = group.wait(grace_s=60)
    assert [w.index for w in ending.failed] == [0, 1] and ending.codes == [1, 3]
    assert names(ending.failed) == "worker 0 exited 1 and worker 1 exited 3"


def test_a_worker_ignoring_the_passed_on_sigterm_is_killed_after_the_grace_period(capsys):
    """After a SIGTERM the launcher passed on, a worker that does not end gets SIGKILL after --grace-period."""
    group = _group("""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """)
    while "ready" not in group.workers[0].last:
        assert group.workers[0].process.poll() is None
        time.sleep(0.05)
    group.on_signal(signal.SIGTERM)
    ending = group.wait(grace_s=0.5)
    assert ending.codes == [137] and ending.signal == signal.SIGTERM
    err = capsys.readouterr().err
    assert "still running 0.5 s after the stop (--grace-period): SIGKILL" in err
    assert err.count("[launch] received SIGTERM: passed it on to 1 worker(s)\n") == 1


def test_a_worker_killed_mid_progress_bar_leaves_clean_launcher_lines(monkeypatch, capsys, tmp_path):
    """The launcher's line was glued to the killed worker's unfinished progress-bar line, its last lines were
    mostly bars, and the survivor's traceback from the lost peer looked like a second fault."""
    ready = str(tmp_path / "ready")
    code, err = fake_launch(monkeypatch, capsys, f"""
        if index == 0:
            def lost_peer(signum, frame):
                print("UnavailableError: the following tasks are unhealthy", file=sys.stderr, flush=True)
                sys.exit(1)
            signal.signal(signal.SIGTERM, lost_peer)
            open({ready!r}, "w").close()
            time.sleep(600)
        while not os.path.exists({ready!r}):
            time.sleep(0.01)
        print("loading the data", file=sys.stderr)
        for i in range(1, 25):
            sys.stderr.write(f"\\rtrain: {{i}}%|##  | {{i}}/100 [00:05<00:12,  5.66step/s]")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    """, "--workers", "2", "--max-restarts", "0")
    assert code == 137, err
    assert re.search(r"^\[launch\] worker 1 was killed by SIGKILL: stopping the others", err, re.M), err
    assert "[w1] train: 24%|##  | 24/100 [00:05<00:12,  5.66step/s]\n" in err
    last = err.split("Its last lines:\n")[1]
    assert last.startswith("  loading the data") and "step/s" not in last, err
    assert ("[launch] worker 0 (exited 1): its traceback above (UnavailableError, 'tasks have crashed', collective "
            "aborted) is the lost peer (worker 1), not a second fault") in err


def test_a_worker_failing_after_the_chief_finished_restarts_nothing(monkeypatch, capsys, tmp_path):
    """The chief's exit 0 means the run is complete (final checkpoint saved): a worker's later crash is said
    loudly, but the launcher exits 0 and starts nothing again."""
    code, err = fake_launch(monkeypatch, capsys, f"""
        if index == 0:
            open({str(tmp_path / "chief")!r}, "w").write(str(os.getpid()))
            sys.exit(0)
        while not os.path.exists({str(tmp_path / "chief")!r}):
            time.sleep(0.01)
        pid = open({str(tmp_path / "chief")!r}).read()
        while os.path.exists(f"/proc/{{pid}}") and open(f"/proc/{{pid}}/stat").read().split()[2] != "Z":
            time.sleep(0.01)
        sys.exit(1)
    """, "--workers", "2", "--max-restarts", "3")
    assert code == 0, err
    assert ("worker 1 exited 1 after the chief (worker 0) finished with exit 0: the run is complete, not restarted"
            in err), err
    assert "starting the group again" not in err and err.count(": process ") == 2


def test_restarts_wait_longer_each_time(monkeypatch, capsys):
    """A worker that fails at start-up does not use up the restarts in seconds: 1 s, 2 s, ... (capped)."""
    monkeypatch.setattr(launch_main, "BACKOFF_S", 0.01)
    monkeypatch.setattr(launch_main, "BACKOFF_MAX_S", 0.03)
    code, err = fake_launch(monkeypatch, capsys, """
        if index == 1:
            sys.exit(1)
        time.sleep(600)
    """, "--workers", "2", "--max-restarts", "3")
    assert code == 1, err
    waits = re.findall(r"worker 1 exited 1: starting the group again in ([\d.]+) s \(restart (\d) of 3\)", err)
    assert waits == [("0.01", "1"), ("0.02", "2"), ("0.03", "3")], err
    assert "worker 1 exited 1, after 3 restart(s) of at most 3; exit 1." in err


def test_the_launcher_loads_no_tensorflow():
    """It runs beside its workers for the whole run: TensorFlow would cost seconds and hundreds of MB there. Its
    check of the overrides (the CLI's) loads none either."""
    code = ("import sys, trainer.launch.__main__ as m; m.check_overrides(['trainer.max_steps=5', 'recipe=resnet']); "
            "assert 'tensorflow' not in sys.modules, 'tensorflow loaded'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "7",
         "SLURM_STEP_NODELIST": "node[9-10],gpu1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),3"}


@pytest.mark.parametrize("rank, node, address",
                         [(0, "node9", "node9:P"), (3, "node10", "node10:P+1"), (6, "gpu1", "gpu1:P+2")])
def test_slurm_tasks_become_workers_in_slurms_rank_order(rank, node, address):
    """SLURM hands out ranks node by node in the node list's order (node9 before node10: not sorted), each
    node's tasks on port, port+1, ...; a task's index is its SLURM_PROCID. The run folder is the job's step's."""
    port = free_ports(1)[0]
    found = placement({**SLURM, "SLURM_PROCID": str(rank), "SLURMD_NODENAME": node}, None, port)
    config = json.loads(found.tf_configs[0])
    hosts = ["node9"] * 2 + ["node10"] * 2 + ["gpu1"] * 3
    assert config["cluster"]["worker"] == [f"{h}:{port + k}" for h, k in zip(hosts, [0, 1, 0, 1, 0, 1, 2])]
    assert config["task"] == {"type": "worker", "index": rank}
    assert config["cluster"]["worker"][rank] == (address.replace("P", str(port)).replace(f"{port}+1", str(port + 1))
                                                 .replace(f"{port}+2", str(port + 2)))
    assert found.indices == [rank] and found.run_time == "slurm-77-0" and found.size == 7
    assert expand_hostlist("n[1-2],m5,o[3-4,6,7-9]") == ["n1", "n2", "m5", "o3", "o4", "o6", "o7", "o8", "o9"]
    assert expand_hostlist("n[9-10]") == ["n9", "n10"] and expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]


def test_the_launcher_names_one_run_folder_for_all_its_workers():
    """conf/config.yaml's default (a time per process) is left alone: the launcher names the folder itself."""
    port = free_ports(1)[0]
    where = placement({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_ID": "3"}, None, port)
    command = worker_command(["trainer.max_steps=5"], where)
    assert command[-3:] == ["trainer.max_steps=5", "hydra.run.dir=runs/${recipe}/slurm-77-3", "strategy=multi_worker"]
    mine = worker_command(["hydra.run.dir=/shared/r"], where)
    assert [o for o in mine if o.startswith("hydra.run.dir=")] == ["hydra.run.dir=/shared/r"]
    one = placement({}, 2, None)
    stamped = [o for o in worker_command([], one) if o.startswith("hydra.run.dir=runs/${recipe}/")]
    assert len(stamped) == 1 and "TRAINER_RUN_TIME" not in (Path(__file__).parents[1] / "conf/config.yaml").read_text()


@pytest.mark.parametrize("env, workers, expected", [
    ({**SLURM, "SLURM_PROCID": "0"}, 4, "--workers 4, but SLURM describes a cluster of 7 workers"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"}, None, "gives 1 nodes, SLURM_STEP_NODELIST 3"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURMD_NODENAME": "node10"}, None,
     "task 0 runs on node10, but the node list puts task 0 on node9"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "two"}, None, "SLURM_STEP_NUM_TASKS='two' is not a number"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"} | {"SLURM_PROCID": "0"}, None, "SLURM_JOB_ID is not set"),
    ({**SLURM, "SLURM_PROCID": "0", "PORT": 65534}, None, "ports 65534..65536 go past 65535"),
    ({**SLURM, "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n[1-"}, None, "not a SLURM host list"),
    ({"TF_CONFIG": json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                               "task": {"type": "chief", "index": 0}})},
     None, "strategy=multi_worker takes workers only"),
    ({"TF_CONFIG": "{not json"}, None, "TF_CONFIG is set but is not a cluster"),
])
def test_cluster_descriptions_that_do_not_fit_are_errors(env, workers, expected):
    env = dict(env)
    with pytest.raises(LaunchError, match=re.escape(expected)):
        placement(env, workers, env.pop("PORT", None) or (None if "TF_CONFIG" in env else free_ports(1)[0]))


def test_a_tf_config_set_by_the_platform_needs_a_shared_run_folder(monkeypatch):
    monkeypatch.setenv("TF_CONFIG",
                       json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]},
                                   "task": {"type": "worker", "index": 1}}))
    result = launch("--", "trainer.max_steps=1")
    assert result.returncode == 2 and "every worker must name the same run folder" in result.stderr, result.stderr


def test_port_is_refused_when_tf_config_names_the_addresses():
    text = json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}})
    with pytest.raises(LaunchError, match="--port 3000: TF_CONFIG is set and names every worker's address"):
        placement({"TF_CONFIG": text}, None, 3000)


def test_a_tf_config_set_by_the_platform_is_used_as_it_is():
    text = json.dumps({"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}})
    found = placement({"TF_CONFIG": text, "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "3"}, 2, None)
    assert found.tf_configs == [text] and found.indices == [1] and found.where == "TF_CONFIG"
