"""Batched inference: what `Trainer.predict(data)` runs, and the batching helper recipes read files with.

The library half of prediction; `python -m trainer.predict` (trainer/predict.py) is the command on files.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Optional

import numpy as np

DEFAULT_BATCH_SIZE = 32


def as_batched_dataset(data: Any, batch_size: Optional[int]):
    """A tf.data.Dataset of batches from a Dataset (taken as batched, like Keras' predict), an array, a
    dict/tuple of arrays (batched here, by `batch_size`), or an iterable of batches."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return data.rebatch(batch_size) if batch_size else data
    if isinstance(data, (np.ndarray, tf.Tensor, dict, tuple)):
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size or DEFAULT_BATCH_SIZE)
    if isinstance(data, list):
        raise TypeError("Trainer.predict: a list is ambiguous (examples? inputs?); give a NumPy array, a dict or "
                        "tuple of arrays, a tf.data.Dataset, or an iterator of batches")
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise ValueError("Trainer.predict: the iterable gave no batches")
    first = tf.nest.map_structure(np.asarray, first)
    spec = tf.nest.map_structure(lambda a: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)), first)

    def chain():
        yield first
        yield from batches

    ds = tf.data.Dataset.from_generator(chain, output_signature=spec)
    return ds.rebatch(batch_size) if batch_size else ds


def predict(trainer, data: Any, batch_size: Optional[int] = None, steps: Optional[int] = None):
    """The model's outputs (inference mode) on every example of `data` (its first `steps` batches), as NumPy (a dict
    or list of arrays for a model with several outputs), concatenated over batches in order. Runs under the
    trainer's strategy (each batch split over its replicas), in a tf.function, with XLA when the trainer
    compiles its steps with XLA. Labels in (x, y) batches are ignored."""
    import keras
    import tensorflow as tf

    from trainer.iterator_release import release_in_background
    from trainer.xla_plan import wrap_xla

    model, strategy = trainer.model, trainer.strategy
    batches = as_batched_dataset(data, batch_size)
    dataset = (batches if steps is None else batches.take(steps)).map(lambda *b: keras.utils.unpack_x_y_sample_weight(
        b[0] if len(b) == 1 else b)[0])

    def forward(x):
        return model(x, training=False)

    step = wrap_xla(forward, strategy.num_replicas_in_sync) if trainer.jit_compile else forward
    # The iterator is the argument (as in Keras' predict): one trace, its batch dimension unknown.
    run = tf.function(lambda iterator: strategy.run(step, args=(next(iterator),)))
    if not model.built:  # a model without keras.Input: its variables are made here, not in the tf.function
        with strategy.scope():
            model(next(iter(dataset)), training=False)
    pieces, read = [], 0
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    while True:
        try:
            outputs = run(iterator)
        except tf.errors.OutOfRangeError:
            break
        read += 1
        # Each replica holds a consecutive slice of the global batch, in replica order.
        local = [strategy.experimental_local_results(t) for t in tf.nest.flatten(outputs)]
        for replica in range(len(local[0])):
            pieces.append(tf.nest.pack_sequence_as(outputs, [np.asarray(t[replica]) for t in local]))
    release_in_background([iterator], strategy.num_replicas_in_sync)  # its destruction can wait (iterator_release.py)
    if not pieces:
        raise ValueError("Trainer.predict: the data has no examples")
    if steps is not None and read < steps:  # Keras warns that the input ran out
        logging.getLogger("trainer.core").warning(
            "predict(steps=%d): the data has only %d batches, so the outputs are of those %d. Fix: steps=%d or fewer "
            "(or None: every batch).", steps, read, read, read)
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *pieces)


def in_batches(examples: Iterable[Any], batch_size: int) -> Iterator[np.ndarray]:
    """The examples stacked `batch_size` at a time, read as the batches are consumed: a recipe's
    predict_inputs reads its files lazily with it (a folder larger than memory works)."""
    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
