"""What a log window (the train steps between two logs, or one evaluation) reports: the loss, the metrics
and the logs an overridden step returned, whoever updated them.

A `Trainer(metrics=...)` metric is reported when its state moved in the window: the default step updates
every metric, and an overridden `train_step`/`test_step` may update some itself
(`self.metrics["accuracy"].update_state(y, logits)`, the Keras custom-step habit), stateful ones (AUC)
included. Judging by the state, not by who called `update_state`, needs no hook into the step.
"""
from __future__ import annotations

from typing import Dict, List

import keras
import numpy as np


def _state(metric: keras.metrics.Metric) -> List[np.ndarray]:
    """The metric's variables, read (summed over replicas under a strategy, as `result()` reads them)."""
    return [np.array(keras.ops.convert_to_numpy(v)) for v in metric.variables]


def _same(a: List[np.ndarray], b: List[np.ndarray]) -> bool:
    return len(a) == len(b) and all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a, b))


class Window:
    """The trackers of one kind of log (train or eval), restarted together at the start of a window.

    Args:
      loss: the default step's loss tracker (it counts only when the default step ran).
      metrics: name -> the Trainer's metrics of this kind.
      step_logs: name -> the Mean trackers of an overridden step's returned logs (step_functions.logged_step
        adds to this dict when it traces the step).
    """

    def __init__(self, loss: keras.metrics.Metric, metrics: Dict[str, keras.metrics.Metric],
                 step_logs: Dict[str, keras.metrics.Metric]):
        self.loss, self.metrics, self.step_logs = loss, metrics, step_logs
        self._at_restart: Dict[str, List[np.ndarray]] = {}

    def restart(self) -> None:
        for m in [self.loss, *self.metrics.values(), *self.step_logs.values()]:
            m.reset_state()
        self._at_restart = {name: _state(m) for name, m in self.metrics.items()}

    def moved(self, name: str) -> bool:
        """Whether metric `name`'s state changed since the restart (some step updated it)."""
        return not _same(self._at_restart.get(name, []), _state(self.metrics[name]))

    def logs(self) -> Dict[str, float]:
        """The window's logs as floats: the loss (when the default step ran), every metric the default
        step ran with or whose state moved, and the overridden step's logs."""
        logs = {}
        default_ran = int(self.loss.count.numpy()) > 0
        if default_ran:
            logs["loss"] = float(self.loss.result())
        logs.update({name: float(m.result()) for name, m in self.metrics.items() if default_ran or self.moved(name)})
        logs.update({name: float(m.result()) for name, m in self.step_logs.items()})
        return logs
