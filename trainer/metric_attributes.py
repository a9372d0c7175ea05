"""Keras metrics a Trainer subclass holds itself: Keras' custom-step guide's `self.loss_tracker =
keras.metrics.Mean(name="loss")` in `__init__`, updated in `train_step`, its `result()` returned.

Keras' Model tracks such attributes (`Model.metrics`) and resets them at each epoch's start and each
evaluation's (`reset_metrics`). The Trainer adopts them as it handles `Trainer(metrics=...)`: a Keras metric
held as an attribute, or in a list, tuple or dict attribute, restarts with every train log window and with
every evaluation (tracking.Window), with its train state set aside while an evaluation uses it. User metrics
a held model tracks (a Keras-guide model's `self.loss_tracker`, in `model.metrics`; not a compiled model's own
trackers) are adopted too. On several replicas its variables must be the strategy's (per-replica, summed when
read), so one made outside the scope is made anew under it from its config and put in its place, unless its
config does not rebuild it (then a warning names it and the fix); the replaced object is watched: another
reference updating it is warned about at a log. On one replica the metric made outside the scope is right and
kept. A step's returned log that is a metric's `result()` is logged as the metric's value over the window, read
once at its end across replicas, not as the average of its running values (`recording_results`, used by
step_functions.logged_step).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import keras

from trainer.tracing import framework_code
from trainer.tracking import metric_state, same_state

log = logging.getLogger("trainer.core")

_FRAMEWORK_ATTRIBUTES = ("train_metrics", "eval_metrics")  # the Trainer(metrics=...) copies: the windows' own
_SIMPLE = (int, float, str, bool)  # instance attributes compared between a metric and the one made from its config
_NOT_SETTINGS = ("built", "_built")  # set by a first update, not by the constructor


class AttributeMetrics:
    """The metrics adopted from a Trainer's attributes, by where they are held (`self.loss_tracker`,
    `self.trackers[0]`, `self.trackers['mae']`); `adopted` is the dict both log windows restart."""

    def __init__(self):
        self.adopted: Dict[str, keras.metrics.Metric] = {}
        self._said: set = set()  # labels whose adoption (or a problem with it) was logged
        # label -> (the object made outside the scope that a new one replaced, its state then): another reference
        # still updating it is warned about at a log (warn_replaced_updated)
        self.replaced: Dict[str, Tuple[weakref.ref, List[Any]]] = {}


def _held(trainer) -> Iterator[Tuple[str, str, Any, keras.metrics.Metric]]:
    """(label, attribute, key, metric) for each Keras metric held by an attribute: directly (key None) or as an
    item of a list, tuple or dict attribute (key: its index or key)."""
    for name, value in list(vars(trainer).items()):
        if name in _FRAMEWORK_ATTRIBUTES:
            continue
        if isinstance(value, keras.metrics.Metric):
            yield f"self.{name}", name, None, value
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if isinstance(item, keras.metrics.Metric):
                    yield f"self.{name}[{i}]", name, i, item
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, keras.metrics.Metric):
                    yield f"self.{name}[{key!r}]", name, key, item


def _framework_owned(trainer) -> set:
    """The ids of the metrics the Trainer made itself: the loss trackers, the metrics' copies, the step logs'
    trackers and the updaters' grad_norm."""
    owned = [trainer.train_loss, trainer.eval_loss, *trainer.train_metrics.values(), *trainer.eval_metrics.values(),
             *trainer.train_window.step_logs.values(), *trainer.eval_window.step_logs.values()]
    owned += [getattr(u, "grad_norm", None) for u in trainer.updaters.values()]
    return {id(m) for m in owned if m is not None}


def _in_scope(trainer, metric: keras.metrics.Metric) -> bool:
    return all(trainer.strategy.extended.variable_created_in_scope(v.value) for v in metric.variables)


def _put(trainer, name: str, key, metric: keras.metrics.Metric) -> None:
    """`metric` where the old one was held (a tuple attribute is replaced by a new tuple)."""
    held = getattr(trainer, name)
    if key is None:
        setattr(trainer, name, metric)
    elif isinstance(held, tuple):
        setattr(trainer, name, held[:key] + (metric,) + held[key + 1:])
    else:
        held[key] = metric


def _held_models(trainer) -> Iterator[Tuple[str, keras.Model]]:
    """(label, model) for each model the Trainer holds: its models (`self.model`, `self.models['g']`) and any
    other keras.Model attribute."""
    seen = set()
    named = [("self.model" if list(trainer.models) == ["model"] else f"self.models[{name!r}]", model)
             for name, model in trainer.models.items()]
    named += [(f"self.{name}", value) for name, value in vars(trainer).items() if isinstance(value, keras.Model)]
    for label, model in named:
        if id(model) not in seen:
            seen.add(id(model))
            yield label, model


def _compile_trackers(model: keras.Model) -> set:
    """The ids of the metrics a compiled Keras model made itself (its loss tracker, CompileMetrics, CompileLoss')."""
    own = [getattr(model, "_loss_tracker", None), getattr(model, "_compile_metrics", None)]
    own += list(getattr(getattr(model, "_compile_loss", None), "metrics", None) or [])
    return {id(m) for m in own if m is not None}


def _model_metrics(trainer) -> Iterator[Tuple[str, keras.metrics.Metric]]:
    """(label, metric) for each user metric a held model tracks (`model.metrics`, as Keras' fit resets them):
    `self.model.loss_tracker` when the model holds it as an attribute, else `self.model.metrics[i]`."""
    for model_label, model in _held_models(trainer):
        compiled = _compile_trackers(model)
        attributes = {id(v): name for name, v in vars(model).items() if isinstance(v, keras.metrics.Metric)}
        for i, metric in enumerate(model.metrics):
            if id(metric) in compiled or type(metric).__name__ in ("CompileMetrics", "CompileLoss"):
                continue
            where = attributes.get(id(metric))
            yield (f"{model_label}.{where}" if where else f"{model_label}.metrics[{i}]"), metric


def adopt(trainer) -> None:
    """Adopts the metrics the Trainer's attributes and held models hold now (each fit() and evaluate(), and before
    a step function is made). On several replicas, one made anew under the strategy's scope drops the traced step
    functions (they hold the old one)."""
    own: AttributeMetrics = trainer.attribute_metrics
    framework, several = _framework_owned(trainer), trainer.strategy.num_replicas_in_sync > 1
    found: Dict[str, keras.metrics.Metric] = {}
    remade: Dict[int, keras.metrics.Metric] = {}  # id of one made outside the scope -> the one made in it
    for label, name, key, metric in list(_held(trainer)):
        if id(metric) in remade:  # held twice (self.loss_tracker and self.trackers[0]): one object still
            _put(trainer, name, key, remade[id(metric)])
            continue
        if id(metric) in framework or any(m is metric for m in found.values()):
            continue
        if several and not _in_scope(trainer, metric):  # one replica: the one made outside the scope is right
            made = _made_in_scope(trainer, label, metric)
            if made is not metric:
                remade[id(metric)] = made
                own.replaced[label] = (weakref.ref(metric), metric_state(metric))
                _put(trainer, name, key, made)
                metric = made
        found[label] = metric
    for label, metric in _model_metrics(trainer):
        if id(metric) in framework or any(m is metric for m in found.values()):
            continue
        if several and not _in_scope(trainer, metric):
            _say_not_remade(trainer, label, metric, "a metric a model holds is not made anew; build the model "
                            "under the scope (pass Trainer(model=...) a function that builds it)")
        found[label] = metric
    _say_adopted(own, found, {label for label in own.replaced if label in found})
    own.adopted.clear()
    own.adopted.update(found)
    if remade:
        trainer.reset_step_functions()


def _say_adopted(own: AttributeMetrics, found: Dict[str, keras.metrics.Metric], replaced: set) -> None:
    """The INFO line, once per metric: the metrics adopted and those made anew under the strategy's scope."""
    new = [label for label in found if label not in own._said]
    if not new:
        return
    own._said.update(new)
    remade = [label for label in new if label in replaced]
    log.info("Keras metrics held by the Trainer: %s. As Trainer(metrics=...)'s, each restarts at every train "
             "log and evaluation, and a returned result() is logged as its value over the window "
             "(docs/research.md, Metrics in a custom step).%s",
             ", ".join(f"{label} ({type(found[label]).__name__} {found[label].name!r})" for label in new),
             f" Made outside the strategy's scope, {', '.join(remade)} {'was' if len(remade) == 1 else 'were'} "
             "replaced by a copy made under it from its config, so each replica adds to its own copy (another "
             "reference to the old object would update one no log reads: make it under `with "
             "self.strategy.scope():` instead)." if remade else "")


def warn_replaced_updated(trainer) -> None:
    """At a log: an object a metric made under the scope replaced that is still being updated (an object of one's
    own, a closure or a global holds it) is said once, with the fix; its updates are in no log."""
    replaced = trainer.attribute_metrics.replaced
    for label, (ref, state) in list(replaced.items()):
        old = ref()
        if old is not None and same_state(state, metric_state(old)):
            continue
        del replaced[label]  # gone (nothing can update it) or said
        if old is not None:
            log.warning(
                "%s (%s %r) was made outside the strategy's scope, so the Trainer replaced it with a copy made under "
                "it, but another reference to the old object (an object of your own, a closure, a global) still "
                "updates it: those updates are in no log, and the logged %s is wrong. Fix: make it under the scope "
                "in __init__ (`with self.strategy.scope(): %s = ...`), or pass it as Trainer(metrics=...) and update "
                "self.metrics[name] in your step.", label, type(old).__name__, old.name, old.name, label)


def _made_in_scope(trainer, label: str, metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """The metric made anew under the strategy's scope from its config (as Trainer(metrics=...) does with a
    ready-made one); when it cannot be, or the copy differs from it, the metric itself, said loudly once."""
    try:
        with trainer.strategy.scope():
            made = type(metric).from_config(metric.get_config())
    except Exception as error:  # noqa: BLE001 - a custom metric whose config does not rebuild it: said, not raised
        _say_not_remade(trainer, label, metric, f"{type(metric).__name__}.from_config(get_config()) failed: "
                        f"{type(error).__name__}: {str(error)[:200]}")
        return metric
    lost = _lost_settings(metric, made)
    if lost:
        _say_not_remade(trainer, label, metric, f"made from its config it differs: {', '.join(lost)} (its "
                        "get_config() does not keep them)")
        return metric
    return made


def _lost_settings(metric: keras.metrics.Metric, made: keras.metrics.Metric) -> List[str]:
    """The simple instance attributes (int, float, str, bool) the copy made from the config has otherwise:
    constructor arguments the config does not keep (`Thresh(threshold=100.0)` made anew with the default)."""
    mine, theirs = vars(metric), vars(made)
    return [f"{name}={value!r} made anew as {theirs[name]!r}" for name, value in mine.items()
            if name not in _NOT_SETTINGS and isinstance(value, _SIMPLE) and name in theirs and theirs[name] != value]


def _say_not_remade(trainer, label: str, metric: keras.metrics.Metric, why: str) -> None:
    """Once per metric: one made outside the scope and kept on several replicas, with the fix."""
    key = ("outside", label)
    if key in trainer.attribute_metrics._said:
        return
    trainer.attribute_metrics._said.add(key)
    log.warning(
        "%s (%s %r) was made outside the strategy's scope, and the Trainer could not make it anew under it (%s): "
        "its variables are not per replica, so on these %d replicas every replica adds to one copy and its logged "
        "value is wrong. Fix: make it under the scope in __init__ (`with self.strategy.scope(): %s = ...`), or "
        "pass it as Trainer(metrics=...) and update self.metrics[name] in your step.", label, type(metric).__name__,
        metric.name, why, trainer.strategy.num_replicas_in_sync, label)


class _Recorder:
    """While steps are traced: each `result()` of the watched metrics is recorded (tensor id -> metric). Entered
    by every replica's thread (MirroredStrategy traces them in turn), each with its metrics: every entry patches
    those not patched yet, the last out restores them all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._patched: Dict[int, keras.metrics.Metric] = {}
        self.produced: Dict[int, Tuple[Any, keras.metrics.Metric]] = {}

    def enter(self, metrics: Iterable[keras.metrics.Metric]) -> None:
        with self._lock:
            self._users += 1
            for metric in metrics:
                if id(metric) in self._patched or "result" in vars(metric):
                    continue  # patched by an earlier entry, or an instance attribute (the user's own): left alone
                object.__setattr__(metric, "result", self._recording(metric))
                self._patched[id(metric)] = metric

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            for metric in self._patched.values():
                object.__delattr__(metric, "result")
            self._patched.clear()
            self.produced.clear()

    def _recording(self, metric: keras.metrics.Metric):
        result = type(metric).result.__get__(metric)

        @framework_code
        def recorded_result():
            value = result()
            self.produced[id(value)] = (value, metric)  # the tensor kept: its id stays its own
            return value

        return recorded_result


_recorder = _Recorder()


@contextlib.contextmanager
def recording_results(metrics: Iterable[keras.metrics.Metric]):
    """Yields a function: the metric whose `result()` a value returned by the step (traced inside) is, or None;
    ask it inside the block."""
    @framework_code
    def metric_of(value):
        return _recorder.produced.get(id(value), (None, None))[1]

    _recorder.enter(list(metrics))
    try:
        yield metric_of
    finally:
        _recorder.leave()
