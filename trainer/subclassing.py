"""Checks on a Trainer subclass, made when the class is defined (Step.__init_subclass__): a mistake in it is said
at the line that made the object, not as an attribute missing somewhere inside fit()."""
from __future__ import annotations

import functools

from trainer.errors import UserError


class SubclassError(UserError, TypeError):
    """A Trainer subclass that cannot work as written; the message says what to change in it."""


_SETTING_UP = "_checks_super_init_running"  # on the instance while its outermost __init__ runs


def check_super_init(cls: type, marker: str = "config", framework: str = "trainer") -> None:
    """Wraps `cls.__init__` (when `cls` defines one) so that an __init__ that never called Trainer.__init__ (no
    `marker` attribute once it returns) is a SubclassError saying to call super().__init__(...); it failed on
    `'T' object has no attribute 'config'` in fit(). Only the outermost call judges (a flag on the instance: a
    subclass's __init__ may call its parent's first, or a subclass may have none and run its parent's), and it names
    the classes of the object's MRO that define an __init__ (outside the `framework` package): any may be the one."""
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "checks_super_init", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        state = vars(self)
        outermost = _SETTING_UP not in state
        state[_SETTING_UP] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outermost:
                state.pop(_SETTING_UP, None)
        if outermost and marker not in state:
            raise SubclassError(
                f"{_suspects(type(self), framework)} did not call Trainer.__init__, so the Trainer is not set up (no "
                "models, optimizers or config). Fix: call super().__init__(...) in your __init__, passing the "
                "Trainer's arguments on: def __init__(self, **kwargs): super().__init__(**kwargs); then your own "
                "attributes.")

    __init__.checks_super_init = True
    cls.__init__ = __init__


def _suspects(kind: type, framework: str) -> str:
    """The user's classes in `kind`'s MRO that define an __init__, the one run first first: "C.__init__ or a
    parent's: A" (`kind` itself may define none: `class B(A): pass` runs A's)."""
    own = [k.__name__ for k in kind.__mro__ if "__init__" in vars(k) and k is not object
           and k.__module__ != framework and not k.__module__.startswith(framework + ".")]
    named = f"{own[0]}.__init__" + (f" or a parent's: {', '.join(own[1:])}" if len(own) > 1 else "")
    return named if own and own[0] == kind.__name__ else f"{kind.__name__}'s {named}"
