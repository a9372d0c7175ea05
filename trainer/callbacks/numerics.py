"""The numerics guard: stops a run whose steps keep going non-finite, or whose weights did, before a bad
state is saved or trained on (exit 3 from the CLI; the last good checkpoint is intact)."""
from __future__ import annotations

from typing import Optional

from trainer.callbacks.base import Callback
from trainer.checkpoint import non_finite_weights
from trainer.errors import NumericalFailure

CAUSES = ("Check the input data for NaN/inf; or try a lower optimizer.lr, optimizer.clipnorm=1.0, "
          "or precision.debug_numerics=true to name the first bad op.")


class NumericalError(NumericalFailure, RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or weights that are no longer finite."""


def check_weights_finite(trainer, step: int) -> None:
    """Raises NumericalError when any model's weights hold an inf or NaN."""
    bad = [path for model in trainer.models.values() for path in non_finite_weights(model)]
    if bad:
        raise NumericalError(
            f"Stopping at step {step}: the model's weights are no longer finite ({len(bad)} of them, e.g. "
            f"{bad[:3]}) and are not saved; the last good checkpoint is intact. Skipping a non-finite step "
            "undoes its update, but not what its forward pass assigned: BatchNormalization's moving "
            "statistics take in a NaN or inf batch as it passes. " + CAUSES
        )


class NumericsGuard(Callback):
    """After each loop: too many non-finite updates in a row (per optimizer), a dynamic loss scale stuck
    at its floor, a non-finite update that was applied, or non-finite weights after a skipped update.
    The loop runs it after every other callback's on_loop_end."""

    def on_train_begin(self, trainer):
        self.skipped_at_start = self.skips_checked = self._skipped(trainer)

    @staticmethod
    def _skipped(trainer) -> int:
        return sum(u.loss_scale.skipped_count() for u in trainer.updaters.values())

    def on_loop_end(self, trainer, step):
        skipped = self._skipped(trainer)
        if skipped == self.skips_checked:  # no step skipped since the last check: no count below has grown
            return
        if skipped < self.skips_checked:  # a rollback restored a checkpoint's count: later skips are new again
            self.skips_checked = skipped
            self.skipped_at_start = min(self.skipped_at_start, skipped)
        applying = [u for u in trainer.updaters.values() if not u.loss_scale.enabled]
        if applying and not trainer.precision.skip_nonfinite and skipped > self.skipped_at_start:
            raise NumericalError(
                f"Stopping at step {step}: a step had a non-finite loss or gradients and, with "
                "precision.skip_nonfinite=false, was applied: the weights are no longer finite and are not "
                "saved. The last good checkpoint is intact; precision.skip_nonfinite=true skips such steps. "
                "To find the cause: check the input data for NaN/inf, a lower optimizer.lr, "
                "optimizer.clipnorm=1.0, or precision.debug_numerics=true to name the first bad op."
            )
        if skipped > self.skips_checked:  # a skip undoes the update, not what the forward pass assigned
            self.skips_checked = skipped
            check_weights_finite(trainer, step)
        why = stuck_steps(trainer)
        if why is not None:
            raise NumericalError(
                f"Stopping at step {step}: {why}. "
                "The model is producing inf/NaN, not just float16 overflow. Check the input data for NaN/inf; "
                "or try: a lower optimizer.lr, optimizer.clipnorm=1.0, precision=mixed_bfloat16 or float32, "
                "precision.float32_layers=[...] for LayerNorm/Softmax, or precision.debug_numerics=true to "
                "name the first bad op; trainer.on_divergence=rollback rolls back to the last good checkpoint "
                "and halves the learning rate instead. The last good checkpoint is intact."
            )


def stuck_steps(trainer) -> Optional[str]:
    """Why skipping non-finite steps cannot go on (too many in a row, or a dynamic loss scale at its floor
    that still overflows), for the first optimizer where it cannot; None while it can. The numerics guard
    stops on it; the divergence guard (on_divergence=rollback) rolls back on it first."""
    limit = trainer.precision.max_consecutive_skips
    several = len(trainer.updaters) > 1
    for name, updater in trainer.updaters.items():
        status = updater.loss_scale.status()
        consecutive, at_floor = status.consecutive_skips, status.skips_at_floor
        if consecutive < limit and at_floor < 5:
            continue
        why = (
            f"the dynamic loss scale is at its floor of 1 and {at_floor} more steps still overflowed"
            if at_floor >= 5
            else f"{consecutive} consecutive steps had non-finite loss or gradients (limit: "
                 f"precision.max_consecutive_skips={limit})"
        )
        return f"{why}{f' (optimizer {name!r})' if several else ''}; {status.skipped_steps} steps skipped in all"
    return None
