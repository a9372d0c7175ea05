"""SIGTERM and SIGINT: the training loop's flag, and a SIGTERM that arrives while a run is starting.

A platform stops a job with SIGTERM, then SIGKILL after a grace period. During the loop the signal
becomes a flag checked after each loop of steps (save, exit 143). Between the strategy and the loop
(data, model: minutes for a large one) the CLI remembers a SIGTERM instead of dying, and
the loop honours it before its first step. That matters under multi-worker: a worker that dies after the
collectives formed leaves its peers blocked until TensorFlow's timeout, whereas a remembered SIGTERM
reaches TF's preemption handler, and every worker saves and exits together.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from typing import Callable, Optional

log = logging.getLogger("trainer")

_pending_sigterm = False
_before_deferral = signal.SIG_DFL  # the SIGTERM handler the deferral replaced


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _remember_sigterm(signum, frame) -> None:
    global _pending_sigterm
    if _pending_sigterm:  # the second one: stop now, as the default handler would have
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _pending_sigterm = True
    log.warning("SIGTERM during start-up: the run stops when its training loop begins (under multi-worker, "
                "after every worker saved); a second SIGTERM stops it now")


@contextlib.contextmanager
def sigterm_deferred_until_training():
    """Within this block, a first SIGTERM is remembered for the training loop (see the module docstring)."""
    global _pending_sigterm, _before_deferral
    if not _on_main_thread():
        yield
        return
    _before_deferral = signal.signal(signal.SIGTERM, _remember_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _before_deferral)
        _pending_sigterm, _before_deferral = False, signal.SIG_DFL


def reclaim_sigterm_from_tensorflow() -> None:
    """MultiWorkerMirroredStrategy's coordination service installs a C++ SIGTERM handler that swallows
    the signal (the process neither dies nor tells Python), so a SIGTERM between the strategy and the
    training loop was lost: the run went on to the end. Re-installing Python's handler takes it back."""
    restore_sigterm(signal.getsignal(signal.SIGTERM))


def _outside_deferral(handler):
    return _before_deferral if handler is _remember_sigterm else handler


def sigterm_handler_outside_deferral():
    """The SIGTERM handler to put back after fit() (the one before the start-up deferral, if on)."""
    return _outside_deferral(signal.getsignal(signal.SIGTERM))


def restore_sigterm(handler) -> None:
    if _on_main_thread() and handler is not None:
        signal.signal(signal.SIGTERM, handler)


def take_pending_sigterm() -> bool:
    """True once if a SIGTERM arrived during start-up: the caller now owns it."""
    global _pending_sigterm
    pending, _pending_sigterm = _pending_sigterm, False
    return pending


def sigterm_owned_by(handler_object) -> bool:
    """Whether SIGTERM now goes to a method of `handler_object` (TF's PreemptionCheckpointHandler installs
    one, except on GCP VMs, where it polls maintenance notices or is unsupported)."""
    return getattr(signal.getsignal(signal.SIGTERM), "__self__", None) is handler_object


class SignalCatcher:
    """Turns SIGTERM/SIGINT into a flag the loop checks between loops of steps (main thread only); a
    repeated SIGTERM is logged and waits for the save, a second SIGINT stops at once. The
    start-up deferral ends here: a SIGTERM remembered during start-up sets the flag at once (also when
    SIGTERM is not among `signals`, as under multi-worker on GCP VMs, where SIGTERM keeps its default
    from now on), and on exit SIGTERM gets the handler it had before the deferral."""

    def __init__(self, *signals):
        self.signals = signals
        self.signum = None
        self._previous = {}
        self._acknowledged = False

    def __enter__(self):
        if _on_main_thread():
            for sig in self.signals:
                self._previous[sig] = _outside_deferral(signal.signal(sig, self._handle))
            if signal.SIGTERM not in self.signals:
                restore_sigterm(sigterm_handler_outside_deferral())
            if take_pending_sigterm():
                self.signum = signal.SIGTERM
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGTERM:  # repeated by a supervisor: the first one's save goes on
            log.warning("SIGTERM again: finishing the save (or the run's end) the first %s asked for (SIGKILL "
                        "stops at once)", signal.Signals(self.signum).name)
        else:  # a person's second Ctrl-C: stop now
            raise KeyboardInterrupt

    def __exit__(self, exc_type, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        passed_on = self.signum is not None and self._previous.get(self.signum) is _stop_command
        self._previous = {}
        if passed_on:  # a command with nothing to save (stops_on_signals) stops: not "finished despite"
            self._acknowledged = True
            signal.raise_signal(self.signum)
        if exc_type is None and self.signum is not None and not self._acknowledged:
            # The loop stops early only before its last loop: a signal in that loop, the final evaluation or
            # the final save lets the run finish (a stop there would leave a complete run never evaluated).
            self._acknowledged = True
            global _finished_despite
            _finished_despite = self.signum
            log.warning("Received %s during the last loop of steps, the final evaluation, the final save or the "
                        "summary: the run finished instead of stopping (it is complete: nothing to resume)",
                        signal.Signals(self.signum).name)
        return False


_finished_despite = None  # the signal the last run finished despite (SignalCatcher.__exit__), until taken


def take_signal_the_run_finished_despite():
    """The signal (SIGTERM, SIGINT) absorbed in the last loop, the final evaluation, save or summary of the
    run that just ended, else None; cleared. A multirun stops its sweep after that job (trainer.cli)."""
    global _finished_despite
    signum, _finished_despite = _finished_despite, None
    return signum


def hand_pending_sigterm_to_tensorflow() -> None:
    """Multi-worker: TF's PreemptionCheckpointHandler owns SIGTERM now (see sigterm_owned_by); one
    remembered during start-up is sent again, so TF tells every worker to save at the same step. Call
    it before the loop's SignalCatcher, which would otherwise take the pending SIGTERM as its own."""
    if _on_main_thread() and take_pending_sigterm():
        log.warning("Passing the start-up SIGTERM to TensorFlow's preemption handler: every worker saves, then exits")
        signal.raise_signal(signal.SIGTERM)


class CommandStopped(BaseException):
    """SIGTERM/SIGINT to a command that saves nothing (the doctor, lr_find): raised where the signal lands (a
    fit() of theirs finishes its loop first, SignalCatcher.__exit__). A BaseException, as KeyboardInterrupt: an
    `except Exception` that keeps measuring after one configuration fails does not take it for a failure."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # as a shell reports the signal: 143, 130


_stopping = False  # a CommandStopped is on its way: a repeated signal while it unwinds is ignored


def _stop_command(signum, frame) -> None:
    global _stopping
    if not _stopping:
        _stopping = True
        raise CommandStopped(signum)


_kept_message: Optional[str] = None  # what a command under stops_on_signals has written so far (now_kept)


def now_kept(message: str) -> None:
    """A command under stops_on_signals has written its results: a signal from now on says `message` instead of
    its `nothing_kept` (the doctor's report is on disk; what follows it, --set-auto and the plot, may not be)."""
    global _kept_message
    _kept_message = message


def stops_on_signals(nothing_kept: str) -> Callable:
    """Decorates a command's `main`: SIGTERM and SIGINT (one not ignored at start) stop it at once, also
    while TensorFlow loads; it prints one line, `stopped by SIGTERM: <nothing_kept>`, with no traceback,
    and `main` returns 143 / 130. Before, the doctor's Trainers took a signal for theirs and let their
    fit() finish, so the doctor ran on to a normal report and exit 0."""
    def decorate(main: Callable) -> Callable:
        @functools.wraps(main)
        def run(*args, **kwargs):
            global _stopping, _kept_message
            if not _on_main_thread():
                return main(*args, **kwargs)
            previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
            for sig, handler in previous.items():
                if handler is not signal.SIG_IGN:  # `nohup` or `&` in a script: left ignored
                    signal.signal(sig, _stop_command)
            try:
                return main(*args, **kwargs)
            except CommandStopped as e:
                print(f"stopped by {e}: {_kept_message or nothing_kept}", file=sys.stderr, flush=True)
                from trainer.iterator_release import exit_promptly

                exit_promptly(e.exit_code)  # not the wait for the iterators' releases
                return e.exit_code
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
                _stopping, _kept_message = False, None
        return run
    return decorate
