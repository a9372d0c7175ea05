"""What a log window (the train steps between two logs, or one evaluation) reports: the loss, the metrics
and the logs an overridden step returned, whoever updated them.

A `Trainer(metrics=...)` metric is reported when its state moved in the window: the default step updates
every metric, and an overridden `train_step`/`test_step` may update some itself
(`self.metrics["accuracy"].update_state(y, logits)`, the Keras custom-step habit), stateful ones (AUC)
included. Judging by the state, not by who called `update_state`, needs no hook into the step.

Keras metrics the Trainer subclass holds itself (`self.loss_tracker`: metric_attributes.py) restart with the
window too; one object serves both windows, so an evaluation sets the train state aside (`kept_aside`). A log the
step returned that is a metric's `result()` (`from_metrics`) is that metric's value at the window's end.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, List, Optional

import keras
import numpy as np
import tensorflow as tf


def metric_state(metric: keras.metrics.Metric) -> List[np.ndarray]:
    """The metric's variables, read (summed over replicas under a strategy, as `result()` reads them)."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in metric.variables]


def same_state(a: List[np.ndarray], b: List[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


class Window:
    """The trackers of one kind of log (train or eval), restarted together at the start of a window.

    Args:
      loss: the default step's loss tracker (it counts only when the default step ran).
      metrics: name -> the Trainer's metrics of this kind.
      step_logs: name -> the Mean trackers of an overridden step's returned logs (step_functions.logged_step
        adds to this dict when it traces the step).
      adopted: where -> the Keras metrics held by the Trainer's attributes (metric_attributes.py; shared by
        the train and eval windows).
    """

    def __init__(self, loss: keras.metrics.Metric, metrics: Dict[str, keras.metrics.Metric],
                 step_logs: Dict[str, keras.metrics.Metric], adopted: Optional[Dict[str, keras.metrics.Metric]] = None):
        self.loss, self.metrics, self.step_logs = loss, metrics, step_logs
        self.adopted = {} if adopted is None else adopted
        # step log name -> the metric whose result() the step returned under it (set when the step is traced)
        self.from_metrics: Dict[str, keras.metrics.Metric] = {}
        self._at_restart: Dict[str, List[np.ndarray]] = {}

    def restart(self) -> None:
        for m in [self.loss, *self.metrics.values(), *self.step_logs.values(), *self.adopted.values()]:
            m.reset_state()
        self._at_restart = {name: metric_state(m) for name, m in self.metrics.items()}

    def moved(self, name: str) -> bool:
        """Whether metric `name`'s state changed since the restart (some step updated it)."""
        return not same_state(self._at_restart.get(name, []), metric_state(self.metrics[name]))

    def counts(self) -> Dict[str, float]:
        """What the loss and each metric counted since the restart (a Mean's examples, an accuracy's summed sample
        weights), for those that keep a `count`: the learning check tells examples from weights by them."""
        counted = {}
        for name, metric in [("loss", self.loss), *self.metrics.items()]:
            try:
                counted[name] = float(keras.ops.convert_to_numpy(metric.count))
            except Exception:  # noqa: BLE001 - a metric without a `count` variable: not counted
                continue
        return counted

    def logs(self) -> Dict[str, float]:
        """The window's logs as floats: the loss (when the default step ran), every metric the default
        step ran with or whose state moved, and the overridden step's logs."""
        logs = {}
        default_ran = int(self.loss.count.numpy()) > 0
        if default_ran:
            logs["loss"] = float(self.loss.result())
        logs.update({name: float(m.result()) for name, m in self.metrics.items() if default_ran or self.moved(name)})
        logs.update({name: float(self.from_metrics.get(name, m).result()) for name, m in self.step_logs.items()})
        return logs


def _components(metric: keras.metrics.Metric) -> List[tf.Variable]:
    """The metric's variables as stored: one per replica under a strategy (each replica's own count)."""
    parts = []
    for v in metric.variables:
        value = v.value
        parts += list(value.values) if isinstance(value, tf.distribute.DistributedValues) else [value]
    return parts


@contextlib.contextmanager
def kept_aside(metrics: Iterable[keras.metrics.Metric]):
    """The metrics' state (each replica's) as it is now, put back after the block: an evaluation restarts and
    updates the adopted metrics, and the train window they were in goes on as if it had not run."""
    parts = [p for m in metrics for p in _components(m)]
    kept = [p.numpy() for p in parts]
    try:
        yield
    finally:
        for part, value in zip(parts, kept):
            part.assign(value)
