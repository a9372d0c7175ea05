"""Keras' callbacks, given to the Trainer (Trainer(callbacks=[...]), or Keras' place, fit(callbacks=[...])): its loop
calls none of them (its hooks are trainer.Callback's), so each is an ArgumentError naming what does its work here.
Keras' EarlyStopping and ReduceLROnPlateau are translated into the Trainer's own with their settings, as they mean
in Keras: Keras' `val_loss` is the Trainer's `loss` (an eval result) and Keras' `loss` the training loss, the
Trainer's `train/loss`; Keras counts patience in epochs, the Trainer in evaluations (or train-log windows), which
fit() makes only at its end unless eval_every is set, so the call names eval_every (log_every) as one epoch's steps
(the number, when fit() knows it). Loads no TensorFlow or Keras.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

from trainer.evalsets import guess_mode
from trainer.other_tools import CUSTOM_CALLBACK, ArgumentError, restore_best_weights_fix

# Keras' callbacks (keras.callbacks.NAME) -> what does their work in the Trainer (EarlyStopping and
# ReduceLROnPlateau: _monitor_fix, with the callback's settings).
KERAS_CALLBACKS = {
    "ModelCheckpoint": "checkpoints are built in: Trainer(run_dir=..., checkpoint_every=...), and the best ones by "
                       "Trainer(best_metric=..., best_mode=..., keep_best=...) in run_dir/checkpoints/best/ "
                       "(docs/concepts/checkpoints.md)",
    "BackupAndRestore": "built in: Trainer(run_dir=...) resumes from its newest checkpoint "
                        "(docs/concepts/checkpoints.md)",
    "TensorBoard": "built in: Trainer(run_dir=...) writes TensorBoard files to run_dir/tensorboard/ (elsewhere: "
                   "Trainer(loggers=[TensorBoardWriter(logdir)]), from trainer; docs/loggers.md)",
    "CSVLogger": "Trainer(loggers=[MetricsWriter(), CSVLogger(path)]), from trainer (the default loggers write "
                 "run_dir/metrics.jsonl and TensorBoard; docs/loggers.md)",
    "TerminateOnNaN": "built in: non-finite steps stop the run with NumericalError (docs/faults.md)",
    "ProgbarLogger": "built in: Trainer(progress_bar=..., verbose=...)",
    "History": "fit() returns the final logs, and run_dir/metrics.jsonl holds every log",
    "LearningRateScheduler": "a keras.optimizers.schedules.LearningRateSchedule as the optimizer's learning_rate",
    "SwapEMAWeights": "an optimizer with use_ema=True: evaluation and export use the averaged weights "
                      "(docs/training-control.md)",
    "RemoteMonitor": "a logger: Trainer(loggers=[...]) with a trainer.callbacks.Logger of your own (docs/loggers.md)",
}
MONITORING = ("EarlyStopping", "ReduceLROnPlateau")
ONE_EPOCH = "<the steps of one epoch>"


def is_keras_callback(obj: Any) -> bool:
    """An instance of Keras' (or tf_keras') callback base, without importing Keras."""
    return any(c.__name__ == "Callback" and c.__module__.split(".")[0] in ("keras", "tf_keras")
               for c in type(obj).__mro__)


def keras_callback_error(callback: Any, where: str, steps_per_epoch: Optional[int] = None) -> ArgumentError:
    """A Keras callback given at `where` ("Trainer(callbacks=...)", "fit(callbacks=...)"): the ArgumentError naming
    the Trainer's way, the callback by its real module (a user's `__main__.MyCB`, Keras' own as keras.callbacks.NAME).
    `steps_per_epoch`: fit()'s, when known, said in the translated call."""
    cls = type(callback)
    keras_own = cls.__module__.split(".")[0] in ("keras", "tf_keras")
    shown_name = f"keras.callbacks.{cls.__name__}" if keras_own else f"{cls.__module__}.{cls.__qualname__}"
    if not keras_own:
        base = next(c for c in cls.__mro__ if c.__module__.split(".")[0] in ("keras", "tf_keras"))
        shown_name += f" (a subclass of keras.callbacks.{base.__name__})"
    if cls.__name__ in MONITORING:
        fix = _monitor_fix(callback, steps_per_epoch)
    else:
        fix = KERAS_CALLBACKS.get(cls.__name__, CUSTOM_CALLBACK) + "."
    return ArgumentError(f"{where}: {shown_name} is a Keras callback, which the Trainer's loop does not call (it has "
                         f"hooks of its own: trainer.Callback). Fix: {fix}")


def refuse_fit_callbacks(callbacks: Any, steps_per_epoch: Optional[int]) -> None:
    """Keras' fit(callbacks=[...]): the Trainer takes its callbacks at Trainer(callbacks=[...]). A Keras callback
    among them is said as there, with this fit()'s steps per epoch in the translated call."""
    if callbacks is None or (isinstance(callbacks, (list, tuple)) and not callbacks):
        return  # Keras' default: none
    listed = callbacks if isinstance(callbacks, (list, tuple)) else [callbacks]
    for callback in listed:
        if is_keras_callback(callback):
            raise keras_callback_error(callback, "fit(callbacks=...)", steps_per_epoch)
    raise ArgumentError("fit(callbacks=...): the Trainer takes its callbacks once, for every fit() call. Fix: "
                        "Trainer(callbacks=[...]).")


def trainer_monitor(keras_monitor: Any) -> Any:
    """Keras' monitor as the Trainer names it: `val_NAME` (an eval result) is NAME, a NAME without `val_` (the
    training value) train/NAME. Not a name: as it is (the Trainer's callback refuses it)."""
    if not isinstance(keras_monitor, str) or not keras_monitor:
        return keras_monitor
    if keras_monitor.startswith("val_") and len(keras_monitor) > len("val_"):
        return keras_monitor[len("val_"):]
    return f"train/{keras_monitor}"


def _settings(callback: Any, monitor: Any, steps_per_epoch: Optional[int]) -> List[str]:
    """The Trainer's call's arguments for Keras' `callback`: its config's fields the Keras callback holds, each that
    differs from the Trainer's default (the monitor always), min_delta as its size (Keras 3 makes it negative once
    a min-mode fit used it), and start_from_epoch as start_from_step."""
    from trainer.config import EarlyStoppingConfig, ReduceLROnPlateauConfig

    name = type(callback).__name__
    config = {"EarlyStopping": EarlyStoppingConfig, "ReduceLROnPlateau": ReduceLROnPlateauConfig}[name]
    settings = [f"monitor={monitor!r}"]
    for field in dataclasses.fields(config):
        if field.name.startswith("_") or field.name == "monitor" or not hasattr(callback, field.name):
            continue
        value = getattr(callback, field.name)
        if field.name == "min_delta" and isinstance(value, (int, float)):
            value = abs(value)
        if value != field.default:
            settings.append(f"{field.name}={value!r}")
    epochs = getattr(callback, "start_from_epoch", 0)
    if epochs:
        steps = epochs * steps_per_epoch if steps_per_epoch else f"<{epochs} x the steps of one epoch>"
        settings.append(f"start_from_step={steps}")
    return settings


def _monitor_fix(callback: Any, steps_per_epoch: Optional[int]) -> str:
    """Keras' EarlyStopping/ReduceLROnPlateau as the Trainer's own call, its monitor and epoch counts translated."""
    name, keras_name = type(callback).__name__, getattr(callback, "monitor", None)
    monitor = trainer_monitor(keras_name)
    train = isinstance(monitor, str) and monitor.startswith("train/")
    every = "log_every" if train else "eval_every"
    steps = steps_per_epoch or ONE_EPOCH
    call = f"Trainer(callbacks=[{name}({', '.join(_settings(callback, monitor, steps_per_epoch))})], {every}={steps})"
    counts = "patience" + (" and cooldown count" if name == "ReduceLROnPlateau" else " counts")
    if train:
        said = (f"Keras' monitor {keras_name!r} is the training value, the Trainer's {monitor!r} (its "
                f"{keras_name!r} is the eval result); its {counts} train-log windows (log_every steps), not "
                f"evaluations, where Keras' count epochs: log_every={steps} makes a window one epoch")
    else:
        said = (f"Keras' monitor {keras_name!r} is the Trainer's {monitor!r} (an eval result); its {counts} "
                f"evaluations, where Keras' count epochs, and fit() evaluates only at its end by default: "
                f"eval_every={steps} evaluates once an epoch")
    fix = f"the Trainer's own, with this callback's settings: {call} (from trainer import {name}). {said}."
    if getattr(callback, "restore_best_weights", False):
        mode = guess_mode(getattr(callback, "mode", "auto"), monitor) if isinstance(monitor, str) else None
        fix += f" Its restore_best_weights=True: {restore_best_weights_fix(monitor, mode, False)}."
    return fix
