"""`python -m trainer.launch --workers N [--max-restarts R] -- OVERRIDES`: a torchrun for the trainer.

Starts the workers of a `strategy=multi_worker` run in one run folder (one host: N processes on loopback;
SLURM: this task's worker; TF_CONFIG set: the worker it names), prefixes their output by worker, and when a
worker fails starts the group again, which resumes from the newest complete checkpoint, at most R times.
Exits with the chief's code (docs/concepts/distribution.md#the-launcher-python-m-trainerlaunch).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import signal
import sys
import time
from typing import List, Optional

from trainer.errors import EXIT_NUMERICAL, EXIT_USER_ERROR, report_error
from trainer.launch import ADDED, LAUNCHED_WITH
from trainer.launch.cluster import LaunchError, Placement, placement
from trainer.launch.group import STOPPED, Group, Worker, exit_code, how_it_ended, names, say

NOT_RESTARTED = (EXIT_USER_ERROR, EXIT_NUMERICAL)  # bad input, non-finite training: the same again on a restart
MAX_RESTARTS, GRACE_PERIOD_S = 3, 60.0  # the options' defaults
BACKOFF_S, BACKOFF_MAX_S = 1.0, 30.0  # before restart k (from 0): BACKOFF_S * 2**k, at most BACKOFF_MAX_S
FORBIDDEN = ("-m", "--multirun", "hydra.mode=", "hydra/launcher=", "strategy=")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit 2 prints the usage too: one line, as every command's errors
        raise LaunchError(f"{message} (python -m trainer.launch --help)")


def parse(argv: List[str]) -> argparse.Namespace:
    parser = _Parser(allow_abbrev=False, prog="python -m trainer.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, metavar="N",
                        help="workers on this host (under SLURM or with TF_CONFIG: the cluster's, if given)")
    parser.add_argument("--max-restarts", type=int, metavar="R", default=MAX_RESTARTS,
                        help="starts of the group again after a failure (default 3)")
    parser.add_argument("--port", type=int, metavar="P", help="first port (one host: default free ones; SLURM: 8888)")
    parser.add_argument("--grace-period", type=float, metavar="S", default=GRACE_PERIOD_S,
                        help="seconds the other workers get to end after a failure, before SIGKILL (default 60)")
    parser.add_argument("overrides", nargs="*", help="python -m trainer's overrides (after --)")
    _check_option_typos(argv, [o for a in parser._actions for o in a.option_strings if o.startswith("--")])
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers <= 0:
        raise LaunchError(f"--workers {args.workers}: a group has at least 1 worker")
    if args.max_restarts < 0:
        raise LaunchError(f"--max-restarts {args.max_restarts}: 0 or more")
    if not math.isfinite(args.grace_period) or args.grace_period < 0:
        raise LaunchError(f"--grace-period {args.grace_period}: seconds, 0 or more")
    if args.port is not None and not 0 < args.port < 65536:
        raise LaunchError(f"--port {args.port}: not a port (1..65535)")
    for o in args.overrides:
        if o.startswith(FORBIDDEN) and o != "strategy=multi_worker":
            raise LaunchError(f"{o}: the launcher runs one strategy=multi_worker run (no sweep, no other strategy). "
                              "Fix: drop it (a sweep: python -m trainer -m ... runs its jobs one after another).")
    return args


def _check_option_typos(argv: List[str], options: List[str]) -> None:
    """`--worker 2` (before or after `--`) would be an override of python -m trainer or, abbreviated, taken
    for --workers unsaid: a word close to a launcher option is an error naming it."""
    for word in argv:
        name = word.split("=", 1)[0]
        close = (difflib.get_close_matches(name, options, 1, 0.75) if name.startswith("--") and name not in options
                 else [])
        if close:
            raise LaunchError(f"{word}: not an option of the launcher (nor an override of python -m trainer). "
                              f"Fix: {close[0]}.")


def worker_envs(where: Placement, options: str = "") -> List[dict]:
    """Each worker's environment: its TF_CONFIG, and the launcher's `options` (launch_command: how it resumes)."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHED_WITH: options}
    return [{**base, "TF_CONFIG": config} for config in where.tf_configs]


def own_options(args: argparse.Namespace) -> str:
    """The launcher's options as given (those left at their defaults left out), as a shell line."""
    given = [("--workers", args.workers, None), ("--max-restarts", args.max_restarts, MAX_RESTARTS),
             ("--port", args.port, None), ("--grace-period", args.grace_period, GRACE_PERIOD_S)]
    return " ".join(f"{name} {value:g}" for name, value, default in given if value != default)


def worker_command(overrides: List[str], where: Placement) -> List[str]:
    """`python -m trainer OVERRIDES strategy=multi_worker`, in one run folder for every worker: the user's
    hydra.run.dir, else runs/<recipe>/<one time> (SLURM: the job's and step's ids), as conf/config.yaml's default."""
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        stamp = where.run_time or time.strftime("%Y-%m-%d_%H-%M-%S")
        overrides = [*overrides, f"hydra.run.dir=runs/${{recipe}}/{stamp}"]
    return [sys.executable, "-m", "trainer", *overrides, ADDED]


class Signals:
    """SIGTERM and SIGINT while the launcher runs: passed to the group running now, or kept, so the launcher
    starts no group after one."""

    def __init__(self):
        self.received: Optional[int] = None
        self.group: Optional[Group] = None
        self.before = {}

    def install(self) -> None:
        self.before = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore(self) -> None:
        for sig, handler in self.before.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self.received = self.received or signum
        if self.group is not None:
            self.group.on_signal(signum)

    def follow(self, group: Optional[Group]) -> None:
        """The group signals go to now (None: between starts); one that arrived as it started reaches it."""
        self.group = group
        if group is not None and self.received:
            group.on_signal(self.received)

    def pause(self, seconds: float) -> None:
        """Sleeps, ending early on a signal."""
        end = time.monotonic() + seconds
        while not self.received and time.monotonic() < end:
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))


def check_overrides(overrides: List[str]) -> None:
    """The workers' overrides, checked here once as python -m trainer checks its command line (a typo: one
    message, exit 2, before any worker starts, not one per worker and the launcher's). Composing the config
    loads no TensorFlow."""
    from trainer.argv_check import problem_in

    problem = problem_in([*overrides, ADDED])
    if problem:
        raise LaunchError(problem)


def run(args: argparse.Namespace) -> int:
    """The group's starts; the exit code (the chief's, or the failed worker's once no restart is left)."""
    check_overrides(args.overrides)
    where = placement(os.environ, args.workers, args.port)
    named = any(o.startswith("hydra.run.dir=") for o in args.overrides)
    if where.where == "TF_CONFIG" and not named:  # each pod's launcher would stamp its own time: one folder each
        raise LaunchError("TF_CONFIG is set (a cluster of launchers, one per worker): every worker must name the same "
                          "run folder. Fix: add hydra.run.dir=PATH on storage all workers share.")
    signals = Signals()
    signals.install()
    try:
        return _starts(args, where, signals)
    finally:
        signals.restore()


def _starts(args: argparse.Namespace, where: Placement, signals: Signals) -> int:
    command = worker_command(args.overrides, where)
    say(f"{where.size} worker(s), {where.where}; this launcher starts "
        f"{', '.join(f'worker {i}' for i in where.indices)}; at most {args.max_restarts} restart(s)")
    envs = worker_envs(where, own_options(args))
    for start in range(args.max_restarts + 1):
        if start and where.where == "one host" and args.port is None:  # new free ports: the old may linger
            where = placement(os.environ, args.workers, None)
            envs = [{**env, "TF_CONFIG": config} for env, config in zip(envs, where.tf_configs)]
        if signals.received:
            return 128 + signals.received
        group = Group(command, envs, where.indices)
        signals.follow(group)
        ending = group.wait(args.grace_period)
        signals.follow(None)
        if ending.late:
            say(f"{names(ending.late)} after the chief (worker 0) finished with exit 0: the run is complete, "
                "not restarted (check that worker's output above)")
        if ending.signal is not None and ending.codes[0] in (130, 143):
            return 128 + ending.signal  # the signal the launcher got (a SIGINT is passed on as a SIGTERM)
        if ending.signal is not None or not ending.failed:
            return ending.codes[0]  # the chief's (one host: worker 0; a cluster: this task's)
        _lost_peer_note(group, ending.failed)
        failed = ending.failed[0]
        code = ending.codes[group.workers.index(failed)]
        if code in NOT_RESTARTED or start == args.max_restarts:
            return _give_up(ending.failed, code, start, args.max_restarts)
        pause = min(BACKOFF_S * 2 ** start, BACKOFF_MAX_S)
        say(f"{names(ending.failed)}: starting the group again in {pause:g} s (restart {start + 1} of "
            f"{args.max_restarts}); it resumes from the newest complete checkpoint")
        signals.pause(pause)
    raise AssertionError("unreachable")


def _lost_peer_note(group: Group, failed: List[Worker]) -> None:
    """A peer's loss fails the others' collectives with long UnavailableError tracebacks: said to be its echo."""
    echoes = [w for w in group.workers if w not in failed and exit_code(w.process.returncode) not in STOPPED]
    if echoes:
        lost = " and ".join(w.name for w in failed)
        say(" and ".join(f"{w.name} ({how_it_ended(w.process.returncode)})" for w in echoes) +
            f": its traceback above (UnavailableError, 'tasks have crashed', collective aborted) is the lost peer "
            f"({lost}), not a second fault")


def _give_up(failed: List[Worker], code: int, start: int, max_restarts: int) -> int:
    why = ("not restarted: the same input fails the same way" if code in NOT_RESTARTED
           else f"after {start} restart(s) of at most {max_restarts}")
    said = [f"{names(failed)}, {why}; exit {code}."]
    for w in failed:
        lines = "\n".join(f"  {line}" for line in w.last) or "  (no output)"
        whose = "Its" if len(failed) == 1 else f"{w.name}'s"
        said.append(f"{whose} last lines:\n{lines}")
    say(" ".join(said))
    return code


def main(argv: Optional[List[str]] = None) -> None:
    try:
        code = run(parse(sys.argv[1:] if argv is None else argv))
    except Exception as e:  # noqa: BLE001 - ours are one line, exit 2 (trainer/errors.py); others are bugs
        code = report_error(e, prefix="[launch] error: ")
        if code is None:
            raise
    sys.exit(code)


if __name__ == "__main__":
    main()
