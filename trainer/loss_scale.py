"""Loss scaling for float16 training, kept as explicit state the train step reads and updates.

Why not keras.mixed_precision.LossScaleOptimizer: in Keras 3 it unscales inside `apply`, has no fixed
scale, and rejects clipnorm on the wrapper, so the step could not see the unscaled gradients it must clip
and log (keras-team/keras#19479, #20894). The rule here is the one Keras and the mixed-precision guide
use: ×2 after `growth_interval` finite steps in a row, ÷2 on a non-finite step; and, as the issue asks,
never below 1.
"""
from __future__ import annotations

import dataclasses

import tensorflow as tf

from trainer.config import ConfigError
from trainer.tracing import framework_code

_FIRST = tf.VariableAggregation.ONLY_FIRST_REPLICA  # every replica computes the same value


@dataclasses.dataclass(frozen=True)
class LossScaleStatus:
    """A loss scale's state, read once in Python (`LossScale.status()`): what logs, guards and checkpoint
    restores read instead of its variables. `skipped_steps`: non-finite updates in all; `consecutive_skips`:
    in a row; `skips_at_floor`: in a row with a dynamic scale already at 1."""

    enabled: bool
    mode: str
    scale: float
    skipped_steps: int
    consecutive_skips: int
    skips_at_floor: int


class LossScale(tf.Module):
    """Scale state: `scale`, `good_steps`, and fault counters (all checkpointed).

    Args:
      mode: "none" (scale fixed at 1: float32, bfloat16), "fixed" or "dynamic".
      initial_scale: the starting (or fixed) scale.
      growth_interval: finite steps in a row before a dynamic scale doubles.
    """

    def __init__(self, mode: str = "none", initial_scale: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        if mode not in ("none", "fixed", "dynamic"):
            raise ConfigError(f"loss scale mode {mode!r} is not one of none|fixed|dynamic")
        if mode != "none" and not initial_scale >= 1:
            raise ConfigError(f"precision.loss_scale / precision.initial_scale must be >= 1, got {initial_scale}")
        if growth_interval < 1:
            raise ConfigError(f"precision.growth_interval must be >= 1, got {growth_interval}")
        self.mode = mode
        self.growth_interval = growth_interval
        start = 1.0 if mode == "none" else float(initial_scale)

        def var(value, dtype, name):
            return tf.Variable(value, dtype=dtype, trainable=False, name=name, aggregation=_FIRST)

        self.scale = var(start, tf.float32, "scale")
        self.good_steps = var(0, tf.int64, "good_steps")  # finite steps since the last change
        self.skipped_steps = var(0, tf.int64, "skipped_steps")  # cumulative non-finite steps
        self.consecutive_skips = var(0, tf.int64, "consecutive_skips")
        self.skips_at_floor = var(0, tf.int64, "skips_at_floor")  # in a row, with the scale already at 1

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def status(self) -> LossScaleStatus:
        """The scale and the skip counters now (eager: reads the variables)."""
        return LossScaleStatus(self.enabled, self.mode, float(self.scale.numpy()), int(self.skipped_steps.numpy()),
                               int(self.consecutive_skips.numpy()), int(self.skips_at_floor.numpy()))

    def skipped_count(self) -> int:
        """The non-finite steps skipped so far (one variable read: the numerics guard asks after every loop)."""
        return int(self.skipped_steps.numpy())

    def set_scale(self, value: float) -> None:
        """Sets the scale (the configuration's, over a checkpoint's: callbacks/checkpointing.py)."""
        self.scale.assign(value)

    @framework_code
    def unscaled_gradients(self, tape: tf.GradientTape, loss, variables, divide: int = 1):
        """The float32 gradients of `loss` / `divide` with respect to `variables`, from `tape`. The backward
        pass starts from scale / divide instead of 1, which is what multiplying the loss by the scale inside
        the tape does, without recording the product; the gradients are then unscaled once. The one way
        from a loss to unscaled gradients: `Updater.unscaled_gradients` (the default step, `Trainer.update`,
        gradient accumulation) and the doctor's numerics pass take it."""
        if self.enabled:
            seed = self.scale if divide == 1 else self.scale / divide
        else:
            seed = 1.0 / divide if divide > 1 else None
        if seed is not None:  # one value per element of `loss`: a per-example loss is summed, as loss * scale was
            seed = tf.fill(tf.shape(loss), tf.convert_to_tensor(seed, tf.float32))
        return self.unscale(tape.gradient(loss, variables, output_gradients=seed))

    @framework_code
    def unscale(self, grads):
        """Gradients of the scaled loss → float32 gradients of the loss (÷ scale), exactly once."""
        if not self.enabled:
            return [None if g is None else tf.cast(g, tf.float32) for g in grads]
        return [None if g is None else tf.cast(g, tf.float32) / self.scale for g in grads]

    @framework_code
    def update(self, finite: tf.Tensor) -> None:
        """Advances the state after a step; branch-free so it is legal in any replica context."""
        one = tf.constant(1, tf.int64)
        zero = tf.constant(0, tf.int64)
        at_floor = self.scale <= 1.0
        if self.mode == "dynamic":
            grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
            new_scale = tf.where(
                finite,
                tf.where(grow, self.scale * 2.0, self.scale),
                tf.maximum(self.scale / 2.0, 1.0),
            )
            # Doubling can overflow to inf after a very long run of finite steps: keep the old value.
            new_scale = tf.where(tf.math.is_finite(new_scale), new_scale, self.scale)
            self.scale.assign(new_scale)
            self.good_steps.assign(tf.where(finite, tf.where(grow, zero, self.good_steps + 1), zero))
        else:
            self.good_steps.assign(tf.where(finite, self.good_steps + 1, zero))
        self.skipped_steps.assign_add(tf.where(finite, zero, one))
        self.consecutive_skips.assign(tf.where(finite, zero, self.consecutive_skips + 1))
        floor_skip = tf.logical_and(tf.logical_not(finite), tf.logical_and(at_floor, self.mode == "dynamic"))
        self.skips_at_floor.assign(tf.where(floor_skip, self.skips_at_floor + 1, zero))

