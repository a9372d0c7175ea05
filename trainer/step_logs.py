"""What an overridden step may return as logs, checked at its first trace (static shapes and dtypes are known
there): None, or a dict of names -> numbers, one per step, that the loop averages over each log window. Anything
else is a StepLogsError naming the log, what it is, and the fix, before the step's real trace."""
from __future__ import annotations

from typing import Callable

import tensorflow as tf

from trainer.errors import UserError


class StepLogsError(UserError, TypeError):
    """An overridden step returned logs that cannot be logged (not a dict of numbers); said before its real trace."""


def check_logs(out, what: str, local: Callable) -> None:
    """A StepLogsError unless `out` (what `what`, "train_step" say, returned, traced) is a dict of string names ->
    scalar numbers, naming the first that is not. `local`: this replica's value of a per-replica one."""
    if not isinstance(out, dict):
        raise StepLogsError(f"{what} must return None or a dict of scalar tensors (name -> value), got a "
                            f"{type(out).__name__}{_shape_said(out, kind=False)}. Fix: return a dict, e.g. "
                            "{'loss': loss}.")
    for name, value in out.items():
        if not isinstance(name, str):
            raise StepLogsError(f"{what} returned a log named {name!r} (a {type(name).__name__}): a log's name is a "
                                f"string, the key it is logged under. Fix: {{{str(name)!r}: ...}}.")
        value = local(value)
        shape = getattr(value, "shape", None)
        if shape is None or shape.rank != 0:
            raise StepLogsError(
                f"{what} returned {name!r}{_shape_said(value)}, but a log is one number per step (a scalar tensor "
                "or a Python number), averaged over each log window. Fix: reduce it to one number, e.g. "
                f"tf.reduce_mean(...), or log each element under its own key ({{'{name}_0': v[0], '{name}_1': "
                "v[1], ...}).")
        if not (value.dtype.is_floating or value.dtype.is_integer or value.dtype.is_bool):
            raise StepLogsError(
                f"{what} returned {name!r}: a {value.dtype.name} value, which cannot be logged: a log is a number (a "
                "scalar float, int or bool tensor, or a Python number), averaged over each log window. Fix: return "
                f"numbers only; show text with tf.print, or from a callback's on_log (drop {name!r} from the dict).")


def _shape_said(value, kind: bool = True) -> str:
    """` of shape (3,)`, ` of unknown shape`, or for what has no shape ` (a list)` (nothing without `kind`: the
    type is said already)."""
    shape = getattr(value, "shape", None)
    if shape is None:
        return f" (a {type(value).__name__})" if kind else ""
    shape = tf.TensorShape(shape)
    return " of unknown shape" if shape.rank is None else f" of shape {tuple(shape.as_list())}"
