"""The exponential moving average of the weights (`optimizer.use_ema=true`, Keras' `use_ema=True`), used
where it matters: evaluation, the `best/` choice, the summary and export see the averaged weights.

Keras keeps the averages as optimizer variables and updates them inside `optimizer.apply`, after the
update (the fused kernels replace only `update_step`, so they keep it): an update the step skips
(a non-finite gradient, a loss-scale overflow; under XLA the select that undoes it covers the optimizer's
variables too) leaves the average unchanged. Being optimizer variables, the averages are in every
checkpoint and survive a resume. What Keras' `fit` does with them (overwrite the weights at the end)
would end a run that is meant to go on, so here evaluation swaps them in and back: training always
continues from the raw weights.

The decay warms up (`optimizer.ema_warmup`, on by default), as tf.train.ExponentialMovingAverage's
`num_updates` and timm's ModelEmaV3 do: momentum_n = min(ema_momentum, (1 + n) / (10 + n)), n being the
optimizer's `iterations` before the update: the steps so far, updates skipped for a non-finite gradient or a
loss-scale overflow (mixed_float16) included, as TF counts its global step. Keras' fixed momentum makes the
average of a short run mostly its starting weights: at 0.99, 37% of the weight is still on the start after
100 updates.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, List, Tuple

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


def averaged_pairs(trainer) -> List[Tuple[object, object]]:
    """(variable, its average) for every variable of an optimizer with use_ema=True."""
    pairs = []
    for updater in trainer.updaters.values():
        optimizer = updater.optimizer
        if getattr(optimizer, "use_ema", False) and optimizer.built:
            pairs += [(v, a) for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)
                      if a is not None]
    return pairs


def warm_up_decay(optimizer) -> bool:
    """Gives an optimizer with use_ema=True the decay warm-up (unless its `ema_warmup` attribute is False:
    `optimizer.ema_warmup=false` in the config, or set on the optimizer before the Trainer is made). Keras
    calls `_update_model_variables_moving_average` after each applied update, with `iterations` still
    counting the steps before it (skipped ones included); this replaces it on the instance only."""
    if not getattr(optimizer, "use_ema", False) or not getattr(optimizer, "ema_warmup", True):
        return False

    def update_averages(trainable_variables):
        n = keras.ops.cast(optimizer.iterations, "float32")
        momentum = keras.ops.minimum(float(optimizer.ema_momentum), (1.0 + n) / (10.0 + n))
        for variable, average in zip(trainable_variables, optimizer._model_variables_moving_average):
            if average is not None:
                m = keras.ops.cast(momentum, variable.dtype)
                average.assign(m * average + (1 - m) * variable)

    optimizer._update_model_variables_moving_average = update_averages
    return True


def start_averages(trainer) -> None:
    """Before a run's first update (after a warm start), each average starts at its variable's value:
    Keras' start at zero, and its first update copies the weights only when it is the optimizer's first
    iteration; a first step skipped for overflow would leave an average pulled towards zero."""
    for updater in trainer.updaters.values():
        optimizer = updater.optimizer
        if getattr(optimizer, "use_ema", False) and optimizer.built and int(optimizer.iterations.numpy()) == 0:
            for variable, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
                if average is not None:
                    average.assign(variable)


@contextlib.contextmanager
def averaged_weights(trainer) -> Iterator[bool]:
    """Inside: the models hold the averaged weights (yields True), or their own without EMA (False);
    the raw weights are put back on the way out, also on an error."""
    pairs = averaged_pairs(trainer)
    if not pairs:
        yield False
        return
    raw = [tf.identity(tf.convert_to_tensor(v)) for v, _ in pairs]
    for variable, average in pairs:
        variable.assign(average)
    try:
        yield True
    finally:
        for (variable, _), value in zip(pairs, raw):
            variable.assign(value)


def restore_averages(model, optimizer_cfg, prefix: str) -> bool:
    """For export: gives `model` (its weights already restored from checkpoint `prefix`) the averages of a
    run trained with optimizer.use_ema=true; False (nothing done) for a run without. The optimizer is
    rebuilt from the run's config, so its variables match the checkpoint's by structure."""
    if not optimizer_cfg or not optimizer_cfg.get("use_ema"):
        return False
    from trainer.optim import build_optimizer

    optimizer = build_optimizer(optimizer_cfg, total_steps=1)
    optimizer.build(model.trainable_variables)
    status = tf.train.Checkpoint(optimizer=optimizer).read(prefix)
    try:
        status.assert_existing_objects_matched()
    except AssertionError as e:
        raise ValueError(f"{prefix}: the run's config says optimizer.use_ema=true, and this checkpoint does not hold "
                         f"the averages of all the model's weights ({str(e)[:200]})") from None
    status.expect_partial()
    for variable, average in zip(model.trainable_variables, optimizer._model_variables_moving_average):
        if average is not None:
            variable.assign(average)
    log.info("Averaged weights (optimizer.use_ema) from %s", prefix)
    return True
