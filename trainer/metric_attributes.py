"""Keras metrics a Trainer subclass holds itself: Keras' custom-step guide's `self.loss_tracker =
keras.metrics.Mean(name="loss")` in `__init__`, updated in `train_step`, its `result()` returned.

Keras' Model tracks such attributes (`Model.metrics`) and resets them at each epoch's start and each
evaluation's (`reset_metrics`). The Trainer adopts them as it handles `Trainer(metrics=...)`: a Keras metric
held as an attribute, or in a list, tuple or dict attribute, restarts with every train log window and with
every evaluation (tracking.Window), with its train state set aside while an evaluation uses it; under a
strategy its variables must be the strategy's (per-replica, summed when read), so one made outside the scope
is made anew under it from its config and put in its place. A step's returned log that is a metric's
`result()` is logged as the metric's value over the window, read once at its end across replicas, not as the
average of its running values (`recording_results`, used by step_functions.logged_step).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import keras

from trainer.tracing import framework_code

log = logging.getLogger("trainer.core")

_FRAMEWORK_ATTRIBUTES = ("train_metrics", "eval_metrics")  # the Trainer(metrics=...) copies: the windows' own


class AttributeMetrics:
    """The metrics adopted from a Trainer's attributes, by where they are held (`self.loss_tracker`,
    `self.trackers[0]`, `self.trackers['mae']`); `adopted` is the dict both log windows restart."""

    def __init__(self):
        self.adopted: Dict[str, keras.metrics.Metric] = {}
        self._said: set = set()  # labels whose adoption (or a problem with it) was logged


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


def adopt(trainer) -> None:
    """Adopts the metrics the Trainer's attributes hold now (each fit() and evaluate(), and before a step function
    is made). One made anew under the strategy's scope drops the traced step functions (they hold the old one)."""
    own: AttributeMetrics = trainer.attribute_metrics
    framework = _framework_owned(trainer)
    found: Dict[str, keras.metrics.Metric] = {}
    remade: Dict[int, keras.metrics.Metric] = {}  # id of one made outside the scope -> the one made in it
    for label, name, key, metric in list(_held(trainer)):
        if id(metric) in remade:  # held twice (self.loss_tracker and self.trackers[0]): one object still
            _put(trainer, name, key, remade[id(metric)])
            continue
        if id(metric) in framework or any(m is metric for m in found.values()):
            continue
        if not _in_scope(trainer, metric):
            made = _made_in_scope(trainer, label, metric)
            if made is not metric:
                remade[id(metric)] = made
                _put(trainer, name, key, made)
                metric = made
        found[label] = metric
    new = [label for label in found if label not in own._said]
    if new:
        own._said.update(new)
        log.info("Keras metrics held by the Trainer: %s. As Trainer(metrics=...)'s, each restarts at every train "
                 "log and evaluation, and a returned result() is logged as its value over the window "
                 "(docs/research.md, Metrics in a custom step).",
                 ", ".join(f"{label} ({type(found[label]).__name__} {found[label].name!r})" for label in new))
    own.adopted.clear()
    own.adopted.update(found)
    if remade:
        trainer.reset_step_functions()


def _made_in_scope(trainer, label: str, metric: keras.metrics.Metric) -> keras.metrics.Metric:
    """The metric made anew under the strategy's scope from its config (as Trainer(metrics=...) does with a
    ready-made one); when it cannot be, the metric itself (right on one replica), said loudly once on several."""
    try:
        with trainer.strategy.scope():
            return type(metric).from_config(metric.get_config())
    except Exception as error:  # noqa: BLE001 - a custom metric whose config does not rebuild it: said, not raised
        key = ("outside", label)
        if trainer.strategy.num_replicas_in_sync > 1 and key not in trainer.attribute_metrics._said:
            trainer.attribute_metrics._said.add(key)
            log.warning(
                "%s (%s %r) was made outside the strategy's scope, and the Trainer could not make it anew under it "
                "(%s.from_config(get_config()) failed: %s: %s): its variables are not per replica, so on these %d "
                "replicas every replica adds to one copy and its logged value is wrong. Fix: make it under the "
                "scope in __init__ (`with self.strategy.scope(): %s = ...`), or pass it as Trainer(metrics=...) "
                "and update self.metrics[name] in your step.", label, type(metric).__name__, metric.name,
                type(metric).__name__, type(error).__name__, str(error)[:200],
                trainer.strategy.num_replicas_in_sync, label)
        return metric


class _Recorder:
    """While steps are traced: each `result()` of the watched metrics is recorded (tensor id -> metric). Entered
    by every replica's thread (MirroredStrategy traces them in turn): the first in patches, the last out restores."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._patched: List[keras.metrics.Metric] = []
        self.produced: Dict[int, Tuple[Any, keras.metrics.Metric]] = {}

    def enter(self, metrics: Iterable[keras.metrics.Metric]) -> None:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return
            for metric in metrics:
                if "result" in vars(metric):
                    continue  # already an instance attribute (the user's own): left alone
                object.__setattr__(metric, "result", self._recording(metric))
                self._patched.append(metric)

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users:
                return
            for metric in self._patched:
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
