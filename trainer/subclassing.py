"""Checks on a Trainer subclass, made when the class is defined (Step.__init_subclass__): a mistake in it is said
at the line that made the object, not as an attribute missing somewhere inside fit()."""
from __future__ import annotations

import functools

from trainer.errors import UserError


class SubclassError(UserError, TypeError):
    """A Trainer subclass that cannot work as written; the message says what to change in it."""


def check_super_init(cls: type, marker: str = "config") -> None:
    """Wraps `cls.__init__` (when `cls` defines one) so that an __init__ that never called Trainer.__init__ (no
    `marker` attribute once it returns) is a SubclassError saying to call super().__init__(...); it failed on
    `'T' object has no attribute 'config'` in fit(). Only the outermost __init__ judges: a subclass's may call its
    parent's first."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "checks_super_init", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is cls and marker not in vars(self):
            raise SubclassError(
                f"{cls.__name__}.__init__ did not call Trainer.__init__, so the Trainer is not set up (no models, "
                "optimizers or config). Fix: call super().__init__(...) in your __init__, passing the Trainer's "
                f"arguments on: def __init__(self, **kwargs): super().__init__(**kwargs); then your own attributes.")

    __init__.checks_super_init = True
    cls.__init__ = __init__
