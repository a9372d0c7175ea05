"""NumPy (and other array-like) input for `Trainer.fit(x, y, ...)`, with Keras' semantics, and class weights.

In-memory arrays become the same tf.data pipeline the recipes use (data.classification_pipeline): a
full-size shuffle seeded by the Trainer's seed, reshuffled each epoch, the partial last batch dropped in
training (equal batches on every replica) and kept in evaluation. The stream is a function of the seed,
so a resumed run skips to the same batches as an uninterrupted one. As in Keras: `validation_split` takes
the LAST fraction of the examples, before shuffling; `validation_data` is (x, y) or (x, y, sample_weight);
`class_weight` and `sample_weight` are not given together; class weights weigh the training loss only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import numpy as np
import tensorflow as tf

from trainer.data import DataError, DatasetFn, check_batch_size, classification_pipeline

DEFAULT_BATCH_SIZE = 32  # Keras' fit default


def is_array_like(data: Any) -> bool:
    """NumPy arrays, tensors, lists, and tuples/dicts of them (a model with several inputs); not a
    tf.data.Dataset nor a function of an InputContext."""
    if data is None or isinstance(data, tf.data.Dataset) or callable(data):
        return False
    if isinstance(data, (np.ndarray, tf.Tensor, list)) or hasattr(data, "__array__"):
        return True
    if isinstance(data, (tuple, dict)):
        return bool(data) and all(is_array_like(v) for v in (data.values() if isinstance(data, dict) else data))
    return False


def _as_array(value: Any) -> np.ndarray:
    array = np.asarray(value)
    return array.astype(np.float32) if array.dtype == np.float64 else array  # Keras' floatx, as its fit converts


def as_arrays(data: Any) -> Any:
    return tf.nest.map_structure(_as_array, data)


def length(parts: Mapping[str, Any]) -> int:
    """The examples in each of `parts` (name -> nested arrays), which must agree; a DataError names them."""
    lengths = {}
    for name, value in parts.items():
        if value is not None:
            for i, array in enumerate(tf.nest.flatten(value)):
                lengths[name if len(tf.nest.flatten(value)) == 1 else f"{name}[{i}]"] = len(array) if array.ndim else 0
    if len(set(lengths.values())) > 1:
        raise DataError("fit(): the arrays have different numbers of examples: "
                        + ", ".join(f"{k} {v}" for k, v in lengths.items())
                        + ". Fix: give one row per example in each (the first axis is the examples).")
    return next(iter(lengths.values()), 0)


def weight_table(class_weight: Mapping) -> np.ndarray:
    """class -> weight as a vector over classes 0..max; a key missing in between is a DataError (as in Keras)."""
    try:
        weights = {int(k): float(v) for k, v in class_weight.items()}
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"class_weight={class_weight!r} is not a dict of class index -> weight. Fix: e.g. "
                        "class_weight={0: 1.0, 1: 2.0}.") from None
    if not weights or min(weights) < 0 or any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise DataError(f"class_weight={class_weight!r}: give each class 0..N-1 a finite weight >= 0.")
    missing = sorted(set(range(max(weights) + 1)) - set(weights))
    if missing:
        raise DataError(f"class_weight={class_weight!r} has no weight for the classes {missing}. Fix: give every class "
                        f"0..{max(weights)} a weight (1.0 leaves one as it is).")
    return np.array([weights[c] for c in range(max(weights) + 1)], np.float32)


def _classes(y):
    """Class indices of labels: integer labels, (n, 1) labels, or one-hot/probability rows (argmax)."""
    if isinstance(y, (dict, list, tuple)):
        raise DataError("class_weight is for a model with one output; these labels are a structure. Fix: give "
                        "sample weights instead (the third element of each batch, or sample_weight=).")
    if y.shape.rank is not None and y.shape.rank >= 2:
        return tf.argmax(y, axis=-1, output_type=tf.int32) if y.shape[-1] != 1 else tf.cast(tf.round(tf.squeeze(y, -1)), tf.int32)
    return tf.cast(tf.round(tf.cast(y, tf.float32)) if y.dtype.is_floating else y, tf.int32)


def class_sample_weights(y, table: np.ndarray):
    """Each example's weight, its class's; a label outside the table stops the step with a message."""
    classes = _classes(y)
    checks = [tf.debugging.assert_less(classes, len(table), message=f"class_weight has weights for classes "
                                       f"0..{len(table) - 1}, and a label is larger"),
              tf.debugging.assert_non_negative(classes, message="class_weight: a label is negative")]
    with tf.control_dependencies(checks):
        return tf.gather(tf.constant(table), classes)


def _weigh(table: np.ndarray):
    def weigh(*element):
        import keras

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(element if len(element) > 1 else element[0])
        if y is None:
            raise DataError("class_weight needs labelled batches (x, y); these have no labels.")
        if sample_weight is not None:  # Keras refuses the pair too
            raise DataError("class_weight and sample weights cannot be given together (the batches already carry "
                            "sample weights). Fix: fold the class weights into the sample weights, or drop one.")
        return x, y, class_sample_weights(y, table)

    return weigh


def with_class_weight(data, class_weight: Optional[Mapping]):
    """Training data (a Dataset or a DatasetFn) whose batches carry the class weights as sample weights."""
    if not class_weight:
        return data
    weigh = _weigh(weight_table(class_weight))
    if isinstance(data, tf.data.Dataset):
        return data.map(weigh, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def fn(ctx, **kwargs):
        return data(ctx, **kwargs).map(weigh, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    for attribute in ("skips_itself",):
        if hasattr(data, attribute):
            setattr(fn, attribute, getattr(data, attribute))
    if hasattr(data, "unshuffled"):
        fn.unshuffled = with_class_weight(data.unshuffled, class_weight)
    return fn


@dataclass
class ArrayInputs:
    """What fit() trains and evaluates on, made from arrays."""

    train: DatasetFn
    eval: Optional[DatasetFn]
    train_examples: int
    batch_size: int


def eval_pipeline(data: Any, batch_size: int, seed: int, what: str) -> DatasetFn:
    """(x, y) or (x, y, sample_weight) arrays -> an eval DatasetFn (the partial last batch kept)."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise DataError(f"{what} is {type(data).__name__}; give (x, y) or (x, y, sample_weight) arrays, as in Keras, "
                        "or a tf.data.Dataset.")
    x, y, weight = (*as_arrays(tuple(data)), None)[:3]
    length({f"{what} x": x, f"{what} y": y, f"{what} sample_weight": weight})
    return classification_pipeline(x, y, sample_weight=weight, global_batch_size=batch_size, seed=seed, training=False)


def from_arrays(x, y=None, *, batch_size: Optional[int], seed: int, sample_weight=None, class_weight=None,
                validation_data=None, validation_split: Optional[float] = None) -> ArrayInputs:
    """Keras' fit(x, y, ...) arguments -> the train DatasetFn (and the eval one, from validation_data or split)."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    check_batch_size(batch_size)
    if y is not None and not is_array_like(y):
        raise DataError(f"fit(x, y): with arrays x the second argument is the labels y (as in Keras), and this one is a "
                        f"{type(y).__name__}. Fix: give eval data as validation_data=(x_val, y_val) or a dict of sets.")
    x, y = as_arrays(x), None if y is None else as_arrays(y)
    weight = None if sample_weight is None else as_arrays(sample_weight)
    n = length({"x": x, "y": y, "sample_weight": weight})
    if y is None and (weight is not None or class_weight):
        raise DataError("fit(): sample_weight and class_weight need the labels y.")
    if class_weight:
        if weight is not None:
            raise DataError("fit(): class_weight and sample_weight cannot be given together (as in Keras). Fix: "
                            "multiply the class weights into sample_weight, or give one of them.")
        weight = class_sample_weights(tf.constant(y), weight_table(class_weight)).numpy()
    eval_fn = None
    if validation_split:
        if validation_data is not None:
            raise DataError("fit(): give validation_data or validation_split, not both (Keras would ignore the split).")
        if not 0 < validation_split < 1:
            raise DataError(f"fit(): validation_split={validation_split} must be in (0, 1).")
        split_at = int(math.floor(n * (1.0 - validation_split)))  # Keras' rule: the last examples, unshuffled
        if split_at in (0, n):
            raise DataError(f"fit(): validation_split={validation_split} of {n} examples leaves an empty training or "
                            "validation set. Fix: more examples, or another fraction.")
        head = lambda a: None if a is None else tf.nest.map_structure(lambda v: v[:split_at], a)  # noqa: E731
        tail = lambda a: None if a is None else tf.nest.map_structure(lambda v: v[split_at:], a)  # noqa: E731
        held = tuple(part for part in (tail(x), tail(y), tail(weight)) if part is not None)
        eval_fn = eval_pipeline(held, batch_size, seed, "validation_split")
        x, y, weight, n = head(x), head(y), head(weight), split_at
    elif validation_data is not None:
        eval_fn = eval_pipeline(validation_data, batch_size, seed, "validation_data")
    if n < batch_size:
        raise DataError(f"fit(): {n} training examples are fewer than one batch (batch_size={batch_size}), and "
                        "training drops a partial batch. Fix: a smaller batch_size, or more examples.")
    train = classification_pipeline(x, y, sample_weight=weight, global_batch_size=batch_size, seed=seed, training=True)
    return ArrayInputs(train, eval_fn, n, batch_size)


def eval_set(data: Any, batch_size: int, seed: int, what: str):
    """One eval set as fit() takes it: a Dataset or DatasetFn as it is, arrays (x, y[, w]) as a pipeline."""
    if isinstance(data, tf.data.Dataset) or callable(data):
        return data
    return eval_pipeline(data, batch_size, seed, what)


def eval_sets(data: Any, batch_size: int, seed: int) -> Any:
    """None, one eval set, or a dict name -> eval set (several), each made ready by eval_set."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {name: eval_set(d, batch_size, seed, f"eval set {name!r}") for name, d in data.items()}
    return eval_set(data, batch_size, seed, "the eval data")


def named(eval_data: Any, validation: Optional[Any]) -> Any:
    """fit()'s eval data and the validation set (from validation_data or _split) as one: the validation
    set alone, or named "val" beside other named sets."""
    if validation is None:
        return eval_data
    if eval_data is None:
        return validation
    if not isinstance(eval_data, dict):
        raise DataError("fit(): both eval data and validation_data/validation_split. Fix: give one, or the "
                        "eval data as a dict of named sets (the validation set joins them as 'val').")
    if "val" in eval_data:
        raise DataError("fit(): the eval sets already have a 'val', and validation_data/validation_split makes one. "
                        "Fix: rename that set.")
    return {"val": validation, **eval_data}


def kwargs_for_arrays(**given: Dict[str, Any]) -> None:
    """Keras' array-only arguments given with a tf.data input: said, as Keras does, instead of ignored."""
    used = [name for name, value in given.items() if value is not None]
    if used:
        raise DataError(f"fit(): {', '.join(used)} apply to NumPy/array input only; the training data is a "
                        "tf.data.Dataset (or a function of an InputContext). Fix: put them in the data set "
                        "(batch it, hold out a split, add sample weights as the third element of each batch).")


@dataclass
class FitInputs:
    """fit()'s data made ready: the train and eval data (one set, or a dict of named sets), and for arrays
    the examples in an epoch and the batch size."""

    train: Any
    eval: Any
    train_examples: Optional[int] = None
    batch_size: Optional[int] = None

    def steps_per_epoch(self, given: Optional[int], batches_per_step: int) -> Optional[int]:
        """fit()'s steps_per_epoch: as given, else arrays' examples // batch // batches a step reads (else None)."""
        if given is not None or self.train_examples is None:
            return given
        return self.train_examples // self.batch_size // batches_per_step


def _same(a, b) -> bool:
    return a is b or (isinstance(a, (int, float)) and not isinstance(a, bool) and type(a) is type(b) and a == b)


def fit_inputs(memo: Optional[tuple], seed: int, train_data, eval_data, batch_size: Optional[int], **keras_kwargs) -> tuple:
    """(memo, FitInputs) for fit()'s arguments. `memo` is the last call's: the same arguments give the same
    data objects, so a later fit() call goes on with the iterator the last one left (inputs.KeptIterator)."""
    key = (train_data, eval_data, batch_size, *keras_kwargs.values())
    if memo is not None and len(memo[0]) == len(key) and all(_same(a, b) for a, b in zip(memo[0], key)):
        return memo
    validation = keras_kwargs["validation_data"]
    several = validation if isinstance(validation, dict) else None
    if is_array_like(train_data):  # fit(x, y, ...): the second argument is y, as in Keras
        arrays = from_arrays(train_data, eval_data, batch_size=batch_size, seed=seed,
                             **{**keras_kwargs, "validation_data": None if several is not None else validation})
        others = eval_sets(several, arrays.batch_size, seed)
        made = FitInputs(arrays.train, named(others, arrays.eval) if others is not None else arrays.eval,
                         arrays.train_examples, arrays.batch_size)
    else:
        kwargs_for_arrays(validation_split=keras_kwargs["validation_split"], sample_weight=keras_kwargs["sample_weight"])
        if validation is not None and eval_data is not None:
            raise DataError("fit(): eval data given twice (the second argument and validation_data). Fix: give one.")
        made = FitInputs(with_class_weight(train_data, keras_kwargs["class_weight"]),
                         eval_sets(validation if eval_data is None else eval_data, batch_size or DEFAULT_BATCH_SIZE, seed))
    return key, made
