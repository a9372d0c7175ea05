"""The divergence guard: a train loss far above the run's first one (`trainer.divergence_factor`) stops
the run, warns, or rolls back to the last good checkpoint with half the learning rate
(`trainer.on_divergence`). With on_divergence=rollback, steps that stay non-finite beyond
`precision.max_consecutive_skips` roll back too, instead of stopping.

It is the TF Model Garden's recovery (official/core/base_trainer.py: `recovery_loss_threshold`,
`recovery_max_trials`: restore the latest checkpoint when the loss is NaN or above the threshold, up to N
times), with two changes: the threshold is relative to the run's first loss (one default fits every
recipe), and a rollback halves the learning rate (the same rate from the same weights mostly diverges
again; the data does not replay either: the run goes on with the next batches).
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from trainer.callbacks import learning
from trainer.callbacks.base import Callback
from trainer.callbacks.numerics import NumericalError, stuck_steps
from trainer.checkpoint_files import list_checkpoints
from trainer.config import ConfigError, as_given, written
from trainer.optim import ScaledSchedule

log = logging.getLogger("trainer.core")

CAUSES = ("Likely causes: a learning rate too high (optimizer.lr, or a schedule's peak and warmup_steps), or bad "
          "input data (unnormalised features or targets, wrong labels, NaN/inf).")


def scale_schedule(trainer, name: str, optimizer, scale: float, why: str) -> Optional[tf.Variable]:
    """Makes `optimizer`'s learning rate scalable: a schedule is wrapped in a ScaledSchedule at `scale` (its
    variable is returned: assign it to scale the rate); a constant rate (a variable of the checkpoint) is
    left as it is (None: set it directly). Each caller wraps once and keeps its own variable, so the
    scales of several callers (the divergence guard, ReduceLROnPlateau) multiply."""
    lr = optimizer._learning_rate  # Keras keeps a constant rate as a variable, a schedule as itself
    if isinstance(lr, keras.Variable):
        return None
    if not isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
        raise ConfigError(f"{why}; optimizer {name!r} has a {type(lr).__name__}, neither a constant nor a "
                          "LearningRateSchedule. Fix: give it one of those.")
    with trainer.strategy.scope():
        variable = tf.Variable(scale, dtype=tf.float32, trainable=False, name=f"lr_scale_{name}")
    optimizer.learning_rate = ScaledSchedule(lr, variable)
    trainer.reset_step_functions()  # a step traced by an earlier fit() call holds the unscaled schedule
    return variable


class DivergenceGuard(Callback):
    """After each log: a train loss above `divergence_factor` x the reference (the mean loss of the run's
    first loop, or its first logged loss when that one was not finite) is a divergence. The reference and
    the rollback count belong to the run: they are kept in every checkpoint (state_dict) and survive a
    resume and a rollback. One per Trainer; in the loop it runs just before the numerics guard."""

    def __init__(self):
        self.reference: Optional[float] = None
        self.reference_step: Optional[int] = None
        self.rollbacks = 0
        self.lr_scale = 1.0  # of scheduled learning rates (ScaledSchedule); constant rates are halved in place
        self.warned = False  # on_divergence=warn: once per episode (logs above the threshold in a row)
        self.last_good_step = 0  # the newest step judged good: a rollback restores no checkpoint after it
        self.scales: Dict[str, tf.Variable] = {}
        self.mode = "stop"  # this fit() call's trainer.on_divergence (set in on_train_begin)
        self.learning_checked = False  # the learning check (callbacks/learning.py) runs once per run
        self.not_learning: Optional[str] = None  # why this run is not learning, once judged so (said again at the end)
        self.not_learning_fix = ""  # its fix (learning.fix: from the learning rates logged then)
        self.train_loss: Optional[float] = None  # the last logged train loss, for the final evaluation's judgement
        self.last_eval: Tuple[Optional[int], Dict] = (None, {})  # the newest evaluation's step and results

    def state_dict(self):
        return {"reference": self.reference, "reference_step": self.reference_step, "rollbacks": self.rollbacks,
                "lr_scale": self.lr_scale, "learning_checked": self.learning_checked}

    def load_state_dict(self, state):
        self.reference, self.reference_step = state.get("reference"), state.get("reference_step")
        self.rollbacks, self.lr_scale = int(state.get("rollbacks", 0)), float(state.get("lr_scale", 1.0))
        self.learning_checked = bool(state.get("learning_checked", False))

    # -- set-up -----------------------------------------------------------------------------------

    def on_train_begin(self, trainer):
        self.last_good_step = int(trainer.step.numpy())  # where this fit() starts: a checkpoint, or step 0
        self.looked_at_first_loop = False
        self.not_learning, self.last_eval, self.train_loss = None, (None, {}), None
        self.learning_from = learning.check_step(trainer)
        self.mode = trainer.config.on_divergence  # this fit() call's: fast_dev_run cannot roll back
        if self.mode != "rollback":
            return
        if trainer.config.fast_dev_run:  # no run folder by design: no checkpoint to roll back to
            self.mode = "stop"
            log.info("fast_dev_run keeps no checkpoints: trainer.on_divergence=rollback acts as on_divergence=stop "
                     "for this run.")
            return
        if trainer.run_dir is None:
            cli = trainer.from_cli  # from the CLI a run always has a folder (but a dry run, above): not met there
            raise ConfigError(f"{as_given('trainer.on_divergence', 'rollback', 'Trainer(on_divergence=...)', cli)} "
                              "restores the last good checkpoint, and this Trainer has no run folder to keep "
                              "checkpoints in. Fix: give it Trainer(run_dir=...) too, or use "
                              f"{written('trainer.on_divergence', 'stop', 'Trainer(on_divergence=...)', cli)} "
                              "(or 'warn').")
        why = "trainer.on_divergence=rollback halves the learning rate (or use on_divergence=stop or warn)"
        for name, updater in trainer.updaters.items():
            if name not in self.scales:  # wrapped once per run: an earlier fit() call's wrapping is kept
                variable = scale_schedule(trainer, name, updater.optimizer, self.lr_scale, why)
                if variable is not None:
                    self.scales[name] = variable

    # -- the checks -------------------------------------------------------------------------------

    def on_loop_end(self, trainer, step):
        cfg = trainer.config
        if self.reference is None and not self.looked_at_first_loop and self._judges(cfg):
            self.looked_at_first_loop = True
            if int(trainer.train_loss.count.numpy()) > 0:  # the default step's loss (a GAN's step has none)
                self._take_reference(float(trainer.train_loss.result()), step)
        if self.mode == "rollback":
            why = stuck_steps(trainer)
            if why is not None:
                self._rollback(trainer, step, why)

    def _take_reference(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            return  # the first logged finite loss will do
        self.reference, self.reference_step = loss, step
        if loss <= 0:
            log.info("The divergence check is off for this run: its first train loss is %g, and a loss that "
                     "is not positive has no meaningful 'times its start'.", loss)

    def on_log(self, trainer, step, logs):
        cfg, loss = trainer.config, logs.get("loss", 0.0)  # a step without a loss (a GAN's): nothing to judge
        if not math.isfinite(loss):
            return  # non-finite steps are the numerics guard's (precision.max_consecutive_skips)
        if self.reference is None and self._judges(cfg) and "loss" in logs:
            self._take_reference(loss, step)
        if "loss" in logs:
            self.train_loss = loss
        later_than_reference = self.reference_step is not None and step > self.reference_step  # not its own window
        if (not self.learning_checked and self.learning_from is not None and step >= self.learning_from
                and later_than_reference and "loss" in logs):
            self._check_learning(trainer, step, logs)
        factor, reference = cfg.divergence_factor, self.reference
        if factor is None or reference is None or reference <= 0 or loss <= factor * reference:
            self.warned, self.last_good_step = False, step
            return
        why = (f"the train loss {loss:.4g} is more than trainer.divergence_factor={factor:g} times the run's first "
               f"train loss {reference:.4g} (step {self.reference_step})")
        if self.mode == "warn":
            if not self.warned:
                self.warned = True
                log.warning("Step %d: %s: training is diverging. %s (trainer.on_divergence=warn: training goes on; "
                            "this is said once until the loss comes back under the threshold.)", step, why, CAUSES)
        elif self.mode == "rollback":
            self._rollback(trainer, step, why)
        else:
            raise NumericalError(
                f"Stopping at step {step}: {why}: training diverged. {CAUSES} Fix: lower optimizer.lr (or clip: "
                "optimizer.clipnorm=1.0), check the data; trainer.on_divergence=rollback restores the last good "
                "checkpoint and halves the learning rate, trainer.on_divergence=warn only warns, "
                "trainer.divergence_factor=null turns this check off. Step "
                f"{self.last_good_step}'s loss was still under the threshold: checkpoints up to "
                "it predate the divergence."
            )

    @staticmethod
    def _judges(cfg) -> bool:
        """Whether the run's first loss is needed: by the divergence check or the learning check."""
        return cfg.divergence_factor is not None or cfg.not_learning != "off"

    def _check_learning(self, trainer, step: int, logs) -> None:
        """Once per run: a run not learning is said (not_learning=warn), or handled as a divergence."""
        self.learning_checked = True
        why = learning.not_learning(trainer, step, logs, self.reference, self.reference_step)
        if why is None:
            return
        self.not_learning, self.not_learning_fix = why, learning.fix(logs)
        if self.stops_when_not_learning(trainer):
            rollback = (" (trainer.on_divergence=rollback: a run that never learned has no good checkpoint to roll "
                        "back to)" if self.mode == "rollback" else "")
            raise NumericalError(f"Stopping at step {step}: {why}{rollback}. {learning.CAUSES} {self.not_learning_fix}")
        log.warning("Step %d: %s. %s %s Training goes on.", step, why, learning.CAUSES, self.not_learning_fix)

    def stops_when_not_learning(self, trainer) -> bool:
        """trainer.not_learning=divergence under on_divergence=stop or rollback: a run that learned nothing stops
        (exit 3); else (warn, or on_divergence=warn) it is warned about."""
        return trainer.config.not_learning == "divergence" and self.mode != "warn"

    def on_eval_end(self, trainer, step, logs):
        self.last_eval = (step, logs)  # judged at the end's save point, if it is the final evaluation

    def on_save_point(self, trainer, step, reason):
        """At the run's end (after every callback's on_eval_end: an early stop is set there), the final evaluation
        of a run judged by the learning check (not_learning on, long enough, not already judged not learning): is
        the eval accuracy at chance while the train loss fell? Acted on once the run's last checkpoint is saved
        (this guard's save point follows Checkpointing's)."""
        evaluated, logs = self.last_eval
        if (reason != "end" or evaluated != step or self.learning_from is None or step < self.learning_from
                or self.not_learning):
            return
        verdict = learning.eval_at_chance(trainer, logs, self.train_loss, self.reference)
        if not verdict:
            return
        self.not_learning, self.not_learning_fix = verdict, f"{learning.EVAL_CAUSES} {learning.EVAL_FIX}"
        if self.stops_when_not_learning(trainer):  # the run is over (and saved): exit 3, as the train check does
            saved = " (its checkpoint is saved)" if trainer.checkpointer is not None else ""
            raise NumericalError(f"The run ended at step {step}{saved} without learning: {self.not_learning}. "
                                 f"{self.not_learning_fix}")
        # else on_train_end says it, after the run's summary

    def on_train_end(self, trainer, summary):
        if self.not_learning and not summary.get("failed"):
            log.warning("This run did not learn: %s. %s", self.not_learning, self.not_learning_fix)

    # -- rollback ---------------------------------------------------------------------------------

    def _rollback(self, trainer, step: int, why: str) -> None:
        """Restores the newest checkpoint at or before the last step judged good, halves every optimizer's
        learning rate (the rate that diverged), and lets the loop go on from the restored step."""
        cfg = trainer.config
        if self.rollbacks >= cfg.max_rollbacks:
            raise NumericalError(
                f"Stopping at step {step}: {why}, again after {self.rollbacks} rollbacks with the learning rate "
                f"halved each time (trainer.max_rollbacks={cfg.max_rollbacks}). {CAUSES} Fix: lower optimizer.lr "
                "further, or check the data. The last good checkpoint is intact.")
        found = [(s, p) for s, p in list_checkpoints(trainer.checkpointer.directory) if s <= self.last_good_step]
        if not found:
            raise NumericalError(
                f"Stopping at step {step}: {why}, and there is no checkpoint to roll back to (none at or before step "
                f"{self.last_good_step}, the last step judged good; trainer.checkpoint_every={cfg.checkpoint_every}). "
                f"{CAUSES} Fix: lower optimizer.lr, or save earlier (a smaller trainer.checkpoint_every).")
        diverged = {name: float(keras.ops.convert_to_numpy(u.optimizer.learning_rate))
                    for name, u in trainer.updaters.items()}
        kept = self.state_dict()  # the run's, not the checkpoint's: the restore below reads the callbacks' state too
        restored = trainer.checkpointer.restore_latest(found, [])
        self.load_state_dict(kept)
        self.rollbacks += 1
        self.lr_scale /= 2
        for name, updater in trainer.updaters.items():
            if name in self.scales:
                self.scales[name].assign(self.lr_scale)
            else:  # a constant rate: the one that diverged, halved (the checkpoint's may be another)
                updater.optimizer.learning_rate = diverged[name] / 2
        trainer._reset_train_trackers()  # the diverged window's loss must not be logged (and judged) again
        self.warned, self.last_good_step = False, restored
        halved = ", ".join(f"{name} {lr:g} -> {lr / 2:g}" if len(diverged) > 1 else f"{lr:g} -> {lr / 2:g}"
                           for name, lr in diverged.items())
        log.warning("Step %d: %s. Rolled back to the checkpoint of step %d (rollback %d of at most "
                    "trainer.max_rollbacks=%d); learning rate halved: %s. The data goes on with the next batches.",
                    step, why, restored, self.rollbacks, cfg.max_rollbacks, halved)
