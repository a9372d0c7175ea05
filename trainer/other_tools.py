"""What Keras and Lightning users write that the Trainer does another way, refused with the Trainer's way named:
a keyword of Trainer() (`max_step`, `max_epochs`, `learning_rate`) or of fit(), evaluate(), predict() (Keras'
`return_dict=False`, `callbacks`, a `verbose` or `steps` Keras does not take either), a Keras callback's argument
given to the Trainer's EarlyStopping or ReduceLROnPlateau (`restore_best_weights`); Keras' callbacks themselves:
keras_callbacks.py. The other tools' names for config keys are the CLI's table, config_check.KEY_SYNONYMS: read here
for their Python forms, not repeated. Loads no TensorFlow or Keras (the CLI's key check reads it too).
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


# The Trainer's limits of batches, named as evaluate() and predict() take theirs (steps=).
BATCH_LIMITS = {"max_steps": "the length of training", "eval_steps": "the limit of fit()'s evaluations",
                "limit_eval_batches": "the limit of fit()'s evaluations"}
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
    limit = name if name in BATCH_LIMITS else key if home == "trainer" and key in BATCH_LIMITS else None
    if method == "fit" and home == "trainer" and key in ("max_steps", "epochs"):
        own = "steps" if key == "max_steps" else "epochs"
        fix = f"did you mean fit({own}={shown(value)})? ({name} is another tool's name for it)"
    elif method != "fit" and limit:
        fix = (f"did you mean {method}(steps={shown(value)})? The batches {method}() reads are its steps= (Trainer's "
               f"{limit} is {BATCH_LIMITS[limit]})")
    elif home == "trainer" and key in fields:
        fix = f"{name} is another tool's name for a Trainer setting: Trainer({key}={shown(value)})"
    elif name in fields:
        fix = f"{name} is a Trainer setting: Trainer({name}={shown(value)})"
    elif close:
        fix = f"did you mean {method}({close}={shown(value)})?"
    else:
        fix = f"{method}() takes {', '.join(arguments)}; the run's settings are Trainer()'s (TrainerConfig's fields)"
    return ArgumentError(f"{method}() got an unexpected keyword argument {name!r}. Fix: {_sentence(fix)}")


def check_keras_keywords(call: Callable, keywords: Mapping[str, Any], steps: Any, verbose: Any,
                         return_dict: Any = True, callbacks: bool = False) -> None:
    """Keras' evaluate()/predict() arguments the Trainer's `call` does not take as Keras does: return_dict=False
    (it returns a dict), `callbacks` (a user's list: it calls none), and any other keyword (unknown_keyword). Keras'
    verbose, batch_size, steps and return_dict=True are its own arguments, taken as Keras means them: a `steps`
    or `verbose` Keras does not take either is an error (steps=-1 returned no loss, steps=0 read every batch)."""
    method = call.__name__
    check_steps(method, steps, per_set=method == "evaluate")
    if verbose not in (0, 1, 2, "auto"):  # True and False are 1 and 0, as Keras takes them
        raise ArgumentError(f"{method}(verbose={shown(verbose)}): verbose is 0 (silent), 1 (a progress bar), 2 or "
                            f"'auto', as in Keras. Fix: e.g. {method}(..., verbose=0).")
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


def check_steps(method: str, steps: Any, per_set: bool = False) -> None:
    """evaluate()'s or predict()'s `steps`: a whole number of batches >= 1, or None (all of them); for evaluate
    on named sets, a dict name -> such a number too."""
    if per_set and isinstance(steps, Mapping):
        for value in steps.values():
            check_steps(method, value)
        return
    if steps is not None and (isinstance(steps, bool) or not hasattr(steps, "__index__") or steps < 1):
        raise ArgumentError(f"{method}(steps={shown(steps)}): steps is the number of batches to read, a whole number "
                            f">= 1 (None: all of them). Fix: e.g. {method}(..., steps=10).")


def predict_data(data: Any, x: Any) -> Any:
    """predict()'s data: the first argument, or Keras' keyword x=."""
    if x is None and data is None:
        raise ArgumentError("predict() missing the data. Fix: trainer.predict(x) (an array, a dict or tuple of arrays, "
                            "a tf.data.Dataset, or an iterable of batches).")
    if x is not None and data is not None:
        raise ArgumentError("predict() got the data twice: as an argument and as x=. Fix: give one.")
    return data if x is None else x


def restore_best_weights_fix(monitor: Any, mode: Optional[str], cli: bool) -> str:
    """Keras keeps the best weights in memory and puts them back at the end; the Trainer keeps them as a checkpoint,
    ranked by an eval result (`monitor`, as the Trainer names it; a train log's name is said as such, and its eval
    result named). `mode`: the monitor's, None when it is auto and not known here."""
    lead = ""
    if isinstance(monitor, str) and monitor.startswith("train/"):
        lead = (f"the best checkpoint is ranked by an eval result, not a train log ({monitor}); with eval data, the "
                f"eval {monitor[len('train/'):]!r}: ")
        monitor = monitor[len("train/"):]
    return lead + _best_checkpoint(monitor, mode, cli)


def _best_checkpoint(monitor: Any, mode: Optional[str], cli: bool) -> str:
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
        return restore_best_weights_fix(monitor, mode, cli)
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
