"""Finished tf.data iterators are destroyed on a release thread, and the exit hook waits for those releases.

Destroying an iterator can block until its autotuning thread wakes (docs/internals.md, "tf.data iterator
teardown"), so the Trainer's modules hand the iterators they are done with to `release_in_background`, and a
Trainer's kept iterator is known here (`hold_until_exit`) so that the exit hook lets go of it too. This module
owns that state (the pending releases, the kept iterators, the exit code a command line asked for); it loads
no TensorFlow, and registers its exit hook once TensorFlow has loaded.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref
from typing import Optional

from trainer.quiet import when_loaded

log = logging.getLogger("trainer.data")  # the log channel of these lines before they had a module of their own

_releasing: "set[threading.Thread]" = set()
_exiting = False  # set at exit (_finish_releases_at_exit): a release started after it dies in place
_distributed: "set[threading.Thread]" = set()  # those releasing iterators over several replicas (they aborted)
_exit_code: Optional[int] = None  # a command line's non-zero exit (exit_promptly)
_kept: "weakref.WeakSet" = weakref.WeakSet()  # holders of an iterator kept between calls (hold_until_exit)


def release_in_background(holder: list, replicas: int = 1) -> None:
    """Empties `holder`, whose items are the only references to tf.data iterators, on a daemon thread.

    With tf.data autotuning on (the default), destroying an iterator can block until its autotuning
    thread's next wake-up: 10 ms after the iterator was made, then at doubling periods up to 60 s, so up
    to the iterator's own age (docs/internals.md, "tf.data iterator teardown"). The wait releases the
    GIL, so a thread absorbs it while training goes on; at exit the process waits for it
    (_finish_releases_at_exit), long only for iterators of a strategy with several `replicas`."""
    if _exiting or sys.is_finalizing():  # a thread started now never runs, or outlives the join at exit
        holder.clear()
        return
    thread = threading.Thread(target=_clear, args=(holder,), name="trainer-release-iterator", daemon=True)
    _releasing.add(thread)
    if replicas > 1:
        _distributed.add(thread)
    thread.start()


def _clear(holder: list) -> None:
    holder.clear()
    _distributed.discard(threading.current_thread())
    _releasing.discard(threading.current_thread())


def hold_until_exit(holder) -> None:
    """`holder` (inputs.KeptIterator) keeps an iterator between calls. Still held at exit (a Trainer in a global), it
    is let go by the exit hook: the teardown destroyed it in place, a multi-replica one idling 10-60 s unsaid."""
    _kept.add(holder)


def _let_go_of_kept() -> int:
    """Starts the releases of the iterators still held; returns how many are over several replicas (waited for)."""
    held = [h for h in list(_kept) if h.iterator is not None]
    for holder in held:
        holder.let_go()
    return sum(h.replicas > 1 for h in held)


def _join_releases(timeout: float = 120.0, held_at_exit: int = 0) -> None:
    """Waits for the pending releases: the wait ends at the autotuner's next wake-up, its period at most
    60 s; `timeout` only guards against a TensorFlow that never returns. Past a second it is said: a warning
    with the way out when Trainers still held iterators at exit (`held_at_exit`), else a line."""
    deadline = time.monotonic() + timeout
    said = False
    for thread in list(_releasing):
        thread.join(max(0.0, min(1.0, deadline - time.monotonic())))
        if thread.is_alive() and not said and timeout > 2.0:
            said = True
            if held_at_exit:
                log.warning(HELD_AT_EXIT, held_at_exit)
            else:
                log.info("Waiting for tf.data to free %d finished iterator(s) (until its autotuner's next wake-up, "
                         "at most a minute)", len(_releasing))
        thread.join(max(0.0, deadline - time.monotonic()))


HELD_AT_EXIT = (  # the warning of _join_releases when Trainers held iterators at exit
    "Waiting for tf.data to free the training iterator of %d Trainer(s) still alive at exit (a Trainer in a global "
    "variable): an iterator over several replicas waits for its autotuner's next wake-up, up to a minute. To exit "
    "without it, free the Trainer once done with it (`del trainer`, or build it inside a function that returns): its "
    "iterator is then freed in the background while the script goes on (docs/faults.md, 'A script waits at exit')")


def exit_promptly(code: int) -> None:
    """A command line ends with `code`: the exit must not wait up to a minute for the iterators' releases (a 30 s
    grace period's SIGKILL follows a SIGTERM's 143; 0: its run is done, its Trainer freed, nothing is left to
    wait for but the teardown of an iterator no one uses)."""
    global _exit_code
    _exit_code = code


def _finish_releases_at_exit() -> None:
    """A release thread of a multi-replica iterator still inside its destructor when the interpreter
    finalizes is ended by pthread_exit through a noexcept C++ frame: a finished run aborted ("FATAL:
    exception not rethrown", exit -6). So the process waits for those; at a command line's exit (exit_promptly)
    it ends at once instead (os._exit skips the finalizing, and the later exit hooks have run).
    Single-replica releases get 2 s: exiting with one still blocked ended cleanly in every trial."""
    global _exiting
    held = _let_go_of_kept()  # before _exiting: their releases start on threads
    _exiting = True
    try:
        if not _distributed:
            _join_releases(timeout=2.0)
        elif _exit_code is not None:
            _end_now(_exit_code)
        else:
            _join_releases(held_at_exit=held)
    except KeyboardInterrupt:  # Ctrl-C during the wait: the exit it asks for, without a traceback
        _end_now(130)


# Registered once TensorFlow has loaded (this module loads it lazily): the hook runs before TensorFlow's own
# exit hooks (its import registers seven), and after the ones registered later (a run's).
when_loaded("tensorflow", lambda: atexit.register(_finish_releases_at_exit))


def _end_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams: nothing left to write
            pass
    logging.shutdown()
    os._exit(code)
