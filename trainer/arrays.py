"""NumPy (and other array-like) input for `Trainer.fit(x, y, ...)`, with Keras' semantics, and class weights.

In-memory arrays become the same tf.data pipeline the recipes use (data.classification_pipeline): a
full-size shuffle seeded by the Trainer's seed, reshuffled each epoch, the partial last batch dropped in
training (equal batches on every replica) and kept in evaluation. The stream is a function of the seed,
so a resumed run skips to the same batches as an uninterrupted one. As in Keras: `validation_split` takes
the LAST fraction of the examples, before shuffling and before class weights; `validation_data` is (x, y),
(x, y, sample_weight) or a Dataset; `class_weight` and `sample_weight` are not given together; class weights
weigh the training loss only, a class the dict leaves out weighing 1.0; a list of arrays is several inputs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import tensorflow as tf

from trainer.array_checks import KERAS_ELSEWHERE, SHOWN_ARRAYS, check_batch_sizes, check_not_pairs, kwargs_for_arrays
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
    """Arrays of Keras' floatx. A list of arrays (or of dicts/tuples) is several inputs, as in Keras: made a
    tuple, since tf.data would stack a list into one tensor; a list of numbers (or of lists) is one array."""
    if isinstance(data, list) and any(isinstance(v, (dict, tuple)) or getattr(v, "ndim", 0) for v in data):
        return tuple(as_arrays(v) for v in data)
    if isinstance(data, dict):
        return {k: as_arrays(v) for k, v in data.items()}
    if isinstance(data, tuple):
        return tuple(as_arrays(v) for v in data)
    return _as_array(data)


def length(parts: Mapping[str, Any], caller: str = "fit()") -> int:
    """The examples in each of `parts` (name -> nested arrays), which must agree; a DataError names them (and
    the `caller`, fit() or evaluate())."""
    lengths = {}
    for name, value in parts.items():
        if value is not None:
            for i, array in enumerate(tf.nest.flatten(value)):
                lengths[name if len(tf.nest.flatten(value)) == 1 else f"{name}[{i}]"] = len(array) if array.ndim else 0
    if len(set(lengths.values())) > 1:
        listed = [f"{k} {v}" for k, v in lengths.items()]
        more = f", ... ({len(listed)} arrays)" if len(listed) > SHOWN_ARRAYS else ""
        raise DataError(f"{caller}: the arrays have different numbers of examples: " + ", ".join(listed[:SHOWN_ARRAYS])
                        + more + ". Fix: give one row per example in each (the first axis is the examples).")
    return next(iter(lengths.values()), 0)


def weight_table(class_weight: Mapping) -> np.ndarray:
    """class -> weight as a vector over classes 0..max; a class not in the dict weighs 1.0 (as in Keras)."""
    try:
        weights = {int(k): float(v) for k, v in class_weight.items()}
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"class_weight={class_weight!r} is not a dict of class index -> weight. Fix: e.g. "
                        "class_weight={0: 1.0, 1: 2.0}.") from None
    if not weights or min(weights) < 0 or any(not math.isfinite(w) or w < 0 for w in weights.values()):
        raise DataError(f"class_weight={class_weight!r}: give classes (integers >= 0) a finite weight >= 0.")
    return np.array([weights.get(c, 1.0) for c in range(max(weights) + 1)], np.float32)


def _classes(y):
    """Class indices of labels: integer labels, (n, 1) labels, or one-hot/probability rows (argmax)."""
    if isinstance(y, (dict, list, tuple)):
        raise DataError("class_weight is for a model with one output; these labels are a structure. Fix: give "
                        "sample weights instead (the third element of each batch, or sample_weight=).")
    y = tf.convert_to_tensor(y)
    if y.shape.rank is not None and y.shape.rank >= 2:
        return (tf.argmax(y, axis=-1, output_type=tf.int32) if y.shape[-1] != 1
                else tf.cast(tf.round(tf.squeeze(y, -1)), tf.int32))
    return tf.cast(tf.round(tf.cast(y, tf.float32)) if y.dtype.is_floating else y, tf.int32)


def class_sample_weights(y, table: np.ndarray):
    """Each example's weight, its class's; a label the dict does not name (above its largest key) weighs 1.0,
    as in Keras."""
    classes = _classes(y)
    known = (classes >= 0) & (classes < len(table))
    return tf.where(known, tf.gather(tf.constant(table), tf.where(known, classes, 0)), 1.0)


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
        return unweighted_as(data.map(weigh, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), data)

    def fn(ctx, **kwargs):
        return data(ctx, **kwargs).map(weigh, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    for attribute in ("skips_itself",):
        if hasattr(data, attribute):
            setattr(fn, attribute, getattr(data, attribute))
    if hasattr(data, "unshuffled"):
        fn.unshuffled = with_class_weight(data.unshuffled, class_weight)
    return unweighted_as(fn, data)


def unweighted_as(weighted, unweighted):
    """`weighted` (class-weighted training data) knowing its batches without the class weights, in the same
    order: what overfit_batches evaluates on (debug.plan_fit), since class weights weigh training only."""
    weighted.without_class_weight = unweighted
    return weighted


def without_class_weight(data):
    """Training data as evaluation may read it: without the class weights fit() added (see unweighted_as)."""
    return getattr(data, "without_class_weight", data)


@dataclass
class ArrayInputs:
    """What fit() trains and evaluates on, made from arrays."""

    train: DatasetFn
    eval: Optional[DatasetFn]
    train_examples: int
    batch_size: int


def eval_pipeline(data: Any, batch_size: int, seed: int, what: str, caller: str = "fit()") -> DatasetFn:
    """(x, y) or (x, y, sample_weight) arrays -> an eval DatasetFn (the partial last batch kept)."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise DataError(f"{what} is {type(data).__name__}; give (x, y) or (x, y, sample_weight) arrays, as in Keras, "
                        "or a tf.data.Dataset.")
    x, y, weight = (*as_arrays(tuple(data)), None)[:3]
    length({f"{what} x": x, f"{what} y": y, f"{what} sample_weight": weight}, caller)
    return classification_pipeline(x, y, sample_weight=weight, global_batch_size=batch_size, seed=seed, training=False)


def _labels(y) -> Any:
    """fit(x, y)'s y as arrays; eval sets given in its place (a Dataset, a dict of (x, y) pairs) are refused."""
    sets = isinstance(y, dict) and any(isinstance(v, (tuple, list, tf.data.Dataset)) or callable(v) for v in y.values())
    if sets or not is_array_like(y):
        raise DataError(f"fit(x, y): with arrays x the second argument is the labels y (as in Keras), and this one is "
                        f"{'a dict of eval sets' if sets else 'a ' + type(y).__name__}. Fix: give eval data as "
                        "validation_data=(x_val, y_val), a tf.data.Dataset, or validation_data={name: set, ...}.")
    return as_arrays(y)


def _split(x, y, weight, fraction: float, n: int):
    """Keras' validation_split: the LAST `fraction` of the examples, unshuffled -> (head, tail) of (x, y, w)."""
    if not 0 < fraction < 1:
        raise DataError(f"fit(): validation_split={fraction} must be in (0, 1).")
    at = int(math.floor(n * (1.0 - fraction)))
    if at in (0, n):
        raise DataError(f"fit(): validation_split={fraction} of {n} examples leaves an empty training or "
                        "validation set. Fix: more examples, or another fraction.")
    cut = lambda a, part: None if a is None else tf.nest.map_structure(lambda v: v[part], a)  # noqa: E731
    return (tuple(cut(a, slice(None, at)) for a in (x, y, weight)),
            tuple(cut(a, slice(at, None)) for a in (x, y, weight)))


def from_arrays(x, y=None, *, batch_size: Optional[int], seed: int, sample_weight=None, class_weight=None,
                validation_data=None, validation_split: Optional[float] = None, shuffle: Optional[bool] = None,
                validation_batch_size: Optional[int] = None) -> ArrayInputs:
    """Keras' fit(x, y, ...) arguments -> the train DatasetFn (and the eval one, from validation_data or split).
    As Keras, the split comes first and class weights weigh the training part only."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    check_batch_size(batch_size)
    if shuffle is not None and not isinstance(shuffle, (bool, np.bool_)):
        raise DataError(f"fit(): shuffle={shuffle!r}; give True or False (Keras' 'batch' is not supported).")
    eval_batch = batch_size if validation_batch_size is None else validation_batch_size
    check_batch_size(eval_batch)
    check_not_pairs(x)
    x, y = as_arrays(x), None if y is None else _labels(y)
    weight = None if sample_weight is None else as_arrays(sample_weight)
    n = length({"x": x, "y": y, "sample_weight": weight})
    if y is None and (weight is not None or class_weight):
        raise DataError("fit(): sample_weight and class_weight need the labels y.")
    if class_weight and weight is not None:
        raise DataError("fit(): class_weight and sample_weight cannot be given together (as in Keras). Fix: "
                        "multiply the class weights into sample_weight, or give one of them.")
    eval_fn = None
    if validation_split:
        if validation_data is not None:
            raise DataError("fit(): give validation_data or validation_split, not both (Keras would ignore the split).")
        (x, y, weight), (hx, hy, hw) = _split(x, y, weight, validation_split, n)
        eval_fn = classification_pipeline(hx, hy, sample_weight=hw, global_batch_size=eval_batch, seed=seed,
                                          training=False)
        n = len(tf.nest.flatten(x)[0])
    elif validation_data is not None:
        eval_fn = eval_set(validation_data, eval_batch, seed, "validation_data")
    if class_weight:
        weight = class_sample_weights(y, weight_table(class_weight)).numpy()
    if n < batch_size:
        raise DataError(f"fit(): {n} training examples are fewer than one batch (batch_size={batch_size}), and "
                        "training drops a partial batch. Fix: a smaller batch_size, or more examples.")
    pipeline = functools.partial(classification_pipeline, x, y, global_batch_size=batch_size, seed=seed, training=True,
                                 shuffle=shuffle is not False)
    train = (unweighted_as(pipeline(sample_weight=weight), pipeline()) if class_weight
             else pipeline(sample_weight=weight))
    return ArrayInputs(train, eval_fn, n, batch_size)


def eval_set(data: Any, batch_size: int, seed: int, what: str, caller: str = "fit()"):
    """One eval set as fit() takes it: a Dataset or DatasetFn as it is, arrays (x, y[, w]) as a pipeline."""
    if isinstance(data, tf.data.Dataset) or callable(data):
        return data
    return eval_pipeline(data, batch_size, seed, what, caller)


def eval_sets(data: Any, batch_size: int, seed: int, caller: str = "fit()") -> Any:
    """None, one eval set, or a dict name -> eval set (several), each made ready by eval_set."""
    if data is None:
        return None
    if isinstance(data, dict):
        return {name: eval_set(d, batch_size, seed, f"eval set {name!r}", caller) for name, d in data.items()}
    return eval_set(data, batch_size, seed, "the eval data", caller)


def named(eval_data: Optional[dict], validation: Optional[Any]) -> Any:
    """fit()'s named eval sets (a dict) and the validation set (from validation_data or _split) as one: the
    validation set alone, or named "val" beside the named sets."""
    if validation is None:
        return eval_data
    if eval_data is None:
        return validation
    if "val" in eval_data:
        raise DataError("fit(): the eval sets already have a 'val', and validation_data/validation_split makes one. "
                        "Fix: rename that set.")
    return {"val": validation, **eval_data}


def fit_arguments(train_data, eval_data, keywords: Mapping[str, Any], fit: Callable) -> tuple:
    """fit()'s (training data, second argument) with Keras' keywords x= and y=. eval_data= with arrays x
    (where the second argument is y) and Keras' keywords the Trainer takes elsewhere: a UserError saying so; a
    keyword `fit` (Trainer.fit) does not take names the one meant."""
    given = dict(keywords)
    if "train_data" in given:  # fit(train_data=ds), as before fit took arrays
        if train_data is not None:
            raise TypeError("fit() got train_data twice: as an argument and as train_data=")
        train_data = given.pop("train_data")
    for name, positional in (("x", train_data), ("y", eval_data)):
        if name in given and positional is not None:
            raise TypeError(f"fit() got {name} twice: as an argument and as {name}=")
    train_data, eval_data = given.pop("x", train_data), given.pop("y", eval_data)
    if "eval_data" in given:
        if is_array_like(train_data):
            raise DataError("fit(x, eval_data=...): with arrays x the second argument is the labels y (as in Keras), "
                            "so eval_data= would be read as labels. Fix: validation_data=(x_val, y_val), a "
                            "tf.data.Dataset, or validation_data={name: set, ...}.")
        if eval_data is not None:
            raise TypeError("fit() got eval_data twice: as an argument and as eval_data=")
        eval_data = given.pop("eval_data")
    elsewhere = [f"{k} (use {KERAS_ELSEWHERE[k]})" for k in given if k in KERAS_ELSEWHERE]
    if elsewhere:
        raise DataError(f"fit(): Keras' {', '.join(elsewhere)}: the Trainer takes these elsewhere.")
    if given:
        from trainer.other_tools import unknown_keyword

        raise unknown_keyword(*next(iter(given.items())), fit)
    if train_data is None:
        raise TypeError("fit() missing the training data (x, a tf.data.Dataset or a function of an InputContext)")
    return train_data, eval_data


def evaluate_inputs(eval_data, y, *, x=None, batch_size: Optional[int], sample_weight, seed: int):
    """Trainer.evaluate's data as fit() takes it: evaluate(x, y[, sample_weight=w], batch_size=...) with arrays,
    as Keras' evaluate; else one eval set (a Dataset, a function of an InputContext, (x, y[, w]) arrays) or a dict
    name -> set, as fit()'s validation_data. `x`: evaluate(x=..., y=...), Keras' keyword."""
    if x is not None and eval_data is not None:
        raise TypeError("evaluate() got x twice: as its first argument and as x=")
    x = eval_data if x is None else x
    check_batch_sizes(x, "evaluate", batch_size=batch_size)
    batch = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if y is not None:
        if not is_array_like(x):
            raise DataError(f"evaluate(x, y): with labels y, x must be arrays (as in Keras); it is a "
                            f"{type(x).__name__}. Fix: evaluate(dataset) alone, its batches holding the labels.")
        return eval_pipeline((x, _labels(y)) + (() if sample_weight is None else (sample_weight,)), batch, seed,
                             "evaluate(x, y)", "evaluate()")
    if sample_weight is not None:
        raise DataError("evaluate(..., sample_weight=...): sample weights go with arrays x and y. Fix: "
                        "evaluate(x, y, sample_weight=w), or give them as the third element of each batch.")
    if x is None:
        raise TypeError("evaluate() missing the eval data (x and y arrays, a tf.data.Dataset, or a dict of sets)")
    ready = lambda d: isinstance(d, tf.data.Dataset) or callable(d)  # noqa: E731
    if ready(x) or (isinstance(x, dict) and all(ready(d) for d in x.values())):
        return x  # as given: fit()'s own eval data keeps its identity (its eval limit, debug.eval_limit_of)
    return eval_sets(x, batch, seed, "evaluate()")


@dataclass
class FitInputs:
    """fit()'s data made ready: the train and eval data (one set, or a dict of named sets), and for arrays
    the examples in an epoch and the batch size."""

    train: Any
    eval: Any
    train_examples: Optional[int] = None
    batch_size: Optional[int] = None
    class_weight: Optional[Mapping] = None  # fit()'s, checked against the model once it is built (loss_fit.py)

    def steps_per_epoch(self, given: Optional[int], batches_per_step: int) -> Optional[int]:
        """fit()'s steps_per_epoch: as given, else arrays' examples // batch // batches a step reads (else None)."""
        if given is not None or self.train_examples is None:
            return given
        return self.train_examples // self.batch_size // batches_per_step


def _same(a, b) -> bool:
    return a is b or (isinstance(a, (int, float)) and not isinstance(a, bool) and type(a) is type(b) and a == b)


def fit_inputs(memo: Optional[tuple], seed: int, train_data, eval_data, batch_size: Optional[int],
               **keras_kwargs) -> tuple:
    """(memo, FitInputs) for fit()'s arguments. `memo` is the last call's: the same arguments give the same
    data objects, so a later fit() call goes on with the iterator the last one left (inputs.KeptIterator)."""
    check_batch_sizes(train_data, batch_size=batch_size, validation_batch_size=keras_kwargs["validation_batch_size"])
    key = (train_data, eval_data, batch_size, *keras_kwargs.values())
    if memo is not None and len(memo[0]) == len(key) and all(_same(a, b) for a, b in zip(memo[0], key)):
        return memo
    validation = keras_kwargs["validation_data"]
    several = validation if isinstance(validation, dict) else None
    eval_batch = keras_kwargs["validation_batch_size"] or batch_size or DEFAULT_BATCH_SIZE
    if is_array_like(train_data):  # fit(x, y, ...): the second argument is y, as in Keras
        arrays = from_arrays(train_data, eval_data, batch_size=batch_size, seed=seed,
                             **{**keras_kwargs, "validation_data": None if several is not None else validation})
        others = eval_sets(several, eval_batch, seed)
        made = FitInputs(arrays.train, named(others, arrays.eval) if others is not None else arrays.eval,
                         arrays.train_examples, arrays.batch_size)
    else:  # Keras ignores shuffle for a Dataset, and so do we: its order is the Dataset's own
        kwargs_for_arrays(validation_split=keras_kwargs["validation_split"],
                          sample_weight=keras_kwargs["sample_weight"])
        if validation is not None and eval_data is not None:
            raise DataError("fit(): eval data given twice (the second argument and validation_data). Fix: give one.")
        made = FitInputs(with_class_weight(train_data, keras_kwargs["class_weight"]),
                         eval_sets(validation if eval_data is None else eval_data, eval_batch, seed))
    made.class_weight = keras_kwargs["class_weight"]
    return key, made
