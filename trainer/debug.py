"""Debug modes, as Lightning has them (docs/debugging.md): `fast_dev_run` (a dry run that writes nothing),
`overfit_batches` (the same few batches over and over: can this model learn at all?), and
`limit_eval_batches` (a number, or a share, of the eval batches). fit() asks this module what to train
on, for how long, and on what to evaluate; evaluate() asks how many batches."""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Tuple

import tensorflow as tf

from trainer.arrays import without_class_weight
from trainer.config import ConfigError
from trainer.inputs import DataArg, batches_read_per_step

log = logging.getLogger("trainer.core")

# Train steps and eval batches of fast_dev_run=true (Lightning's True runs 1 of each): the second step calls
# the traced loop again, so a retrace or a variable created on the first call shows up too.
FAST_DEV_RUN_BATCHES = 2


def fast_dev_run_batches(config) -> int:
    """The train steps, and eval batches, of a fast_dev_run: true's FAST_DEV_RUN_BATCHES, or N for a whole
    number N (Lightning's fast_dev_run=N); 0 when off."""
    value = config.fast_dev_run
    return FAST_DEV_RUN_BATCHES if value is True else int(value or 0)


def _read_once(ds: tf.data.Dataset, n: int, asked: int) -> tf.data.Dataset:
    """The first `n` batches of `ds`, read now and held in memory: the same batches in the same order on
    every pass, even when `ds` reshuffles (Lightning turns shuffling off instead)."""
    batches = list(ds.take(n))
    if len(batches) < n:
        raise ConfigError(f"trainer.overfit_batches={asked}, but the training set has fewer batches. "
                          "Fix: a smaller trainer.overfit_batches.")
    held = tf.data.Dataset.from_tensors(batches[0])
    for batch in batches[1:]:
        held = held.concatenate(tf.data.Dataset.from_tensors(batch))
    return held


def first_batches(data: DataArg, n: int) -> DataArg:
    """The first `n` global batches of `data`, read once (see _read_once). A function of an InputContext
    keeps its per-replica batches: n x (replicas its pipeline feeds) of them, read once per pipeline, so
    training and evaluation see the same ones."""
    if isinstance(data, tf.data.Dataset):
        return _read_once(data, n, n)
    held = {}

    def fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        key = (ctx.num_input_pipelines, ctx.input_pipeline_id, ctx.num_replicas_in_sync)
        if key not in held:
            held[key] = _read_once(data(ctx), n * (ctx.num_replicas_in_sync // ctx.num_input_pipelines), n)
        return held[key]

    return fn


def eval_set_batches(data: DataArg, strategy: tf.distribute.Strategy) -> Optional[int]:
    """Global batches in one pass over an eval set; None when tf.data cannot tell (a file reader, say)."""
    if isinstance(data, tf.data.Dataset):
        card, per_global = int(data.cardinality()), 1
    else:
        replicas = strategy.num_replicas_in_sync
        card, per_global = int(data(tf.distribute.InputContext(1, 0, replicas)).cardinality()), replicas
    return card // per_global if card >= 0 else None


def eval_batch_limit(config, eval_data: DataArg, strategy: tf.distribute.Strategy) -> Optional[int]:
    """How many batches an evaluation reads: fast_dev_run's few, or eval_steps / limit_eval_batches (a
    number, or a fraction of the eval set: at least one batch); None: the whole set. Several named sets
    (a dict): a dict of their limits."""
    if isinstance(eval_data, Mapping):
        return {name: eval_batch_limit(config, data, strategy) for name, data in eval_data.items()}
    limit = config.limit_eval_batches if config.limit_eval_batches is not None else config.eval_steps
    if config.fast_dev_run:
        batches = fast_dev_run_batches(config)
        return min(batches, int(limit)) if limit is not None and limit >= 1 else batches
    if limit is None or limit >= 1:
        return None if limit is None else int(limit)
    batches = eval_set_batches(eval_data, strategy)
    if batches is None:
        raise ConfigError(f"trainer.limit_eval_batches={limit}: a fraction needs an eval set of known size, and "
                          "tf.data cannot count this one. Fix: give a number of batches, e.g. "
                          "trainer.limit_eval_batches=50.")
    return max(1, int(limit * batches))


def eval_limit_of(eval_data: DataArg, config, strategy: tf.distribute.Strategy, planned) -> Optional[int]:
    """eval_batch_limit of `eval_data`; fit()'s own eval set takes the limit plan_fit resolved once (`planned`:
    its (eval data, config, limit), or None)."""
    if planned is not None and planned[0] is eval_data and planned[1] is config:
        return planned[2]
    return eval_batch_limit(config, eval_data, strategy)


def steps_per_epoch(config, steps: Optional[int]) -> Optional[int]:
    """Steps in an epoch: `steps` (of the whole training set), or under overfit_batches those N batches'
    (as Lightning counts an epoch there), so trainer.epochs=1 trains one pass over them."""
    return config.overfit_batches // batches_read_per_step(config) if config.overfit_batches else steps


def plan_fit(trainer, train_data: DataArg, eval_data: Optional[DataArg],
             total: int) -> Tuple[DataArg, Optional[DataArg], int, Optional[tuple]]:
    """What this fit() call trains on, evaluates on and trains to, with the debug modes applied (and said),
    and its eval limit: (eval data, config, batches or None), None without eval data."""
    cfg, start = trainer.config, int(trainer.step.numpy())
    if cfg.profile_steps and trainer.run_dir is None and not cfg.fast_dev_run:
        raise ConfigError("trainer.profile_steps writes its trace under the run folder's tensorboard/: give "
                          "Trainer(run_dir=...) (the CLI always has one), or drop profile_steps.")
    if cfg.overfit_batches:
        source, train_data = train_data, first_batches(train_data, cfg.overfit_batches)  # distribute() repeats it
        if eval_data is not None:  # as Lightning first did: the loss there should go near 0 as well
            unweighted = without_class_weight(source)  # the same batches; class weights weigh training only
            same = train_data if unweighted is source else first_batches(unweighted, cfg.overfit_batches)
            eval_data = {name: same for name in eval_data} if isinstance(eval_data, dict) else same  # names kept
        log.info("overfit_batches=%d: training on the same %d training batches over and over%s; the loss should "
                 "go near 0 (if it does not, the model, loss or data pipeline has a bug); an epoch is these batches",
                 cfg.overfit_batches, cfg.overfit_batches, ", and evaluating on them" if eval_data is not None else "")
    # The eval limit, resolved once: a fraction of a set tf.data cannot count fails here, before any step,
    # not at the first (with eval_every=0: the final) evaluation; every evaluation of this fit reuses it.
    eval_limit = None if eval_data is None else (eval_data, trainer.config,
                                                 eval_batch_limit(cfg, eval_data, trainer.strategy))
    if cfg.fast_dev_run:
        batches = fast_dev_run_batches(cfg)
        total = start + batches
        per_set = eval_limit[2] if eval_limit is not None and isinstance(eval_limit[2], int) else batches
        evaluated = f" and {per_set} eval batch{'' if per_set == 1 else 'es'}" if eval_data is not None else ""
        log.info("fast_dev_run: %d train step%s%s from %s weights, then stop. Nothing is kept: no checkpoints, "
                 "metrics.jsonl, TensorBoard files or profile; no run folder is read or written.", batches,
                 "" if batches == 1 else "s", evaluated, "freshly initialized" if start == 0 else "the current")
    return train_data, eval_data, total, eval_limit
