"""One start of the workers this launcher owns: processes, their output prefixed by worker, how the group ended.

Each worker is a `python -m trainer ... strategy=multi_worker` process in a session of its own, so a signal
sent to the launcher's process group (a terminal's Ctrl-C, `kill -- -PGID`) reaches a worker only through
the launcher, once. On Linux a worker also gets a SIGTERM when the launcher dies (PR_SET_PDEATHSIG), so it
saves and ends rather than keep the run folder's lock and its port; one that hangs then is not killed.
"""
from __future__ import annotations

import collections
import ctypes
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Deque, List, Optional

from trainer.launch.cluster import LaunchError

LAST_LINES = 12  # of a failed worker's output, in the launcher's last message
POLL_S = 0.1
STOPPED = (0, 130, 143)  # exit codes of a worker that finished, or saved and stopped on a signal (SIGINT, SIGTERM)
_print_lock = threading.Lock()


def exit_code(returncode: int) -> int:
    """A shell's exit code for a process's return code (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def how_it_ended(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited {returncode}"


def say(message: str) -> None:
    """The launcher's own lines, among the workers' prefixed ones."""
    with _print_lock:
        print(f"[launch] {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@dataclass
class Worker:
    index: int
    process: subprocess.Popen
    last: Deque[str]

    @property
    def name(self) -> str:
        return f"worker {self.index}"


ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"\[\d+:\d\d(:\d\d)?(<[\d:?]+)?,\s+[^\]]*/s")  # tqdm's "[00:05<00:12, 5.66step/s"


def is_progress(line: str) -> bool:
    """A progress bar's redraw (a carriage-return segment of tqdm's) or what is left of one: no last line."""
    text = ESCAPE.sub("", line).strip()
    return not text or bool(PROGRESS.search(text))


def _relay(stream, out, prefix: str, last: Deque[str]) -> None:
    """Each line (the text stream splits tqdm's carriage returns too) prefixed, and ended with a newline even
    when the worker died in the middle of one, so the launcher's next line starts on a line of its own."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if not is_progress(line):
            last.append(line)
        with _print_lock:
            out.write(f"{prefix}{line}\n")
            out.flush()
    stream.close()


@dataclass
class Ending:
    """How a group ended: `failed` are the workers that first ended abnormally (empty: none did; several:
    they ended within one poll, which came first is not known); `late` those that failed after the chief
    finished (exit 0): the run is complete, nothing to restart."""

    codes: List[int]  # each worker's exit code, in the launcher's order
    failed: List[Worker] = field(default_factory=list)
    signal: Optional[int] = None  # the signal the launcher received and passed on
    late: List[Worker] = field(default_factory=list)


def names(workers: List[Worker]) -> str:
    """'worker 1 was killed by SIGKILL' or, for several, each with how it ended."""
    return " and ".join(f"{w.name} {how_it_ended(w.process.returncode)}" for w in workers)


class Group:
    """The workers of one start: the constructor starts them; `wait` follows them to their end."""

    def __init__(self, command: List[str], envs: List[dict], indices: List[int]):
        self.workers: List[Worker] = []
        self.relays: List[threading.Thread] = []
        self.received: Optional[int] = None
        # said once by wait(), not in the signal handler (it may hold the print lock)
        self.passed_on: Optional[str] = None
        self.sent_sigterm = False
        for env, index in zip(envs, indices):
            # utf-8 with replacement: one undecodable byte must not
            # end the relay (the worker would block on a full pipe)
            try:
                process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           encoding="utf-8", errors="replace", bufsize=1, start_new_session=True,
                                           preexec_fn=_die_with_parent)
            except OSError as e:
                self.stop(signal.SIGKILL)
                raise LaunchError(f"worker {index} could not start: {command[0]}: {e.strerror or e}. Fix: run the "
                                  "launcher with a Python that has the trainer installed.") from None
            self.workers.append(Worker(index, process, collections.deque(maxlen=LAST_LINES)))
            say(f"worker {index}: process {process.pid}")
        for worker in self.workers:  # threads only once every fork is done (preexec_fn in a threaded process)
            for stream, out in ((worker.process.stdout, sys.stdout), (worker.process.stderr, sys.stderr)):
                relay = threading.Thread(target=_relay, args=(stream, out, f"[w{worker.index}] ", worker.last),
                                         daemon=True)
                relay.start()
                self.relays.append(relay)

    def signal_all(self, signum: int) -> int:
        """Sends `signum` to the workers still running; returns how many."""
        sent = 0
        for w in self.workers:
            if w.process.poll() is None:
                try:
                    w.process.send_signal(signum)
                    sent += 1
                except ProcessLookupError:
                    pass
        return sent

    def on_signal(self, signum: int) -> None:
        """The launcher's SIGTERM or SIGINT: passed on to every worker as a SIGTERM, once: TensorFlow's preemption
        handler makes every worker save at one step on it. A SIGINT is each worker's own: they stopped at the step
        boundaries they had reached, and one went on into a collective the others had left (a traceback, no
        save). A SIGINT after that stops them at once, as a second Ctrl-C stops one process: a SIGKILL (a SIGINT
        would be each worker's first signal of its own, TensorFlow's handler having taken the SIGTERM); the newest
        complete checkpoint is kept, and what a save it cut short left is removed at the next start."""
        self.received = self.received or signum
        if self.sent_sigterm and signum == signal.SIGTERM:  # already sent (a second one, or the stop after a failure)
            return
        passed = signal.SIGKILL if self.sent_sigterm else signal.SIGTERM
        self.sent_sigterm = True
        sent = self.signal_all(passed)
        as_sent = "" if passed == signum else f" as {passed.name}, on which every worker saves at one step"
        self.passed_on = self.passed_on or f"received {signal.Signals(signum).name}: passed it on to {sent} worker(s)" \
                                           f"{as_sent}"

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if signum == signal.SIGTERM:
            if self.sent_sigterm:
                return
            self.sent_sigterm = True
        self.signal_all(signum)

    def _chief_finished(self) -> bool:
        chief = next((w for w in self.workers if w.index == 0), None)
        return chief is not None and chief.process.returncode == 0

    def wait(self, grace_s: float) -> Ending:
        """Until every worker ended. The first that ends abnormally (not 0, not a save on a signal: 143/130)
        makes the launcher stop the others with SIGTERM; after that, or after a signal it passed on, those
        still running after `grace_s` get SIGKILL: with a peer gone, the survivors' collectives fail or wait,
        and a save needs every worker. A failure after the chief's exit 0 stops nothing: the run is complete."""
        ended: set = set()
        failed: List[Worker] = []
        late: List[Worker] = []
        deadline, killed = None, False
        said_signal = False
        while True:
            if self.passed_on and not said_signal:
                say(self.passed_on)
                said_signal = True
            newly = [w for w in self.workers if w.index not in ended and w.process.poll() is not None]
            ended.update(w.index for w in newly)
            abnormal = [w for w in newly if exit_code(w.process.returncode) not in STOPPED]
            if abnormal and not failed and self.received is None:
                if self._chief_finished():
                    late += abnormal
                else:
                    failed = abnormal
                    if len(self.workers) > len(ended):
                        say(f"{names(failed)}: stopping the others (SIGTERM)")
                    self.stop()
            if deadline is None and not killed and (failed or self.received is not None):
                deadline = time.monotonic() + grace_s
            if len(ended) == len(self.workers):
                break
            if deadline is not None and time.monotonic() > deadline:
                say(f"worker(s) still running {grace_s:g} s after the stop (--grace-period): SIGKILL")
                self.stop(signal.SIGKILL)
                deadline, killed = None, True
            time.sleep(POLL_S)
        for relay in self.relays:
            relay.join(timeout=5)
        return Ending([exit_code(w.process.returncode) for w in self.workers], failed, self.received, late)
