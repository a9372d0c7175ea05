"""The Trainer's properties: what it holds, read through one name (the model with one model, settable; the
metrics the current step updates; the optimizer with one; whether the steps compile with XLA; the current
fit() call's eval limit; the trace counts; the loss scale). Mixed into Trainer (trainer.py), which makes what
they read: apart, so that trainer.py keeps to building, fitting and evaluating."""
from __future__ import annotations

from typing import Dict, Optional

import keras

from trainer import components
from trainer.loss_scale import LossScale


class TrainerProperties:
    """Mixed into Trainer. Expects: models, frozen, optimizers, updaters, train_metrics, eval_metrics,
    _evaluating, _step_functions, _fit_eval_limit (see trainer.py)."""

    @property
    def model(self) -> keras.Model:
        """The model (with one); see `models`."""
        return components.only("model", self.models, self.frozen)

    @model.setter
    def model(self, value) -> None:
        components.only("model", self.models, self.frozen)  # with one model only
        self.models[next(iter(self.models))] = value

    @property
    def metrics(self) -> Dict[str, keras.metrics.Metric]:
        """The metrics a step updates, by name: the train metrics, and while evaluating the eval metrics (copies
        of the same metrics, reset per evaluation), so a test_step may update `self.metrics` as in Keras."""
        return self.eval_metrics if self._evaluating else self.train_metrics

    @metrics.setter
    def metrics(self, value) -> None:
        raise AttributeError("Trainer.metrics is the metrics the current step updates (train or eval copies); give "
                             "them as Trainer(metrics={...}), or read/extend Trainer.train_metrics before fit()")

    @property
    def optimizer(self) -> keras.optimizers.Optimizer:
        return components.only("optimizer", self.optimizers)

    @property
    def jit_compile(self) -> bool:
        """Whether the steps compile with XLA: auto resolved at construction, or measured (step_functions.py's)."""
        return self._step_functions.jit_compile

    @property
    def eval_limit(self) -> Optional[int]:
        """The batches each evaluation of the current fit() reads (eval_steps, limit_eval_batches, fast_dev_run);
        None: the whole eval set."""
        return self._fit_eval_limit[2] if self._fit_eval_limit else None

    @property
    def evaluates(self) -> bool:
        """Whether the current fit() call has eval data: it evaluates every eval_every steps and at its end."""
        return self._fit_eval_limit is not None

    @property
    def traces(self) -> Dict[str, int]:
        """How many times the train and eval functions were traced: every trace, a function made anew after a reset
        too (the run summary's `retraces` counts only a function traced again: step_functions.py)."""
        return self._step_functions.traces

    @property
    def loss_scale(self) -> LossScale:
        return components.only("loss_scale", {n: u.loss_scale for n, u in self.updaters.items()})
