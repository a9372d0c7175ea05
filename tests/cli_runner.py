"""Runs a `python -m MODULE ARGS` command for a test: in this process when that is faithful, else in a new one.

A new process pays TensorFlow's import (4-10 s), so most CLI tests run the command's real entry point
in the test's own process, with `sys.argv`, the working directory, stdout and stderr as a process would
have them, and return what `subprocess.run` returns (returncode, stdout, stderr). What cannot be undone
in a process, or must be set before TensorFlow starts, gets a real process:
- an `env=` (TF_CONFIG, CUDA_VISIBLE_DEVICES, PYTHONPATH are read once, at start-up);
- a strategy that sets up devices (mirrored, multi_worker, tpu, logical CPUs: TensorFlow allows that
  only before it initializes), joblib's launcher (it starts processes anyway);
- `process=True`: the test is about the process itself (exit path, signals, a lock held by another process).
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
import warnings
from typing import Iterable, Optional

# Overrides that need a process of their own (see the module docstring).
PROCESS_ONLY = ("strategy=mirrored", "strategy=multi_worker", "strategy=tpu", "strategy.logical_cpus",
                "hydra/launcher=joblib")


ALWAYS_PROCESS = {"on": False}  # set by conftest for `slow` tests: they keep their real processes


def needs_process(args: Iterable[str]) -> bool:
    return ALWAYS_PROCESS["on"] or any(arg.startswith(prefix) for arg in args for prefix in PROCESS_ONLY)


def run_process(argv, cwd=None, timeout: int = 900, env=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=full_env)


def run_module(module: str, args, cwd=None, timeout: int = 900, env=None, process: bool = False):
    """`python -m module *args`, in this process unless it needs its own (see the module docstring)."""
    args = [str(a) for a in args]
    if process or env or needs_process(args):
        return run_process([sys.executable, "-m", module, *args], cwd=cwd, timeout=timeout, env=env)
    return _in_this_process(module, args, cwd)


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # sys.exit("message"): Python prints it and exits 1
    return 1


def _main_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec.submodule_search_locations:  # a package: python -m runs its __main__
        spec = importlib.util.find_spec(f"{module}.__main__")
    return spec.origin


def run_script(path, args=(), cwd=None, timeout: int = 900, env=None, process: bool = False):
    """`python PATH *args`, in this process unless it needs its own (see the module docstring)."""
    args = [str(a) for a in args]
    if process or env or ALWAYS_PROCESS["on"]:
        return run_process([sys.executable, str(path), *args], cwd=cwd, timeout=timeout, env=env)
    return _in_this_process(str(path), args, cwd, script=True)


def _in_this_process(target: str, args, cwd: Optional[str], script: bool = False) -> subprocess.CompletedProcess:
    from hydra.core.global_hydra import GlobalHydra

    from trainer import runlock

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = (sys.argv[:], os.getcwd(), root.handlers[:], root.level, _logger_states(), set(sys.modules), sys.path[:],
             set(runlock._held))
    sigterm = signal.getsignal(signal.SIGTERM)  # a run that exits early keeps its start-up handler (runlock.py)
    folder = os.path.abspath(cwd or os.getcwd())
    sys.argv = [target if script else _main_file(target), *args]
    # python -m puts the working directory first (a user's step module), python FILE the file's folder
    sys.path.insert(0, os.path.dirname(os.path.abspath(target)) if script else folder)
    code = 0
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings(), \
                _pytest_log_handlers_kept_open(), _os_exit_ends_the_command():
            warnings.simplefilter("default")  # a fresh process shows each warning once
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # runpy's, of this way
            warnings.filterwarnings("ignore", "'trainer.*' found in sys.modules", RuntimeWarning)
            try:
                if script:
                    runpy.run_path(target, run_name="__main__")
                else:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = _exit_code(e.code)
            except Exception:  # noqa: BLE001 - an uncaught error: a traceback and exit 1, as a process
                traceback.print_exc()
                code = 1
    finally:
        _restore(*saved, folder)
        signal.signal(signal.SIGTERM, sigterm)
        GlobalHydra.instance().clear()
    argv = [sys.executable, target] if script else [sys.executable, "-m", target]
    return subprocess.CompletedProcess([*argv, *args], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _os_exit_ends_the_command():
    """A command that ends with os._exit (the doctor skips the interpreter's teardown) ends the command
    here, not the test's process."""
    from unittest import mock

    def exit_command(code):
        raise SystemExit(code)

    with mock.patch.object(os, "_exit", exit_command):
        yield


@contextlib.contextmanager
def _pytest_log_handlers_kept_open():
    """Hydra configures logging with dictConfig, which closes every handler of the process: in a new
    process those are none, here they are pytest's own (caplog's, the report's). Only the command's own
    handlers are closed."""
    import logging.config
    from unittest import mock

    before = {ref() for ref in logging._handlerList}

    def clear_new_handlers():
        logging._handlers.clear()
        logging.shutdown([ref for ref in logging._handlerList if ref() not in before])

    with mock.patch.object(logging.config, "_clearExistingHandlers", clear_new_handlers):
        yield


def _logger_states() -> dict:
    """Each named logger's level, disabled and propagate flags and handlers: a script may change them
    (benchmarks/bench.py quiets `trainer`, the doctor stops `tensorflow` propagating); and Keras' interactive
    logging (bench.py turns it off: Keras' progress bars and summaries then go to absl's log instead)."""
    import keras

    states = {name: (logger.level, logger.disabled, logger.propagate, logger.handlers[:])
              for name, logger in logging.Logger.manager.loggerDict.items() if isinstance(logger, logging.Logger)}
    return {"loggers": states, "keras_interactive": keras.config.is_interactive_logging_enabled()}


def _restore_loggers(saved: dict) -> None:
    """The loggers that were there before the command get their state back (handlers it added are closed);
    one a library made on its first import keeps the setting that import gave it, as the module stays loaded."""
    import keras

    for name, (level, disabled, propagate, handlers) in saved["loggers"].items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.setLevel(level)
        logger.disabled, logger.propagate, logger.handlers[:] = disabled, propagate, handlers
    if saved["keras_interactive"]:
        keras.config.enable_interactive_logging()
    else:
        keras.config.disable_interactive_logging()


def _restore(argv, cwd, handlers, level, loggers, modules, path, locks, folder) -> None:
    """Puts back what a process would have taken away at its end: logging (handlers, levels), the working
    directory, the user's modules loaded from the run's folder, run-folder locks, TensorFlow's process-wide settings."""
    import trainer
    from trainer import iterator_release, runlock

    sys.argv, sys.path[:] = argv, path
    os.chdir(cwd)
    root = logging.getLogger()
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    _restore_loggers(loggers)
    library = os.path.dirname(os.path.realpath(trainer.__file__)) + os.sep  # stays loaded, as in one process
    for name in set(sys.modules) - modules:
        origin = os.path.realpath(getattr(sys.modules[name], "__file__", None) or "")
        if origin.startswith(os.path.realpath(folder) + os.sep) and not origin.startswith(library):
            del sys.modules[name]
    for held in set(runlock._held) - locks:  # a lock the command's process would have dropped at exit
        runlock.release(runlock._held[held])
    # The code the command's exit hook would have ended its process with (iterator_release.exit_promptly, also 0):
    # at the test run's exit it would replace pytest's own.
    iterator_release._exit_code = None
    reset_process_state()


def reset_process_state(free_memory: bool = False) -> None:
    """TensorFlow's and Keras' process-wide settings as a new process has them: the float32 policy, op
    determinism, XLA auto-clustering and numeric checks off, a fresh Keras session, the trainer's
    once-per-process warnings not yet given."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework import config as tf_config  # disable_op_determinism is not public

    from trainer import precision

    keras.mixed_precision.set_dtype_policy("float32")
    if tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()
    tf.config.optimizer.set_jit(False)
    tf.debugging.disable_check_numerics()
    keras.backend.clear_session(free_memory=free_memory)
    precision.forget_said_once()
