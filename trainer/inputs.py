"""Input: the sample batch that builds the variables, distribution, the skip on resume, and the iterator a
fit() call leaves for the next one on the same data."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import tensorflow as tf

from trainer.data import DataError, release_in_background

log = logging.getLogger("trainer.core")

DataArg = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]


class KeptIterator:
    """What a fit() call that ended normally leaves for the next call on the same data set. When it is
    let go (fit() on other data, or the Trainer is freed), its iterator dies on the release thread: after a
    100 s run, destroying it in the calling thread took 45 s (tf.data's autotuner wait, see data.py)."""

    def __init__(self, data: DataArg, step: int, iterator: Any, replicas: int = 1):
        self.data, self.step, self.iterator, self.replicas = data, step, iterator, replicas

    def __del__(self):
        if self.iterator is not None:
            holder, self.iterator = [self.iterator], None
            try:
                release_in_background(holder, self.replicas)
            except Exception:  # late in interpreter shutdown module globals may be gone: it dies here
                holder.clear()


def sample_batch(data: DataArg, strategy: tf.distribute.Strategy):
    """(one batch, global batch size): what one replica of `strategy` would be given first."""
    if isinstance(data, tf.data.Dataset):
        probe = [iter(data)]
    else:  # the unshuffled twin, where there is one, skips filling the shuffle buffer twice (data.py)
        make = getattr(data, "unshuffled", data)
        probe = [iter(make(tf.distribute.InputContext(1, 0, strategy.num_replicas_in_sync)))]
    sample = next(probe[0])
    release_in_background(probe, strategy.num_replicas_in_sync)  # its age includes filling a shuffle buffer: see data.py
    replicas = strategy.num_replicas_in_sync
    batch_size = int(tf.nest.flatten(sample)[0].shape[0]) * (1 if isinstance(data, tf.data.Dataset) else replicas)
    if isinstance(data, tf.data.Dataset) and batch_size % replicas:
        raise DataError(
            f"The training batches ({batch_size} examples) do not split evenly over the {replicas} "
            f"replicas, so the loss would be misweighted. Fix: a batch size that is a multiple of "
            f"{replicas}, with .batch(..., drop_remainder=True) for the last one."
        )
    return sample, batch_size


def steps_per_epoch_of(data: DataArg, grad_accum_steps: int) -> Optional[int]:
    """Steps (optimizer updates) in one pass over a data set of known size; None when unknown."""
    if not isinstance(data, tf.data.Dataset):
        return None
    card = int(data.cardinality())  # batches; a step reads grad_accum_steps of them
    return card // grad_accum_steps if card > 0 else None


def distribute(data: DataArg, strategy: tf.distribute.Strategy, skip_batches: int = 0, training: bool = True):
    """A tf.data.Dataset (global batches) or an InputContext -> Dataset function (per-replica
    batches) -> a distributed data set. Training data repeats, and skips the batches already
    consumed: with a seeded shuffle the order is the same as in an uninterrupted run."""
    if isinstance(data, tf.data.Dataset):
        ds = data
        if training:
            ds = ds.repeat().skip(skip_batches)
        return strategy.experimental_distribute_dataset(ds)

    def fn(ctx):
        if training and skip_batches and getattr(data, "skips_itself", False):
            return data(ctx, skip_steps=skip_batches).repeat()  # data.py: DatasetFn
        ds = data(ctx)
        if training:  # a step takes one per-replica batch for each replica this pipeline feeds
            ds = ds.repeat().skip(skip_batches * (ctx.num_replicas_in_sync // ctx.num_input_pipelines))
        return ds

    return strategy.distribute_datasets_from_function(fn)


def training_iterator(data: DataArg, strategy, start: int, grad_accum_steps: int, kept: Optional[KeptIterator]):
    """The iterator a fit() call trains from: the one the last call left, when it ended at `start` on
    the same data; else a new one that skips the batches the first `start` steps trained on."""
    if kept is not None and kept.data is data and kept.step == start:
        iterator, kept.iterator = kept.iterator, None
        return iterator
    if start:  # tf.data produces the skipped batches (reads, decodes) and drops them: it takes time
        log.info("Data: skipping the %d batches the first %d steps trained on, to resume in the same order",
                 start * grad_accum_steps, start)
    return iter(distribute(data, strategy, skip_batches=start * grad_accum_steps))
