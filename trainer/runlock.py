"""One run per run folder: the folder is checked writable and locked before anything is written into it.

The lock is `fcntl.flock` on `<run folder>/.trainer.lock`, which holds the owner's process id. The OS
releases a flock when its process ends, however it ends (a SIGKILL too), so there is no stale lock to
clean up; the file itself stays and means nothing without the flock. A flock is local to one machine
(and advisory): two machines writing one network folder are not caught.

The CLI takes the lock in a Hydra callback (`RunFolderCallback`), because Hydra opens the run's
trainer.log before the task function runs: a read-only folder would be a Hydra traceback, and a second
run would already have touched the first one's folder. The Python API takes it with `run_folder_lock`.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, read_write

from trainer.errors import UserError, report_error

LOCK_FILE = ".trainer.lock"
_held: Dict[Path, int] = {}  # folder -> lock descriptor, for the folders this process holds
_made: set = set()  # the run folders this process created (remove_if_unused may delete only those)


class RunFolderError(UserError, RuntimeError):
    """The run folder cannot be written, or another run holds it; the message names it and the fix."""


def _cannot_write(folder: Path, e: OSError) -> RunFolderError:
    why = {
        errno.EROFS: "is on a read-only file system",
        errno.EACCES: "is not writable (permission denied)",
        errno.EPERM: "is not writable (operation not permitted)",
        errno.ENOSPC: "has no space left on its device",
    }.get(e.errno, f"cannot be written ({e.strerror})")
    return RunFolderError(
        f"run folder {folder} {why}: nothing was written. Fix: pick a writable folder with "
        "hydra.run.dir=PATH (or make that one writable)."
    )


def acquire(folder, hold: bool = True) -> Optional[int]:
    """Creates `folder` if needed, checks it is writable and, with `hold`, locks it for this process.

    Returns the lock's file descriptor, to `release`; None without `hold`, or when this process holds
    the folder already (the CLI's lock, then Trainer.fit's: the outer one releases it).
    Raises RunFolderError naming the folder and, when another process holds it, that process's id.
    """
    folder = Path(os.path.abspath(folder))
    if hold and folder in _held:
        return None
    try:
        if not folder.exists():
            _made.add(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _cannot_write(folder, e) from None
    if not hold:
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        recorded, lock_stat = os.pread(fd, 300, 0).decode(errors="replace").split(), os.fstat(fd)
        os.close(fd)
        who, fix = _holder(folder / LOCK_FILE, lock_stat, recorded)
        raise RunFolderError(f"run folder {folder} is in use by another run ({who}): nothing was changed. Fix: {fix}, "
                             "or pick another folder with hydra.run.dir=PATH.") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise _cannot_write(folder, e) from None
    _held[folder] = fd
    return fd


def _openers(lock_stat: os.stat_result) -> Tuple[List[int], bool]:
    """(the other processes of this machine that have the lock file open, whether every process could be
    looked at). Matched on the file's device and inode, not its path: a run folder reached through a
    symlink has another path in /proc/PID/fd."""
    found, complete = [], True
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        try:
            fds = list((entry / "fd").iterdir())
        except FileNotFoundError:  # ended meanwhile
            continue
        except OSError:  # another user's process
            complete = False
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) == (lock_stat.st_dev, lock_stat.st_ino):
                    found.append(int(entry.name))
                    break
    return sorted(found), complete


def _started_after(pid: int, when: float) -> bool:
    """Whether process `pid` started after the time `when`: a PID the system reused since (/proc/PID/stat
    field 22 is its start in clock ticks after boot, /proc/stat's btime the boot)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0  # btime is whole seconds
    return False


def _command_of(pid: int) -> str:
    with contextlib.suppress(OSError):
        raw = (Path("/proc") / str(pid) / "cmdline").read_bytes()
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        return f": {command[:120]}" if command else ""
    return ""


def _holder(lock: Path, lock_stat: os.stat_result, recorded: List[str]) -> Tuple[str, str]:
    """(who holds the lock, what to do). The file names the run that took it (process id and host); a
    process that inherited the lock from it (one it forked) or another program can hold it after that run
    ended, so the file's process is checked against the processes that have the file open, and a process
    with its id that started after the file was written is another program (a reused id): no kill advice."""
    pid = int(recorded[0]) if recorded and recorded[0].isdigit() else None
    host = recorded[1] if len(recorded) > 1 else None
    named = f"process {pid} on host {host}" if host else f"process {pid}"
    if host not in (None, socket.gethostname()):
        return named, f"wait for that run to end (or stop it there: kill {pid} on {host})"
    openers, complete = _openers(lock_stat)
    running = pid is not None and _alive(pid) and not _started_after(pid, lock_stat.st_mtime)
    if pid is not None and (pid in openers or (running and not openers and not complete)):
        return f"{named}{_command_of(pid)}", f"wait for that run to end (or stop it: kill {pid})"
    said = (f"the lock file names {named}, which " + ("no longer holds it" if running else "no longer runs")
            if pid is not None else "the lock file names no process")
    if openers:
        holders = ", ".join(f"process {p}{_command_of(p)}" for p in openers)
        return (f"{said}; the lock is held by {holders}, which inherited it from that run or took it",
                f"end that process (kill {' '.join(map(str, openers))})")
    return (f"{said}; a process it started (which inherited the lock) or another program holds it: "
            f"`fuser -v {lock}` names it", "end that process")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def release(fd: Optional[int]) -> None:
    if fd is not None:
        for folder in [f for f, held in _held.items() if held == fd]:
            del _held[folder]
        os.close(fd)  # closing the descriptor drops the flock


def remove_if_unused(folder, leftovers: Tuple[str, ...] = (LOCK_FILE, "trainer.log")) -> bool:
    """Removes `folder` when this process created it and it holds nothing but `leftovers`: a run that failed on
    bad input before training (data, model, init_from), so it leaves no run folder, as a config error caught
    earlier does. The CLI's leftovers are its lock and the trainer.log Hydra opened; a Python run writes no
    trainer.log (one there is the user's), so it passes the lock alone. A folder that existed before (a previous
    run's) is never touched."""
    import logging

    folder = Path(os.path.abspath(folder))
    if (folder not in _made or not folder.is_dir()
            or any(p.name not in leftovers for p in folder.iterdir())):
        return False
    for handler in logging.getLogger().handlers[:]:  # Hydra's file handler writes trainer.log there
        file = Path(getattr(handler, "baseFilename", "/"))
        if file.parent == folder and file.name in leftovers:
            handler.close()
            logging.getLogger().removeHandler(handler)
    shutil.rmtree(folder, ignore_errors=True)
    _made.discard(folder)
    return True


@contextlib.contextmanager
def run_folder_lock(folder, hold: bool = True, remove_unused: bool = False) -> Iterator[None]:
    """Holds `folder`'s lock for the block (see `acquire`); `hold=False` (a non-chief worker) only
    checks that the folder is writable. `remove_unused` (Trainer.fit's, from Python): a block that this lock
    began and that ends on bad input (a UserError) before anything but the lock was written removes the folder
    it made (remove_if_unused), as the CLI does for a single run. A sweep job's lock (cli._job_folder_lock)
    leaves its folder, as the CLI does; under the CLI's own lock (or a non-chief's check) the folder is the
    CLI's to judge."""
    fd = acquire(folder, hold)
    try:
        yield
    except UserError:
        if remove_unused and fd is not None:
            remove_if_unused(folder, leftovers=(LOCK_FILE,))
        raise
    finally:
        release(fd)


def is_chief_process(strategy_name: str, tf_config: Optional[str] = None) -> bool:
    """Whether this process is the chief, read from TF_CONFIG before TensorFlow's strategy exists
    (the rule of trainer.distribute.is_chief: task "chief", or worker 0 of a cluster without one)."""
    if strategy_name != "multi_worker":
        return True
    config = json.loads(tf_config if tf_config is not None else os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task") or {}
    kind, index = task.get("type"), int(task.get("index", 0))
    return kind in (None, "chief") or (kind == "worker" and index == 0 and "chief" not in config.get("cluster", {}))


def _remove_on_sigterm(folder: str):
    """Until the run defers SIGTERM (trainer/signals.py: from the strategy on), a SIGTERM (a platform stopping the
    job while it starts) would kill the process with the folder it just made left behind, empty but for its lock
    and an empty trainer.log. This handler removes such a folder, as any stop before training does, then dies of
    the signal (exit 143). Only over the default handler, on the main thread; the handler, or None."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def stop(signum, frame):
        if remove_if_unused(folder):
            print(f"[trainer][WARNING] - SIGTERM during start-up: removed the run folder {folder} this run had made "
                  "(nothing was trained in it)", file=sys.stderr, flush=True)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)
    return stop


def _fail(e: UserError) -> None:
    """Hydra's logging is not set up yet (that is the point): the message goes to stderr, exit 2."""
    sys.exit(report_error(e, prefix="[trainer][ERROR] - "))


class RunFolderCallback(HydraCallback):
    """conf/config.yaml's hydra.callbacks: before Hydra creates a run's folder and opens its log, check
    the config (trainer.config.check_config) and the folder, and lock it until the run ends. A multirun's
    jobs lock their folders in trainer/cli.py: an error there must fail one job, not end the sweep."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.scratch: Optional[str] = None
        self.sigterm = None  # the handler _remove_on_sigterm installed

    def _take(self, config: DictConfig, folder: str) -> None:
        from trainer.config_check import check_config
        from trainer.quiet import quiet_tensorflow_import

        try:
            check_config(config, config.hydra.runtime.choices)
            # The config is good, so a run starts: TensorFlow loads now, before the folder exists (an interrupt
            # while it loads leaves none) and before fast_dev_run's scratch removal is registered (exit hooks
            # run last-registered first: the removal must come before TensorFlow's and trainer.iterator_release's own).
            quiet_tensorflow_import()
            if OmegaConf.select(config, "trainer.fast_dev_run"):
                folder = self._scratch_folder(config)
            self.fd = acquire(folder, hold=is_chief_process(str(OmegaConf.select(config, "strategy.name"))))
        except UserError as e:  # ConfigError, RunFolderError
            _fail(e)
        self.sigterm = _remove_on_sigterm(folder)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # The same config object run_job reads the folder from: Hydra caches ${now:...} per config,
        # so both see the same time.
        self._take(config, str(OmegaConf.select(config, "hydra.run.dir")))

    def _scratch_folder(self, config: DictConfig) -> str:
        """trainer.fast_dev_run keeps nothing: the run (its trainer.log too) goes to a temporary folder,
        deleted at the end, and the configured run folder, maybe an existing run's, is not even opened."""
        self.scratch = tempfile.mkdtemp(prefix="trainer-fast-dev-run-")
        atexit.register(shutil.rmtree, self.scratch, ignore_errors=True)  # also after an exit (a user error)
        with read_write(config.hydra.run):  # run_job reads the folder from here next
            config.hydra.run.dir = self.scratch
        return self.scratch

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release(self.fd)
        self.fd = None
        if self.sigterm is not None and signal.getsignal(signal.SIGTERM) is self.sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
