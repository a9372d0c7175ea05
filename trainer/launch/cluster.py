"""Where the launcher runs, and each worker's TF_CONFIG: one host (loopback ports), SLURM or a TF_CONFIG set
by the platform (Kubernetes' training operator).

SLURM's task list: rank = SLURM_PROCID; the hosts of SLURM_STEP_NODELIST in the list's order (the order in
which SLURM hands out ranks, node by node; TensorFlow's SlurmClusterResolver sorts them, which breaks for
node[9-10]), each with its SLURM_STEP_TASKS_PER_NODE tasks on ports port, port+1, ... Written here so the
launcher, which runs all along beside its workers, does not load TensorFlow (seconds and hundreds of MB).
"""
from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from typing import List, Mapping, Optional

from trainer.errors import UserError

SLURM_PORT = 8888  # SlurmClusterResolver's port_base


class LaunchError(UserError, RuntimeError):
    """The launcher cannot start the group as asked; the message says why and the fix."""


@dataclass
class Placement:
    """The workers this launcher starts: their TF_CONFIGs (one per worker, in order), their indices in the
    cluster, and the time stamp of the run folder every worker of the cluster must agree on (None: this
    launcher starts them all, it makes one)."""

    where: str  # "one host", "SLURM", "TF_CONFIG"
    tf_configs: List[str]
    indices: List[int]
    run_time: Optional[str] = None

    @property
    def size(self) -> int:
        """Workers in the whole cluster."""
        return len(json.loads(self.tf_configs[0])["cluster"]["worker"])


def tf_config(workers: List[str], index: int) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def free_ports(n: int) -> List[int]:
    """`n` loopback ports free now (the OS picks them; one could be taken again before a worker binds it)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def check_ports_free(ports: List[int], option: str) -> None:
    """Raises LaunchError naming the first port another program listens on (TensorFlow's server would fail
    on it minutes later, inside the strategy). SO_REUSEADDR: a port a finished worker left in TIME_WAIT is free."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", port))
            except OSError as e:
                raise LaunchError(
                    f"{option}: port {port} is in use ({e.strerror}); the workers need ports {ports[0]}..{ports[-1]}. "
                    "Fix: another --port, or (on one host) leave --port out to pick free ones."
                ) from None


def check_port_range(port: int, count: int, what: str) -> None:
    """Ports port..port+count-1 must all exist (an int past 65535 would fail deep in socket code)."""
    if port + count - 1 > 65535:
        raise LaunchError(f"{what}: ports {port}..{port + count - 1} go past 65535. Fix: a --port of "
                          f"at most {65536 - count}.")


def one_host(workers: int, port: Optional[int]) -> Placement:
    """N workers on this host, on loopback: ports port..port+N-1, or N free ones."""
    if port:
        check_port_range(port, workers, f"--port {port} with --workers {workers}")
    ports = list(range(port, port + workers)) if port else free_ports(workers)
    if port:
        check_ports_free(ports, f"--port {port}")
    addresses = [f"127.0.0.1:{p}" for p in ports]
    return Placement("one host", [tf_config(addresses, i) for i in range(workers)], list(range(workers)))


def expand_hostlist(hostlist: str) -> List[str]:
    """'n[01-02],m5' -> ['n01', 'n02', 'm5'] (SLURM's compact host list; order kept)."""
    parts = re.findall(r"[^,\[]+(?:\[[^\]]*\])?|\[[^\]]*\]", hostlist)
    if ",".join(parts) != hostlist:
        raise ValueError(f"not a SLURM host list: {hostlist!r}")
    hosts = []
    for part in parts:
        found = re.fullmatch(r"([^\[]*)(?:\[([^\]]+)\])?", part)
        prefix, ranges = found.group(1), found.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for item in ranges.split(","):
            low, _, high = item.partition("-")
            hosts.extend(prefix + str(i).zfill(len(low)) for i in range(int(low), int(high or low) + 1))
    return hosts


def expand_tasks_per_node(tasks: str) -> List[int]:
    """'2(x3),1' -> [2, 2, 2, 1]."""
    out = []
    for part in tasks.split(","):
        found = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if found is None:
            raise ValueError(f"not a SLURM tasks-per-node list: {tasks!r}")
        out.extend([int(found.group(1))] * int(found.group(2) or 1))
    return out


def slurm(env: Mapping[str, str], port: Optional[int]) -> Placement:
    """This SLURM task's worker: its TF_CONFIG from the step's variables (no TF_CONFIG written by hand)."""
    port = port or SLURM_PORT
    try:
        rank, total = int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
        hosts = expand_hostlist(env["SLURM_STEP_NODELIST"])
        per_node = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
        job, step = env["SLURM_JOB_ID"], env["SLURM_STEP_ID"]
    except KeyError as e:
        raise LaunchError(f"SLURM: {e.args[0]} is not set (SLURM_PROCID is). Fix: start the launcher with srun, one "
                          "task per worker (docs/concepts/distribution.md#slurm).") from None
    except ValueError as e:
        raise LaunchError(f"SLURM: {e}") from None
    if len(per_node) != len(hosts):
        raise LaunchError(f"SLURM: SLURM_STEP_TASKS_PER_NODE gives {len(per_node)} nodes, "
                          f"SLURM_STEP_NODELIST {len(hosts)}")
    check_port_range(port, max(per_node), f"SLURM, port {port} with up to {max(per_node)} tasks per node")
    workers = [f"{host}:{port + k}" for host, tasks in zip(hosts, per_node) for k in range(tasks)]
    if len(workers) != total or not 0 <= rank < total:
        raise LaunchError(f"SLURM: task {rank} of {total}, but the node list holds {len(workers)} tasks")
    host, own_port = workers[rank].rsplit(":", 1)
    node = env.get("SLURMD_NODENAME")
    if node and node != host:  # not SLURM's default block distribution: the cluster would not agree on addresses
        raise LaunchError(f"SLURM: task {rank} runs on {node}, but the node list puts task {rank} on {host}. Fix: srun "
                          "--distribution=block (the default), so ranks follow the node list.")
    check_ports_free([int(own_port)], f"SLURM task {rank}")
    # Every task of this step names the same run folder; a requeued job (same id, steps counted from 0 again)
    # names it again and resumes; another srun step of the job gets its own.
    return Placement("SLURM", [tf_config(workers, rank)], [rank], run_time=f"slurm-{job}-{step}")


def given(text: str) -> Placement:
    """A TF_CONFIG the platform set (Kubernetes' TFJob): this process's worker, as it says."""
    try:
        config = json.loads(text)
        kind, index = config["task"]["type"], int(config["task"]["index"])
        workers = config["cluster"]["worker"]
    except (ValueError, KeyError, TypeError) as e:
        raise LaunchError(f"TF_CONFIG is set but is not a cluster with a worker task ({type(e).__name__}: {e}): "
                          f"{text[:200]}") from None
    if kind != "worker" or "chief" in config["cluster"] or "ps" in config["cluster"]:
        raise LaunchError(f"TF_CONFIG: task type {kind!r} in a cluster of {sorted(config['cluster'])}: "
                          "strategy=multi_worker takes workers only (worker 0 is the chief). Fix: give the "
                          "TFJob Worker replicas only.")
    if not 0 <= index < len(workers):
        raise LaunchError(f"TF_CONFIG: task index {index}, but the cluster has {len(workers)} workers")
    return Placement("TF_CONFIG", [text], [index])


def _slurm_tasks(env: Mapping[str, str]) -> int:
    text = env.get("SLURM_STEP_NUM_TASKS", "1") or "1"
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"SLURM: SLURM_STEP_NUM_TASKS={text!r} is not a number of tasks") from None


def placement(env: Mapping[str, str], workers: Optional[int], port: Optional[int]) -> Placement:
    """Where to start which workers: TF_CONFIG set (Kubernetes) > a SLURM step of several tasks > one host."""
    if env.get("TF_CONFIG"):
        if port is not None:
            raise LaunchError(f"--port {port}: TF_CONFIG is set and names every worker's address. Fix: drop --port.")
        found = given(env["TF_CONFIG"])
    elif "SLURM_PROCID" in env and _slurm_tasks(env) > 1:
        found = slurm(env, port)
    else:
        if workers is None:
            raise LaunchError("--workers N is needed on one host (under SLURM or with TF_CONFIG set "
                              "the cluster says how many)")
        return one_host(workers, port)
    if workers is not None and workers != found.size:
        raise LaunchError(f"--workers {workers}, but {found.where} describes a cluster of {found.size} workers. "
                          "Fix: leave --workers out, or make them agree.")
    return found

