"""The hook interface the loop calls, and the list that calls every callback in order.

Hooks, in the order the loop calls them:
  on_train_begin(trainer)                  each fit() call, after the variables are built
  on_loop_end(trainer, step)               after each loop of `steps_per_loop` steps
  on_log(trainer, step, logs)              train logs, every `log_every` steps
  on_eval_begin(trainer, step) / on_eval_end(trainer, step, logs)
  on_save_point(trainer, step, reason)     after each loop's logs and evaluation ("loop"), at the end
                                           ("end"), on SIGTERM/SIGINT ("signal"), when an evaluation during
                                           training failed ("error"): where Checkpointing saves
  on_exception(trainer, error)             fit() is ending on an error (then on_train_end runs too)
  on_train_end(trainer, summary)           also on an early end: summary["interrupted"] or ["failed"]
Set `trainer.stop_training = True` in a hook to stop after the current loop.

A callback with state that must survive a restart (early stopping's patience count, say) returns it
from `state_dict()` (JSON-able) and takes it back in `load_state_dict(state)`: it is saved in every
checkpoint and restored on resume, as Lightning's callbacks are. `chief_only = True` runs a callback
on the chief worker only (writers of files): the one place that rule lives.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Dict, List, Optional

import tensorflow as tf

from trainer.keras_callbacks import is_keras_callback, keras_callback_error
from trainer.other_tools import CUSTOM_CALLBACK, ArgumentError, shown

log = logging.getLogger(__name__)

HOOKS = ("on_train_begin", "on_loop_end", "on_log", "on_eval_begin", "on_eval_end", "on_save_point",
         "on_exception", "on_train_end")


class Callback:
    chief_only = False

    def on_train_begin(self, trainer) -> None: ...

    def on_loop_end(self, trainer, step: int) -> None: ...

    def on_log(self, trainer, step: int, logs: Dict) -> None: ...

    def on_eval_begin(self, trainer, step: int) -> None: ...

    def on_eval_end(self, trainer, step: int, logs: Dict) -> None: ...

    def on_save_point(self, trainer, step: int, reason: str) -> None: ...

    def on_exception(self, trainer, error: BaseException) -> None: ...

    def on_train_end(self, trainer, summary: Dict) -> None: ...

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None: ...


class CallbackList(Callback):
    """Calls each hook on every callback in order; on a non-chief worker, chief-only callbacks are left out."""

    def __init__(self, callbacks: List[Callback], is_chief: bool = True):
        self.callbacks = [cb for cb in callbacks if is_chief or not getattr(cb, "chief_only", False)]

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(*args)

    def eval_missing(self, step: int) -> bool:
        """True when a logger's record lacks the evaluation at `step` (see Logger.has_eval)."""
        return any(getattr(cb, "has_eval", lambda s: None)(step) is False for cb in self.callbacks)

    def logged(self, split: str, step: int) -> Optional[Dict]:
        """A logger's record of the `split` log at `step` (see Logger.logged), else None."""
        return next((row for cb in self.callbacks if (row := getattr(cb, "logged", lambda *a: None)(split, step))
                     is not None), None)

    def _keys(self):
        seen: Dict[str, int] = {}
        for cb in self.callbacks:
            name = type(cb).__name__
            seen[name] = seen.get(name, 0) + 1
            yield (name if seen[name] == 1 else f"{name}#{seen[name]}"), cb

    def state_dict(self) -> Dict:
        return {key: state for key, cb in self._keys() if (state := cb.state_dict())}

    def check_state(self) -> None:
        """Every state_dict() must be JSON (it goes into the checkpoint): said at the start, not at a save."""
        for key, cb in self._keys():
            try:
                json.dumps(cb.state_dict())
            except (TypeError, ValueError) as e:
                raise TypeError(f"callback {key}'s state_dict() cannot be saved in a checkpoint ({e}): return "
                                "numbers, strings, lists and dicts only") from None

    def check_monitors(self, trainer) -> None:
        """Each monitor's name (EarlyStopping, ReduceLROnPlateau: their `check_monitor`) refused before any
        callback's on_train_begin writes a file (model_summary.txt, a logger's): a run stopped by a misspelt one
        leaves no half run folder, as one stopped by trainer.best_metric (checked after them, in Checkpointing's
        on_train_begin, before it writes) does. A monitor's `checked` says its on_train_begin need not check again:
        each is unset first, and all are unset when one is refused, so none skips a check on a stale one."""
        monitors = [cb for cb in self.callbacks if callable(getattr(cb, "check_monitor", None))]
        for cb in monitors:
            if hasattr(cb, "checked"):
                cb.checked = False
        try:
            for cb in monitors:
                cb.check_monitor(trainer)
        except BaseException:
            for cb in monitors:
                if hasattr(cb, "checked"):
                    cb.checked = False
            raise

    def load_state_dict(self, state: Dict) -> None:
        """A callback whose saved state it cannot take (its code changed, say) starts fresh, with a warning."""
        for key, cb in self._keys():
            if key in state:
                try:
                    cb.load_state_dict(state[key])
                except Exception as e:  # noqa: BLE001 - one callback's old state must not stop a resume
                    log.warning("Callback %s could not take its saved state (%s: %s): it starts fresh",
                                key, type(e).__name__, e)


for _hook in HOOKS:
    setattr(CallbackList, _hook, lambda self, *args, _hook=_hook: self._call(_hook, *args))


class CallbackState(tf.train.experimental.PythonState):
    """The callbacks' `state_dict()`s inside the checkpoint (a string tensor of JSON), read from the
    trainer's current callback list at save and restore time."""

    def __init__(self, trainer):
        self.trainer = trainer

    def serialize(self) -> str:
        return json.dumps(self.trainer.callback_list.state_dict())

    def deserialize(self, string_value) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else str(string_value)
        self.trainer.callback_list.load_state_dict(json.loads(text or "{}"))


def callback_objects(given: Any, argument: str) -> List[Any]:
    """Trainer(callbacks=...) or (loggers=...) as a list: a list or any iterable of them, one alone (as Lightning
    takes it) or None. A Keras callback is an ArgumentError naming the Trainer's way (it was taken, and fit() then
    failed on its missing `state_dict`); so is anything else that is not one of the Trainer's callbacks."""
    if given is None:
        return []
    if isinstance(given, (Callback, str)) or is_keras_callback(given) or not hasattr(given, "__iter__"):
        given = [given]
    found = list(given)
    for cb in found:
        name = type(cb).__name__
        if is_keras_callback(cb):
            raise keras_callback_error(cb, f"Trainer({argument}=...)")
        if isinstance(cb, type) and issubclass(cb, Callback):
            raise ArgumentError(f"Trainer({argument}=...): {cb.__name__} is a class. Fix: give an instance: "
                                f"{cb.__name__}(...).")
        missing = [hook for hook in (*HOOKS, "state_dict", "load_state_dict") if not callable(getattr(cb, hook, None))]
        if missing:
            raise ArgumentError(f"Trainer({argument}=...) takes the Trainer's callbacks (trainer.Callback, a list of "
                                f"them or one), not {shown(cb)} ({name}: no {', '.join(missing[:3])}). Fix: "
                                f"{CUSTOM_CALLBACK}.")
    return found
