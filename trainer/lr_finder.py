"""The learning-rate range test (Lightning's `lr_find`, after Smith 2015 and fastai): train N steps with a
learning rate growing exponentially from `min_lr` to `max_lr`, record the smoothed loss, stop when it
diverges, suggest the rate where it fell fastest. `python -m trainer.lr_find` runs it on a config.

The Trainer it runs on is left as it was: its variables (weights, optimizer slots and step counter, loss
scale, step, RNG) are written to a temporary checkpoint outside the run folder and read back afterwards,
each optimizer gets its own learning rate (or schedule) back, and the traced steps are dropped. Nothing
is written into the run folder: no checkpoint, no log.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer.config import ConfigError
from trainer.errors import UserError

log = logging.getLogger(__name__)


class LRFinderError(UserError, RuntimeError):
    """The range test cannot do what was asked (a package missing for its plot): the message says the fix."""


@dataclass
class LRFinderResult:
    """What a range test recorded: the rate of each step, its loss, the smoothed loss, and the suggestion
    (None when too few finite points remained to judge, or the loss never fell: `no_suggestion` says which)."""

    lrs: List[float]
    losses: List[float]
    smoothed: List[float]
    suggestion: Optional[float]
    suggestion_index: Optional[int]
    stopped: str  # why it ended: "steps" (all of them ran) or "diverged"
    settings: Dict[str, float] = field(default_factory=dict)
    no_suggestion: Optional[str] = None  # when suggestion is None: why, and the fix

    def to_json(self, path) -> Path:
        """A small json: the suggestion, the settings, and the curve."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def clean(values):  # JSON has no NaN or infinity: a diverged step's loss is null
            return [v if math.isfinite(v) else None for v in values]

        path.write_text(json.dumps({"suggestion": self.suggestion, "stopped": self.stopped,
                                    **({"no_suggestion": self.no_suggestion} if self.no_suggestion else {}),
                                    **self.settings, "lr": self.lrs,
                                    "loss": clean(self.losses), "smoothed_loss": clean(self.smoothed)},
                                   indent=1) + "\n")
        return path

    def plot(self, path) -> Path:
        """The smoothed loss against the learning rate (log axis), the suggestion marked; a png."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise LRFinderError("trainer.lr_find's plot needs matplotlib, which is not installed. Fix: "
                            "pip install -e '.[bench]'") from None
        figure = Figure(figsize=(6, 4))
        ax = figure.add_subplot()
        ax.plot(self.lrs, self.losses, color="0.75", linewidth=0.8, label="loss")
        ax.plot(self.lrs, self.smoothed, color="C0", label="smoothed loss")
        if self.suggestion_index is not None:
            i = self.suggestion_index
            ax.plot([self.lrs[i]], [self.smoothed[i]], "o", color="C3", label=f"suggestion {self.suggestion:.3g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("train loss")
        finite = [v for v in self.smoothed if math.isfinite(v)]
        if finite:  # the divergence's last points would flatten the curve
            ax.set_ylim(min(finite) - 0.05 * abs(min(finite)), max(finite[0], min(finite)) * 1.5 + 1e-12)
        ax.legend()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100, bbox_inches="tight")
        return path


class _Rate(keras.optimizers.schedules.LearningRateSchedule):
    """The range test's rate: a variable the loop assigns before each step (the traced step reads it)."""

    def __init__(self, variable: tf.Variable):
        self.variable = variable

    def __call__(self, step):
        return keras.ops.cast(self.variable, "float32")

    def get_config(self):
        return {}


def exponential_rates(min_lr: float, max_lr: float, steps: int) -> np.ndarray:
    """`steps` rates from min_lr to max_lr, evenly spaced on a log scale (Lightning's "exponential" mode)."""
    return min_lr * (max_lr / min_lr) ** (np.arange(steps) / max(steps - 1, 1))


def smooth(losses: List[float], beta: float) -> List[float]:
    """The bias-corrected exponential moving average of the losses (Lightning's and fastai's)."""
    average, out = 0.0, []
    for i, loss in enumerate(losses):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta ** (i + 1)))
    return out


SKIP_BEGIN, SKIP_END = 10, 1  # the smoothed average settling; the divergence
MIN_STEPS = SKIP_BEGIN + SKIP_END + 2  # two points to judge a slope on
FLAT = 1e-6  # a slope under this fraction of the loss per decade of rate is flat


def suggest(lrs: List[float], smoothed: List[float], skip_begin: int = SKIP_BEGIN,
            skip_end: int = SKIP_END) -> Optional[int]:
    """The index of the steepest descent of the smoothed loss against log(lr), leaving out the first
    `skip_begin` points (the average still settling) and the last `skip_end` (the divergence); None when
    fewer than two finite points remain (np.gradient needs two) or the loss falls nowhere (a rising or flat
    curve has no descent to suggest)."""
    kept = _judged(smoothed, skip_begin, skip_end)
    if len(kept) < 2:
        return None
    slopes = np.gradient(np.array([smoothed[i] for i in kept]), np.log10([lrs[i] for i in kept]))
    steepest = int(np.argmin(slopes))
    flat = FLAT * max(abs(smoothed[i]) for i in kept)  # a "fall" of float rounding is no descent
    return kept[steepest] if slopes[steepest] < -flat else None


def _judged(smoothed: List[float], skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END) -> List[int]:
    return [i for i in range(skip_begin, len(smoothed) - skip_end) if math.isfinite(smoothed[i])]


def no_suggestion_reason(lrs: List[float], losses: List[float], smoothed: List[float], stopped: str) -> str:
    """Why `suggest` found nothing, and the fix, for the log and the CLI."""
    if not losses or not math.isfinite(losses[0]):
        return (f"the first step's loss is not finite (at lr {lrs[0]:.3g}): that is the data or model, not the rate. "
                "Fix: check that `python -m trainer` trains on this config at a small rate")
    kept = _judged(smoothed)
    if len(kept) < 2 and stopped == "diverged":
        return (f"the loss diverged after {len(losses)} steps (at lr {lrs[-1]:.3g}), too few to judge a descent (at "
                f"least {MIN_STEPS} are needed). Fix: a lower --min or --max (the rates grow "
                "more slowly), or more steps")
    if len(kept) < 2:
        return f"{len(losses)} steps are too few to judge a descent. Fix: at least {MIN_STEPS} steps"
    return (f"the loss never decreased between lr {lrs[kept[0]]:.3g} and {lrs[kept[-1]]:.3g}. Fix: a wider range "
            "(a lower --min, a higher --max), or check that the model learns at all")


def check_settings(steps: int, min_lr: float, max_lr: float, beta: float = 0.98,
                   divergence: Optional[float] = 4.0) -> None:
    """Raises ConfigError for settings a range test cannot judge (before any data or model is built)."""
    if steps < MIN_STEPS:
        raise ConfigError(f"lr_find: steps={steps} is too few for a range test: the first {SKIP_BEGIN} smoothed losses "
                          f"are settling, so at least {MIN_STEPS} are needed (Lightning uses 100)")
    if not (math.isfinite(min_lr) and math.isfinite(max_lr) and 0 < min_lr < max_lr):
        raise ConfigError("lr_find: the rates must satisfy 0 < min_lr < max_lr (got "
                          f"min_lr={min_lr:g}, max_lr={max_lr:g})")
    if not 0 <= beta < 1:
        raise ConfigError(f"lr_find: smoothing={beta} must be in [0, 1) (0.98: Lightning's)")
    if divergence is not None and divergence <= 1:
        raise ConfigError(f"lr_find: divergence={divergence} must be above 1 (the smoothed loss over "
                          "its best; Lightning's 4)")


def lr_find(trainer, train_data, *, steps: int = 100, min_lr: float = 1e-7, max_lr: float = 1.0,
            smoothing: float = 0.98, divergence: Optional[float] = 4.0, monitor: str = "loss") -> LRFinderResult:
    """Runs the range test on `trainer` with `train_data` (what fit() takes) and returns its result.

    Each step trains at the next rate of `exponential_rates(min_lr, max_lr, steps)` (every optimizer gets
    it); the loss (the step's `monitor` log) is smoothed with `smoothing`; the test stops early once the
    smoothed loss exceeds `divergence` x its lowest value (None: never) or is not finite. The Trainer's
    state is restored afterwards, so a fit() after it trains from where it was.

    Raises:
      ConfigError: bad settings, or a step that logs no `monitor`.
    """
    from trainer.iterator_release import release_in_background
    from trainer.inputs import sample_batch, training_iterator

    check_settings(steps, min_lr, max_lr, smoothing, divergence)
    sample, _ = sample_batch(train_data, trainer.strategy)
    trainer.build(sample)
    rates = exponential_rates(min_lr, max_lr, steps)
    with tempfile.TemporaryDirectory(prefix="lr_find-") as folder:  # outside the run folder, removed at the end
        snapshot = tf.train.Checkpoint(**trainer.checkpoint_objects())
        saved = snapshot.write(str(Path(folder) / "before"))
        # a constant rate is a variable (in `saved`)
        schedules = {name: opt._learning_rate for name, opt in trainer.optimizers.items()
                     if not isinstance(opt._learning_rate, keras.Variable)}
        iterator = [training_iterator(train_data, trainer.strategy, 0, 0, None)]
        try:
            rates_in_use = _rate_variables(trainer, schedules)
            trainer.reset_step_functions()
            losses, stopped = _run(trainer, iterator[0], rates, rates_in_use, smoothing, divergence, monitor)
        finally:
            for name, schedule in schedules.items():
                trainer.optimizers[name].learning_rate = schedule
            snapshot.read(saved).assert_existing_objects_matched()
            trainer.reset_step_functions()
            trainer.train_window.restart()
            release_in_background(iterator, trainer.strategy.num_replicas_in_sync)
    lrs = [float(r) for r in rates[:len(losses)]]
    smoothed = smooth(losses, smoothing)
    index = suggest(lrs, smoothed)
    reason = None if index is not None else no_suggestion_reason(lrs, losses, smoothed, stopped)
    if reason:
        log.warning("lr_find: no suggestion: %s", reason)
    settings = {"min_lr": min_lr, "max_lr": max_lr, "steps": steps, "smoothing": smoothing, "divergence": divergence}
    return LRFinderResult(lrs, losses, smoothed, lrs[index] if index is not None else None, index, stopped, settings,
                          reason)


def _rate_variables(trainer, schedules) -> List[tf.Variable]:
    """What to assign each step's rate to: a constant rate's own variable; for a schedule, a variable that a
    `_Rate` put in its place reads (Keras' setter takes a schedule; the schedule is put back after)."""
    variables = []
    for name, opt in trainer.optimizers.items():
        if name in schedules:
            with trainer.strategy.scope():
                variables.append(tf.Variable(0.0, dtype=tf.float32, trainable=False, name=f"lr_find_{name}"))
            opt.learning_rate = _Rate(variables[-1])
        else:
            variables.append(opt._learning_rate)
    return variables


def _run(trainer, iterator, rates, variables, beta: float, divergence: Optional[float], monitor: str):
    """One step per rate; (the losses, why it stopped)."""
    from trainer.step_functions import make_train_function

    train = make_train_function(trainer, iterator)
    losses, best = [], math.inf
    one = tf.constant(1, tf.int64)
    for i, value in enumerate(rates):
        for variable in variables:
            variable.assign(float(value))
        trainer.train_window.restart()
        train(iterator, one)
        logs = trainer.train_window.logs()
        if monitor not in logs:
            raise ConfigError(f"lr_find: the train step logs no {monitor!r} (it logs "
                              f"{', '.join(sorted(logs)) or 'nothing'}); give monitor= one of those")
        losses.append(logs[monitor])
        smoothed = smooth(losses, beta)[-1]
        if not math.isfinite(smoothed) or (divergence is not None and i > 0 and smoothed > divergence * best):
            log.info("lr_find: the loss diverged at lr %.3g (step %d of %d): stopping", value, i + 1, len(rates))
            return losses, "diverged"
        best = min(best, smoothed)
    return losses, "steps"
