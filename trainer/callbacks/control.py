"""Training control, as Keras' and Lightning's callbacks of the same names: stop when a monitored value
stops improving (EarlyStopping), lower the learning rate on a plateau (ReduceLROnPlateau).

Both watch one value (trainer/callbacks/monitor.py: an eval result, named as `trainer.best_metric` names it, or a
train log as `train/NAME`), judge each event once, and keep their counts in every checkpoint: a resumed run goes
on counting where it stopped.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional

import keras

from trainer.callbacks.divergence import scale_schedule
from trainer.callbacks.monitor import Monitor, counted
from trainer.config import EarlyStoppingConfig, ReduceLROnPlateauConfig
from trainer.other_tools import refuse_other_arguments

log = logging.getLogger("trainer.callbacks")


class EarlyStopping(Monitor):
    """Stops training when `monitor` has not improved by more than `min_delta` for `patience` events
    (evaluations, or train logs for a train/NAME monitor). `baseline`: the count restarts only for values
    that also beat it. `start_from_step`: events before it are not judged (a warm-up)."""

    key = "callbacks.early_stopping"
    acts = "stop training early"

    def __init__(self, monitor: str = "loss", mode: str = "auto", patience: int = 3, min_delta: float = 0.0,
                 baseline: Optional[float] = None, start_from_step: int = 0, **keras_arguments):
        refuse_other_arguments(self, keras_arguments, monitor, mode)  # restore_best_weights, verbose: the Trainer's way
        EarlyStoppingConfig(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta,
                            baseline=baseline, start_from_step=start_from_step)  # checks the ranges
        super().__init__(monitor, mode, min_delta, patience)
        self.baseline, self.start_from_step = baseline, start_from_step

    def fresh(self) -> None:
        super().fresh()
        self.stopped_step: Optional[int] = None

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "stopped_step": self.stopped_step}

    def load_state_dict(self, state: Dict) -> None:
        super().load_state_dict(state)
        self.stopped_step = state.get("stopped_step")

    def stop_pending(self) -> bool:
        """The run stopped at the step this fit() call starts from: the final evaluation of an earlier call (or of
        the run resumed) decided it, and this call trains nothing."""
        return self.stopped_step == self.start_step and self.wait >= self.patience

    def events_to_act(self) -> int:
        """As Monitor's; with a `baseline`, every event counts (the first too) until one beats it; none when a stop
        is pending."""
        if self.stop_pending():
            return 0
        return max(self.patience - self.wait, 1) if self.baseline is not None else super().events_to_act()

    def on_train_begin(self, trainer) -> None:
        super().on_train_begin(trainer)
        if self.stop_pending():  # resumed from the checkpoint of the stop, or a later fit() call after it
            log.info("Early stopping ended this run at step %d (%s: no improvement for %s, best %.6g at step "
                     "%s): nothing to train. To train on, raise its patience: %s.", self.start_step, self.monitor,
                     counted(self.wait, "event"), self.best_or_nan, self.best_step,
                     self.fix("patience", "<a larger value>"))
            trainer.stop_training = True

    def judge(self, trainer, step, value) -> None:
        if step < self.start_from_step:
            return
        self.wait += 1
        if self.improved(value, self.best):
            self.best, self.best_step = value, step
            if self.baseline is None or self.improved(value, self.baseline):
                self.wait = 0
                return
        if self.wait >= self.patience:
            self.stopped_step = step
            trainer.stop_training = True
            events = counted(self.wait, "event")
            if self.baseline is not None and not self.improved(self.best, self.baseline):  # the count never restarted
                log.info("Early stopping at step %d: %s has not beaten baseline=%g (mode=%s, min_delta=%g) in %s "
                         "(patience=%d); its best, %.6g at step %s, is short of it.", step, self.monitor, self.baseline,
                         self.mode, self.min_delta, events, self.patience, self.best, self.best_step)
                return
            log.info("Early stopping at step %d: %s=%.6g has not improved on %.6g (step %s, mode=%s, min_delta=%g) "
                     "for %s (patience=%d).", step, self.monitor, value, self.best_or_nan, self.best_step,
                     self.mode, self.min_delta, events, self.patience)


class ReduceLROnPlateau(Monitor):
    """Multiplies every optimizer's learning rate by `factor` when `monitor` has not improved by more than
    `min_delta` for `patience` events, then waits `cooldown` events before judging again; never below
    `min_lr`. A constant rate is set (it is in the checkpoint); a schedule is scaled (a ScaledSchedule, as
    the divergence guard's rollback scales it; its scale is in this callback's state)."""

    key = "callbacks.reduce_lr_on_plateau"
    acts = "lower the learning rate"

    def __init__(self, monitor: str = "loss", mode: str = "auto", patience: int = 3, factor: float = 0.1,
                 min_delta: float = 1e-4, cooldown: int = 0, min_lr: float = 0.0, **keras_arguments):
        refuse_other_arguments(self, keras_arguments, monitor, mode)  # Keras' verbose, epsilon: the Trainer's way
        ReduceLROnPlateauConfig(monitor=monitor, mode=mode, patience=patience, factor=factor, min_delta=min_delta,
                                cooldown=cooldown, min_lr=min_lr)  # checks the ranges
        super().__init__(monitor, mode, min_delta, patience)
        self.factor, self.cooldown, self.min_lr = factor, cooldown, min_lr
        self.scales: Dict[str, object] = {}  # optimizer name -> the ScaledSchedule's variable (of `owner`'s optimizers)

    def fresh(self) -> None:
        super().fresh()
        self.cooling = 0  # events left in the cooldown
        self.scale: Dict[str, float] = {}  # optimizer name -> the factor its schedule is multiplied by
        self.restored_scale: Dict[str, float] = {}  # the checkpoint's, taken on a resume (see adopt)
        self.lowered_to: Dict[str, float] = {}  # optimizer name -> the constant rate it last set
        self.restored_lowered: Dict[str, float] = {}

    def state_dict(self) -> Dict:
        return {**super().state_dict(), "cooling": self.cooling, "scale": dict(self.scale),
                "lowered_to": dict(self.lowered_to)}

    def load_state_dict(self, state: Dict) -> None:
        """On a resume, the checkpoint's scales apply when the schedules are wrapped (adopt). On a rollback
        (the divergence guard restores a checkpoint mid-run) the scales in use are kept, as constant rates
        are: the guard halves the rate that diverged, reductions made since that checkpoint included."""
        super().load_state_dict(state)
        self.cooling = int(state["cooling"])
        self.restored_scale = {k: float(v) for k, v in state["scale"].items()}
        self.restored_lowered = {k: float(v) for k, v in state.get("lowered_to", {}).items()}  # none before it

    def adopt(self, trainer) -> None:
        restored = self.restored
        super().adopt(trainer)
        self.scales = {}  # another Trainer's variables, if any: this one's schedules are wrapped below
        self.scale = dict(self.restored_scale) if restored else {}
        self.lowered_to = dict(self.restored_lowered) if restored else {}

    def events_to_act(self) -> int:
        """As Monitor's, after the cooldown left: its last event is the first counted again."""
        return super().events_to_act() + max(self.cooling - 1, 0)

    def warn_if_idle(self, trainer) -> bool:
        """Monitor's, after a constant learning rate already at or below min_lr, which no reduction lowers
        (it silently never acted); said before anything was judged only: a resumed run's rate may have reached
        min_lr by this callback's own reductions. A schedule's rate changes: not judged here."""
        floor = {}
        for name, updater in trainer.updaters.items():
            rate = float(keras.ops.convert_to_numpy(updater.optimizer.learning_rate))
            if isinstance(updater.optimizer._learning_rate, keras.Variable) and rate <= self.min_lr:
                floor[name] = rate
        if floor and self.best is None:
            rates = ", ".join(f"{name}'s {rate:.4g}" if len(trainer.updaters) > 1 else f"{rate:.4g}"
                              for name, rate in floor.items())
            log.warning("%s(min_lr=%g) cannot lower the learning rate: it is %s, not above min_lr, where a reduction "
                        "stops. Fix: %s (0: no floor), or a learning rate above %g.", type(self).__name__,
                        self.min_lr, rates, self.fix("min_lr", f"<below {min(floor.values()):.4g}>"), self.min_lr)
            if len(floor) == len(trainer.updaters):
                return True
        return super().warn_if_idle(trainer)

    def on_train_begin(self, trainer) -> None:
        resumed = self.restored
        super().on_train_begin(trainer)
        wrapped = set()
        for name, updater in trainer.updaters.items():
            if name not in self.scales:
                why = f"{type(self).__name__} lowers the learning rate"
                variable = scale_schedule(trainer, name, updater.optimizer, self.scale.get(name, 1.0), why)
                if variable is not None:
                    self.scales[name] = variable
                    wrapped.add(name)
        if resumed:
            self.say_lowered_rates(trainer, wrapped)

    def say_lowered_rates(self, trainer, wrapped) -> None:
        """A resume goes on at the rate this callback lowered to, as the run would have: said, not silent. A
        constant rate the configuration set again (Checkpointing says so) is not this callback's any more."""
        lowered = []
        for name, updater in trainer.updaters.items():
            rate = float(keras.ops.convert_to_numpy(updater.optimizer.learning_rate))
            if name in wrapped and self.scale.get(name, 1.0) != 1.0:
                lowered.append((name, f"{rate:.4g} (the schedule x{self.scale[name]:.4g})"))
            elif name in self.lowered_to and math.isclose(rate, self.lowered_to[name], rel_tol=1e-6):
                lowered.append((name, f"{rate:.4g}"))
        if lowered:
            log.info("%s: resumed at the learning rate it lowered before the checkpoint: %s", type(self).__name__,
                     ", ".join(rate if len(trainer.updaters) == 1 else f"{name} {rate}" for name, rate in lowered))

    def judge(self, trainer, step, value) -> None:
        if self.cooling > 0:
            self.cooling -= 1
            self.wait = 0
        if self.improved(value, self.best):
            self.best, self.best_step, self.wait = value, step, 0
            return
        if self.cooling > 0:
            return
        self.wait += 1
        if self.wait >= self.patience:
            self._reduce(trainer, step, value)
            self.cooling, self.wait = self.cooldown, 0

    def _reduce(self, trainer, step: int, value: float) -> None:
        changes = []
        for name, updater in trainer.updaters.items():
            optimizer = updater.optimizer
            old = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
            if old <= self.min_lr:
                continue
            new = max(old * self.factor, self.min_lr)
            if name in self.scales:  # a schedule: scaled, so that its value now is `new`
                self.scale[name] = self.scale.get(name, 1.0) * new / old
                self.scales[name].assign(self.scale[name])
            else:
                optimizer.learning_rate = self.lowered_to[name] = new
            changes.append(f"{name} {old:.4g} -> {new:.4g}" if len(trainer.updaters) > 1 else f"{old:.4g} -> {new:.4g}")
        if changes:
            log.info("Step %d: %s=%.6g has not improved on %.6g (step %s) for %s (patience=%d): learning "
                     "rate lowered: %s.", step, self.monitor, value, self.best_or_nan, self.best_step,
                     counted(self.wait, "event"), self.patience, ", ".join(changes))
