"""Keeps TensorFlow's C++ start-up noise (CUDA probing, oneDNN notes) off the terminal by default, and
registers trainer's Keras classes whenever Keras loads (and calls what `when_loaded` was given once its
module has loaded).

Those lines are printed by C++ before Python can set any log level, so the only way to hide them is to
point file descriptor 2 elsewhere while TensorFlow loads. Set TRAINER_TF_LOGS=1 to see them.

`import trainer` does not load TensorFlow (so `trainer.config` and `trainer.errors` stay light): it calls
`quiet_when_loaded()` and `register_when_keras_loaded()`, and whatever imports TensorFlow or Keras first in
this process (a trainer module, the user's own `import keras`) loads it quietly, and a `.keras` file
holding trainer's classes (Float32Outputs, Warmup, ScaledSchedule) loads after a plain `import trainer`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import logging
import importlib.util
import os
import sys
import tempfile

# The modules whose classes Keras files name.
_REGISTERING = ("trainer.precision", "trainer.optim", "trainer.layers", "trainer.fused_elementwise")


def quiet_tensorflow_import() -> None:
    """Loads TensorFlow now, quietly (the commands do, before their first slow step)."""
    quiet_when_loaded()
    import tensorflow  # noqa: F401


def quiet_when_loaded() -> None:
    """The first import of TensorFlow in this process runs with fd 2 captured (once; nothing if already loaded)."""
    if "tensorflow" in sys.modules or os.environ.get("TRAINER_TF_LOGS") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read by TensorFlow's C++ logging when it loads
    _finder().watch("tensorflow", _QuietLoader)


RETRACING = "triggered tf.function retracing"  # TensorFlow's warning when one function's code traces again


def _not_retracing(record: logging.LogRecord) -> bool:
    return RETRACING not in record.getMessage()


@contextlib.contextmanager
def no_retracing_warnings():
    """Within it, TensorFlow's "N out of the last M calls to <function ...> triggered tf.function retracing"
    warning is dropped (the doctor builds one Trainer, or one matmul, per configuration on purpose: the
    warning counts the traces of the same code and would only be noise); every other message still shows."""
    logger = logging.getLogger("tensorflow")  # tf.get_logger()'s: no TensorFlow import needed
    logger.addFilter(_not_retracing)
    try:
        yield
    finally:
        logger.removeFilter(_not_retracing)


def register_when_keras_loaded() -> None:
    """Trainer's Keras serializables are registered once Keras is loaded (now, if it already is)."""
    if "keras" in sys.modules:
        _register()
    else:
        _finder().watch("keras", _RegisteringLoader)


def when_loaded(name: str, call) -> None:
    """`call()` once the module `name` has loaded: now if it has, else right after its import, whoever imports
    it (trainer.iterator_release registers its exit hook after TensorFlow's own that way)."""
    if name in sys.modules:
        call()
    else:
        _finder().calls.setdefault(name, []).append(call)


def _register() -> None:
    for name in _REGISTERING:
        importlib.import_module(name)  # a module mid-import (the one that imported keras) finishes on its own


def _finder() -> "_LoadHooks":
    for finder in sys.meta_path:
        if isinstance(finder, _LoadHooks):
            return finder
    finder = _LoadHooks()
    sys.meta_path.insert(0, finder)
    return finder


class _LoadHooks(importlib.abc.MetaPathFinder):
    """Finds a watched module through the other finders and wraps its loader. It stays until that loader
    runs: a probe (importlib.util.find_spec, as mlflow and etils do) is not the import."""

    def __init__(self) -> None:
        self.wrappers = {}  # module name -> loader wrapper class
        self.calls = {}  # module name -> what to call once it has loaded (when_loaded)
        self.busy = False  # inside our own find_spec call: let the other finders answer

    def watch(self, name: str, wrapper) -> None:
        self.wrappers[name] = wrapper

    def loaded(self, name: str) -> list:
        """Forgets `name` (its loader runs now); returns the calls due once it has run."""
        self.wrappers.pop(name, None)
        calls = self.calls.pop(name, [])
        if not self.wrappers and not self.calls and self in sys.meta_path:
            sys.meta_path.remove(self)
        return calls

    def find_spec(self, name, path=None, target=None):
        if self.busy or (name not in self.wrappers and name not in self.calls):
            return None
        self.busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = self.wrappers.get(name, _WrappedLoader)(spec.loader, self)
        return spec


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, hooks: _LoadHooks) -> None:
        self.loader, self.hooks = loader, hooks

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        calls = self.hooks.loaded(module.__name__)
        module.__loader__ = module.__spec__.loader = self.loader  # what the module's own code sees
        self.run(module)
        for call in calls:
            call()

    def run(self, module) -> None:
        self.loader.exec_module(module)


class _RegisteringLoader(_WrappedLoader):
    def run(self, module) -> None:
        self.loader.exec_module(module)
        _register()


class _QuietLoader(_WrappedLoader):
    def run(self, module) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
                module.config.list_physical_devices("GPU")  # the CUDA probe prints here
            except BaseException:
                os.dup2(saved, 2)
                captured.seek(0)
                sys.stderr.write(captured.read().decode(errors="replace"))
                raise
            finally:
                os.dup2(saved, 2)
                os.close(saved)
