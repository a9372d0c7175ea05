"""Optimizers and learning-rate schedules from config (OptimizerConfig and its subclasses)."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

import keras
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError

log = logging.getLogger(__name__)

# Keys of OptimizerConfig that the trainer consumes; everything else goes to the Keras optimizer.
_OURS = ("lr", "clipnorm", "ema_warmup", "schedule", "warmup_steps", "decay_steps", "alpha", "boundaries", "decay_rate")


@keras.saving.register_keras_serializable(package="trainer")
class Warmup(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from 0 to the schedule's value at `warmup_steps`, then `after` (shifted)."""

    def __init__(self, peak: float, warmup_steps: int,
                 after: Optional[keras.optimizers.schedules.LearningRateSchedule] = None):
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.after = after

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warm = self.peak * (step + 1.0) / float(max(self.warmup_steps, 1))
        rest = self.after(step - self.warmup_steps) if self.after is not None else self.peak
        return keras.ops.where(step < self.warmup_steps, warm, rest)

    def get_config(self):
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "after": keras.saving.serialize_keras_object(self.after) if self.after is not None else None,
        }

    @classmethod
    def from_config(cls, config):
        after = config.get("after")
        return cls(config["peak"], config["warmup_steps"],
                   keras.saving.deserialize_keras_object(after) if after else None)


@keras.saving.register_keras_serializable(package="trainer")
class ScaledSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule(step) * scale`: the scale is a variable, so a rollback halves a scheduled learning rate
    without retracing the step (the step reads the variable; a Python number would be baked into the trace)."""

    def __init__(self, schedule, scale: tf.Variable):
        self.schedule, self.scale = schedule, scale

    def __call__(self, step):
        return self.schedule(step) * keras.ops.cast(self.scale, "float32")

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "scale": float(self.scale.numpy())}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["schedule"]),
                   tf.Variable(config["scale"], trainable=False))


def warn_warmup_not_shorter(warmup: int, total_steps: int, lr: float, name: Optional[str]) -> None:
    """The whole run is warmup: its last step (step total-1 trains at lr * total / warmup, Warmup) is below
    optimizer.lr, or at it only then; a decay after the warmup never starts."""
    if warmup > total_steps:
        reach = (f"never reaches optimizer.lr={lr:g}: its last step trains at {lr * total_steps / warmup:.4g} "
                 f"({100 * total_steps / warmup:.0f}% of it)")
    else:
        reach = f"reaches optimizer.lr={lr:g} only at the run's last step"
    after = (f", and the {name} schedule after the warmup never starts" if name not in (None, "constant") else "")
    tenth = total_steps // 10
    log.warning("optimizer.warmup_steps=%d is not shorter than the run (%d steps): the whole run is warmup, and the "
                "learning rate %s%s. Fix: fewer warmup steps (optimizer.warmup_steps=%d: %s), or a longer run.",
                warmup, total_steps, reach, after, tenth, "a tenth of the run" if tenth else "none")


def check_boundaries(boundaries: List[int], warmup: int, total_steps: Optional[int]) -> None:
    """optimizer.boundaries out of order gave a rate above optimizer.lr between them, and one inside the warmup
    a schedule that decayed before it began: ConfigErrors. One at or past the run's end never acts: said."""
    if any(later <= earlier for earlier, later in zip(boundaries, boundaries[1:])):
        raise ConfigError(f"optimizer.boundaries={boundaries} must increase, step by step: the rate drops at each, in "
                          f"order. Fix: optimizer.boundaries={sorted(set(boundaries))}")
    if boundaries and boundaries[0] <= warmup:
        raise ConfigError(f"optimizer.boundaries={boundaries} starts at or before the warmup's end "
                          f"(optimizer.warmup_steps={warmup}): the steps count from the run's start. Fix: boundaries "
                          f"after step {warmup}, or a shorter warmup")
    late = [b for b in boundaries if total_steps is not None and b >= total_steps]
    if late:
        log.warning("optimizer.boundaries %s are at or past the run's last step (%d): the rate never drops there. "
                    "Fix: boundaries below %d, or a longer run", late, total_steps, total_steps)


def make_schedule(cfg: Dict[str, Any], total_steps: int):
    """A float (constant) or a LearningRateSchedule: constant | cosine | linear | step, with warmup."""
    lr, name, warmup = float(cfg["lr"]), cfg.get("schedule"), int(cfg.get("warmup_steps") or 0)
    if total_steps is not None and warmup >= total_steps:
        warn_warmup_not_shorter(warmup, total_steps, lr, name)
    decay_steps = int(cfg.get("decay_steps") or max(total_steps - warmup, 1))
    if name in (None, "constant"):
        after = None
    elif name == "cosine":
        after = keras.optimizers.schedules.CosineDecay(lr, decay_steps, alpha=float(cfg.get("alpha", 0.0)))
    elif name == "linear":
        after = keras.optimizers.schedules.PolynomialDecay(lr, decay_steps,
                                                           end_learning_rate=lr * float(cfg.get("alpha", 0.0)),
                                                           power=1.0)
    elif name == "step":
        # Boundaries are global steps; the schedule after a warmup counts from the warmup's end.
        check_boundaries([int(b) for b in cfg.get("boundaries") or []], warmup, total_steps)
        bounds = [int(b) - warmup for b in cfg.get("boundaries") or []]
        rate = float(cfg.get("decay_rate", 0.1))
        after = keras.optimizers.schedules.PiecewiseConstantDecay(bounds,
                                                                  [lr * rate**i for i in range(len(bounds) + 1)])
    else:
        raise ConfigError(f"optimizer.schedule={name!r} is not one of constant|cosine|linear|step")
    if warmup:
        return Warmup(lr, warmup, after)
    return after if after is not None else lr


def build_optimizer(cfg: DictConfig | Dict[str, Any], total_steps: int) -> keras.optimizers.Optimizer:
    """Instantiates the Keras optimizer named by `_target_` with our `lr`/schedule as learning_rate."""
    as_dict = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    schedule = make_schedule(as_dict, total_steps)
    kwargs = {k: v for k, v in as_dict.items() if k not in _OURS}
    # Keras takes the weight-decay exclusions through a method, not the constructor.
    excluded = kwargs.pop("exclude_from_weight_decay", None)
    optimizer = instantiate(kwargs, learning_rate=schedule, _convert_="all")
    if excluded:
        optimizer.exclude_from_weight_decay(var_names=list(excluded))
    optimizer.ema_warmup = bool(as_dict.get("ema_warmup", True))  # read by the Trainer's Updater (trainer/ema.py)
    return optimizer
