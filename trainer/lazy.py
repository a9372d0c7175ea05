"""A module name that imports its module on first use: `tf = lazy_module("tensorflow")`.

The recipes and trainer.data are imported by every `python -m trainer` start (assemble.register_configs
stores their schemas), and most of their functions use TensorFlow, Keras or NumPy. Bound lazily, a
config error, `--cfg job` or `--help` answers without loading TensorFlow (4 s); the first attribute
read (`tf.data`, inside a function a run calls) loads it, through trainer.quiet's hook like any import.

Not importlib.util.LazyLoader: TensorFlow's __init__ does lazy loading of its own, which a module
object swapped in under it does not survive. A proxy leaves the real import exactly as it was.
"""
from __future__ import annotations

import importlib
import sys
import types


class LazyModule(types.ModuleType):
    """Stands for the module `name`: an attribute read imports it (once) and reads the real one's."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__dict__["_lazy_real"] = None

    def _lazy_load(self) -> types.ModuleType:
        real = self.__dict__["_lazy_real"]
        if real is None:
            real = importlib.import_module(self.__name__)
            self.__dict__["_lazy_real"] = real
        return real

    def __getattr__(self, attribute: str):
        if attribute.startswith("__") and attribute.endswith("__") and attribute not in ("__version__", "__file__"):
            raise AttributeError(attribute)  # probes (inspect's __wrapped__, doctest's __test__): no import
        return getattr(self._lazy_load(), attribute)

    def __dir__(self):
        return dir(self._lazy_load())

    def __repr__(self) -> str:
        state = "loaded" if self.__name__ in sys.modules else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy_module(name: str) -> LazyModule:
    """A stand-in for `import name` at a module's top whose import waits until an attribute is read."""
    return LazyModule(name)
