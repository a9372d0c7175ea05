"""fit()'s and evaluate()'s arguments checked before any data is made (arrays.py makes it): a list of (x, y)
pairs, batch sizes, Keras' array-only keywords with a Dataset, and Keras' fit() keywords the Trainer takes
elsewhere. Each is a DataError that names the fix, not a failure deep inside tf.data or a silent no-op."""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import tensorflow as tf

from trainer.data import DataError

SHOWN_ARRAYS = 6  # an error lists the sizes of this many arrays (a list of 4096 pairs made a 44,000-character one)


def check_not_pairs(x: Any, argument: str = "x") -> None:
    """A list of (x, y) pairs (or (x, y, weight) triples), one per example, is read as a model's several inputs (a
    list of arrays, as in Keras): said with the fix, where the arrays' sizes disagreed in a message of every one."""
    if not (isinstance(x, list) and len(x) >= 2 and all(isinstance(e, tuple) for e in x)):
        return
    sizes = {len(e) for e in x}
    if len(sizes) == 1 and sizes <= {2, 3}:
        raise DataError(
            f"fit(): {argument} is a list of {len(x)} tuples of {sizes.pop()}, one per example ((x, y) pairs?); fit "
            "reads a list as a model's several inputs. Fix: give the inputs and labels as separate arrays: "
            "xs, ys = map(np.array, zip(*pairs)); fit(xs, ys, batch_size=32), or a batched tf.data.Dataset: "
            "fit(tf.data.Dataset.from_tensor_slices((xs, ys)).batch(32)).")


def kwargs_for_arrays(**given: Dict[str, Any]) -> None:
    """Keras' array-only arguments given with a tf.data input: said, as Keras does, instead of ignored."""
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise DataError(f"fit(): {', '.join(used)} apply to NumPy/array input only; the training data is a "
                        "tf.data.Dataset (or a function of an InputContext). Fix: put them in the data set "
                        "(batch it, hold out a split, add sample weights as the third element of each batch).")


# Keras fit() keywords that the Trainer takes elsewhere: refused with where, not a TypeError.
KERAS_ELSEWHERE = {"initial_epoch": "Trainer(run_dir=...) resumes at its newest checkpoint's step",
                   "validation_steps": "Trainer(eval_steps=...)", "validation_freq": "Trainer(eval_every=...)",
                   "callbacks": "Trainer(callbacks=[...])", "verbose": "Trainer(verbose=..., progress_bar=...)"}


def check_batch_sizes(train_data, what: str = "fit", **sizes: Optional[int]) -> None:
    """fit()'s batch_size and validation_batch_size: whole numbers >= 1 (fit(batch_size="32") failed deep inside);
    batch_size with a tf.data.Dataset is refused, not ignored as Keras ignores it: the Dataset is batched already."""
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DataError(f"{what}(): {name}={value!r} is not a whole number of examples >= 1. Fix: e.g. "
                            f"{what}(..., {name}=32).")
    if isinstance(train_data, tf.data.Dataset) and sizes.get("batch_size") is not None:
        raise DataError(f"{what}(..., batch_size={sizes['batch_size']}): the data is a tf.data.Dataset, which is "
                        "batched already: each of its elements is one batch, and batch_size would change nothing "
                        "(Keras ignores it silently). Fix: drop batch_size, and batch the Dataset as you want it "
                        "(ds.batch(...))" + ("; for validation arrays, validation_batch_size=..." if what == "fit"
                                             else ""))
