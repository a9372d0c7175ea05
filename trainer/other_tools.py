"""What Keras and Lightning users write that the Trainer does another way, refused with the Trainer's way named:
a keyword of Trainer() (`max_step`, `max_epochs`, `learning_rate`) or of fit(), evaluate(), predict() (Keras'
`return_dict=False`, `callbacks`), a Keras callback among its callbacks (Keras' hooks are not the loop's), a Keras
callback's argument given to the Trainer's EarlyStopping or ReduceLROnPlateau (`restore_best_weights`). The other tools' names for config keys are the CLI's table, config_check.KEY_SYNONYMS:
read here for their Python forms, not repeated. Loads no TensorFlow or Keras (the CLI's key check reads it too).
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence

from trainer.config_check import KEY_SYNONYMS
from trainer.errors import UserError
from trainer.evalsets import guess_mode


class ArgumentError(UserError, TypeError):
    """A Python argument the Trainer does not take (or not in that form): the message names the one meant."""


# A KEY_SYNONYMS target outside trainer.*, as a Python user sets it.
PYTHON_FORMS = {
    "optimizer.lr": "the optimizer's: Trainer(optimizer=lambda: keras.optimizers.Adam(learning_rate=...))",
    "optimizer.clipnorm": "Trainer(clipnorm=...)",
    "optimizer.epsilon": "the optimizer's: Trainer(optimizer=lambda: keras.optimizers.Adam(epsilon=...))",
    "seed": "Trainer(seed=...)",
    "precision.policy": "Trainer(precision=...)",
}

CUSTOM_CALLBACK = ("write your own: subclass trainer.Callback and implement the hooks it needs: "
                   "on_train_begin(trainer), on_log(trainer, step, logs), on_eval_end(trainer, step, logs), "
                   "on_train_end(trainer, summary), ... (set trainer.stop_training = True to stop; "
                   "docs/concepts/step.md)")

# Keras' callbacks (keras.callbacks.NAME) -> what does their work in the Trainer.
KERAS_CALLBACKS = {
    "EarlyStopping": "the Trainer's own: {call} (from trainer import EarlyStopping), with this callback's settings; "
                     "its patience counts evaluations: set Trainer(eval_every=...)",
    "ReduceLROnPlateau": "the Trainer's own: {call} (from trainer import ReduceLROnPlateau), with this callback's "
                         "settings; its patience counts evaluations: set Trainer(eval_every=...)",
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


def keras_callback_error(callback: Any, argument: str) -> ArgumentError:
    """Trainer(callbacks=[a Keras callback]): the ArgumentError naming the Trainer's way (KERAS_CALLBACKS), the
    callback by its real module (a user's `__main__.MyCB`, Keras' own as keras.callbacks.NAME)."""
    cls = type(callback)
    keras_own = cls.__module__.split(".")[0] in ("keras", "tf_keras")
    shown_name = f"keras.callbacks.{cls.__name__}" if keras_own else f"{cls.__module__}.{cls.__qualname__}"
    if not keras_own:
        base = next(c for c in cls.__mro__ if c.__module__.split(".")[0] in ("keras", "tf_keras"))
        shown_name += f" (a subclass of keras.callbacks.{base.__name__})"
    fix = CUSTOM_CALLBACK
    if cls.__name__ in KERAS_CALLBACKS:
        fix = KERAS_CALLBACKS[cls.__name__].format(call=_trainer_control_call(callback))
        fix += _restore_best_weights_fix(callback)
    return ArgumentError(f"Trainer({argument}=...): {shown_name} is a Keras callback, which the Trainer's loop does "
                         f"not call (it has hooks of its own: trainer.Callback). Fix: {fix}.")


def _trainer_control_call(callback: Any) -> str:
    """The Trainer's EarlyStopping/ReduceLROnPlateau call with a Keras callback's settings (those of its config's
    fields the Keras callback holds, each that differs from the Trainer's default, and the monitor); for another
    callback, NAME(...)."""
    import dataclasses

    from trainer.config import EarlyStoppingConfig, ReduceLROnPlateauConfig

    name = type(callback).__name__
    config = {"EarlyStopping": EarlyStoppingConfig, "ReduceLROnPlateau": ReduceLROnPlateauConfig}.get(name)
    if config is None:
        monitor = getattr(callback, "monitor", None)
        return f"{name}(monitor={monitor!r}, ...)" if isinstance(monitor, str) else f"{name}(...)"
    settings = [f"{f.name}={getattr(callback, f.name)!r}" for f in dataclasses.fields(config)
                if not f.name.startswith("_") and hasattr(callback, f.name)
                and (f.name == "monitor" or getattr(callback, f.name) != f.default)]
    return f"{name}({', '.join(settings)})"


def _restore_best_weights_fix(callback: Any) -> str:
    """Keras' EarlyStopping(restore_best_weights=True), start_from_epoch=N: what the Trainer has for them."""
    said = ""
    if getattr(callback, "restore_best_weights", False):
        monitor, mode = callback.monitor, getattr(callback, "mode", "auto")
        said += f". Its restore_best_weights=True: {_restore_best_weights(monitor, guess_mode(mode, monitor), False)}"
    epochs = getattr(callback, "start_from_epoch", 0)
    if epochs:
        said += (f". Its start_from_epoch={epochs}: EarlyStopping(start_from_step=...), in steps ({epochs} x the steps "
                 "of an epoch)")
    return said


def _close(name: str, names: Iterable[str]) -> Optional[str]:
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.75)
    return found[0] if found else None


def _sentence(text: str) -> str:
    return text if text.endswith(("?", ".")) else text + "."


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else "..."


def check_trainer_options(trainer_class: type, options: Mapping[str, Any]) -> None:
    """Trainer(**options): each must be a field of TrainerConfig; one that is not is an ArgumentError naming the one
    meant: another tool's name for a setting (KEY_SYNONYMS: max_epochs -> epochs, learning_rate -> the optimizer's),
    an argument of fit(), a close spelling of a field or of Trainer()'s own arguments (max_step -> max_steps). The
    dataclass said only "TrainerConfig.__init__() got an unexpected keyword argument"."""
    import dataclasses
    import inspect

    from trainer.config import TrainerConfig

    fields = [f.name for f in dataclasses.fields(TrainerConfig)]
    arguments = [p for p in inspect.signature(trainer_class.__init__).parameters if p not in ("self", "options")]
    fit_arguments = [p for p in inspect.signature(trainer_class.fit).parameters if p not in ("self", "keywords")]
    for name, value in options.items():
        if name in fields:
            continue
        home, _, key = KEY_SYNONYMS.get(name.lower(), "").rpartition(".")
        close = _close(name, [*fields, *arguments])
        if name in fit_arguments:
            fix = f"{name} is an argument of fit(): trainer.fit(..., {name}={shown(value)})"
            if home == "trainer" and key in fields:
                fix += f", or the run's total: Trainer({key}={shown(value)})"
        elif home == "trainer" and key in fields:
            fix = f"did you mean Trainer({key}={shown(value)})? ({name} is another tool's name for it)"
        elif KEY_SYNONYMS.get(name.lower()) in PYTHON_FORMS:
            fix = f"{name} is {PYTHON_FORMS[KEY_SYNONYMS[name.lower()]]}"
        elif name in STRATEGY_FIELDS:
            fix = (f"{name} is the strategy's: Trainer(strategy={{'name': 'mirrored', {name!r}: {shown(value)}}}) "
                   "(docs/concepts/distribution.md)")
        elif close:
            fix = f"did you mean Trainer({close}={shown(value)})?"
        else:
            fix = ("Trainer() takes its own arguments and the fields of TrainerConfig (the trainer.* keys of "
                   "docs/reference/config.md)")
        raise ArgumentError(f"Trainer() got an unexpected keyword argument {name!r}. Fix: {_sentence(fix)}")


STRATEGY_FIELDS = ("logical_cpus", "devices", "communication", "tpu")  # StrategyConfig's, by a Trainer's argument


def unknown_keyword(name: str, value: Any, call: Callable) -> ArgumentError:
    """call(**{name: value}) that `call` (Trainer.fit, .evaluate or .predict, handed in by its caller: this module sits
    below the Trainer) does not take: an ArgumentError naming the one meant (fit(steps=...) for num_steps, a Trainer
    setting given to fit, a close spelling), where Python said only "unexpected keyword"."""
    import dataclasses

    from trainer.config import TrainerConfig

    method = call.__name__
    fields = [f.name for f in dataclasses.fields(TrainerConfig)]
    arguments = [p for p in inspect.signature(call).parameters if p not in ("self", "keywords")]
    if method == "fit":
        arguments += ["x", "y", "eval_data"]  # Keras' x=, y= and ours, by keyword
    home, _, key = KEY_SYNONYMS.get(name.lower(), "").rpartition(".")
    close = _close(name, arguments)
    if method == "fit" and home == "trainer" and key in ("max_steps", "epochs"):
        own = "steps" if key == "max_steps" else "epochs"
        fix = f"did you mean fit({own}={shown(value)})? ({name} is another tool's name for it)"
    elif home == "trainer" and key in fields:
        fix = f"{name} is another tool's name for a Trainer setting: Trainer({key}={shown(value)})"
    elif name in fields:
        fix = f"{name} is a Trainer setting: Trainer({name}={shown(value)})"
    elif close:
        fix = f"did you mean {method}({close}={shown(value)})?"
    else:
        fix = f"{method}() takes {', '.join(arguments)}; the run's settings are Trainer()'s (TrainerConfig's fields)"
    return ArgumentError(f"{method}() got an unexpected keyword argument {name!r}. Fix: {_sentence(fix)}")


def check_keras_keywords(call: Callable, keywords: Mapping[str, Any], return_dict: Any = True,
                         callbacks: bool = False) -> None:
    """Keras' evaluate()/predict() arguments the Trainer's `call` does not take as Keras does: return_dict=False
    (it returns a dict), `callbacks` (a user's list: it calls none), and any other keyword (unknown_keyword). Keras'
    verbose, batch_size, steps and return_dict=True are its own arguments, taken as Keras means them."""
    method = call.__name__
    if return_dict is not True:
        raise ArgumentError(f"{method}(return_dict={return_dict!r}): Trainer.evaluate returns a dict of the results "
                            "by name, always (Keras' return_dict=True). Fix: drop return_dict and read them by name: "
                            "logs['loss'], logs['accuracy'].")
    if callbacks:
        seen = ("; the Trainer's own (Trainer(callbacks=[...])) see each evaluation of fit() (on_eval_begin, "
                "on_eval_end)" if method == "evaluate" else "")
        raise ArgumentError(f"{method}(callbacks=...): Trainer.{method} calls no callbacks{seen}. Fix: drop callbacks, "
                            f"and use what {method}() returns.")
    if keywords:
        raise unknown_keyword(*next(iter(keywords.items())), call)


def _restore_best_weights(monitor: Any, mode: Optional[str], cli: bool) -> str:
    """Keras keeps the best weights in memory and puts them back at the end; the Trainer keeps them as a checkpoint.
    `mode`: the monitor's, None when it is auto and not known here."""
    if cli:
        best_mode = (f"trainer.best_mode={mode}" if mode
                     else f"trainer.best_mode=min (max if a larger {monitor} is better)")
        return (f"the best weights are kept as a checkpoint: trainer.best_metric={monitor} {best_mode} keeps them in "
                "the run folder's checkpoints/best/; python -m trainer.evaluate RUN --checkpoint best (or export, "
                "predict) uses them, trainer.resume_from=best trains on from them (docs/concepts/checkpoints.md)")
    return (f"the Trainer keeps the best weights as a checkpoint: Trainer(run_dir=..., best_metric={monitor!r}, "
            f"best_mode={mode or 'min'!r}) keeps them in run_dir/checkpoints/best/; after fit(), "
            "warm_start(trainer.model, '<run_dir>/checkpoints/best') (from trainer import warm_start) puts them into "
            "the model (docs/concepts/checkpoints.md)")


def keras_argument_fix(call: str, key: str, name: str, value: Any, monitor: Any, mode: Optional[str],
                       cli: bool = False) -> Optional[str]:
    """The Trainer's way for Keras' argument `name` of its callback `call` (EarlyStopping, ReduceLROnPlateau; `key`:
    its place in the config), as the override (`cli`) or the Python argument; None for a name Keras' callback lacks
    too."""
    from trainer.config_ranges import written

    def setting(argument: str, to: Any) -> str:
        return written(f"{key}.{argument}", to, f"{call}({argument}=...)", cli)

    if name == "restore_best_weights" and call == "EarlyStopping":
        return _restore_best_weights(monitor, mode, cli)
    if name == "verbose":
        acts = "when it stops" if call == "EarlyStopping" else "each time it lowers the learning rate"
        quiet = written("trainer.verbose", False, "Trainer(verbose=...)", cli)
        return f"{call} logs {acts}, always (to the console and trainer.log; {quiet} quiets the console): drop verbose"
    if name == "start_from_epoch" and call == "EarlyStopping":
        return (f"did you mean {setting('start_from_step', '<a step>')}? It counts steps: {value} epochs are {value} x "
                "the steps of an epoch")
    if name == "epsilon" and call == "ReduceLROnPlateau":
        return f"did you mean {setting('min_delta', value)}? (Keras 2's name for it)"
    return None


def refuse_keras_arguments(call: str, key: str, given: Mapping[str, Any], arguments: Sequence[str], monitor: Any,
                           mode: Optional[str]) -> None:
    """`given`: the keywords `call` (EarlyStopping, ReduceLROnPlateau) does not take; the first is an ArgumentError
    naming the Trainer's way for a Keras argument (keras_argument_fix), else a close spelling of `arguments`."""
    for name, value in given.items():
        fix = keras_argument_fix(call, key, name, value, monitor, mode)
        close = _close(name, arguments)
        if fix is None:
            fix = (f"did you mean {call}({close}={shown(value)})?" if close
                   else f"give {call}() its own arguments: {', '.join(arguments)}")
        raise ArgumentError(f"{call}() got an unexpected keyword argument {name!r}. Fix: {_sentence(fix)}")


def check_monitor_name(call: str, monitor: Any) -> None:
    """A monitor that is not a name (`EarlyStopping(monitor=5)` failed on `'int' object has no attribute
    'startswith'`)."""
    if not isinstance(monitor, str) or not monitor:
        raise ArgumentError(f"{call}(monitor={monitor!r}): monitor names a value as a string: an eval result as "
                            "best_metric names it ('loss', 'val_accuracy') or a train log ('train/loss'). Fix: "
                            f"{call}(monitor='val_loss').")


def refuse_other_arguments(callback, given: Dict, monitor, mode) -> None:
    """A monitor that is no name, and keywords the callback lacks (Keras' restore_best_weights, verbose, a misspelt
    one): an ArgumentError naming the Trainer's way, where Python said "unexpected
    keyword argument" and `monitor=5` failed on `'int' object has no attribute 'startswith'`."""
    call = type(callback).__name__
    check_monitor_name(call, monitor)
    if given:
        names = [p for p in inspect.signature(type(callback).__init__).parameters
                 if p not in ("self", "keras_arguments")]
        refuse_keras_arguments(call, callback.key, given, names, monitor,
                               guess_mode(mode, monitor) if isinstance(mode, str) else None)
