"""Keeps TensorFlow's C++ start-up noise (CUDA probing, oneDNN notes) off the terminal by default.

Those lines are printed by C++ before Python can set any log level, so the only way to hide them is to
point file descriptor 2 elsewhere while TensorFlow loads. Set TRAINER_TF_LOGS=1 to see them.

`import trainer` does not load TensorFlow (so `trainer.config` and `trainer.errors` stay light): it calls
`quiet_when_loaded()`, and whatever imports TensorFlow first in this process (a trainer module, the user's
own `import tensorflow`) loads it quietly.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import tempfile


def quiet_tensorflow_import() -> None:
    """Loads TensorFlow now, quietly (the commands do, before their first slow step)."""
    quiet_when_loaded()
    import tensorflow  # noqa: F401


def quiet_when_loaded() -> None:
    """The first import of TensorFlow in this process runs with fd 2 captured (once; nothing if already loaded)."""
    if "tensorflow" in sys.modules or os.environ.get("TRAINER_TF_LOGS") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read by TensorFlow's C++ logging when it loads
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` through the other finders and wraps its loader; then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # what TensorFlow's own code sees
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
