"""The loss against the built model and the labels, once, before the first step (Trainer.build, Trainer._fit):
a categorical loss given class ids (or a sparse one given one-hot rows) is refused naming the loss meant, where
the step's trace failed with a 100-line traceback; a from_logits that contradicts the last layer (a linear layer
read as probabilities trained silently to half the accuracy) is warned of; class_weight naming classes the model
does not have (a silent no-op) is refused. Only what a functional or Sequential model's graph says is judged:
a subclassed model's output is known only from a call."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Mapping, Optional

import keras

from trainer.config import ConfigError

log = logging.getLogger("trainer.core")

CATEGORICAL = ("categorical_crossentropy", "categorical_focal_crossentropy")  # one-hot (or probability) rows
ELEMENTWISE = ("mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
               "mean_squared_logarithmic_error", "huber", "log_cosh")  # label and output compared element by element
SPARSE = ("sparse_categorical_crossentropy",)  # class ids


def _output_shape(model) -> Optional[tuple]:
    """The one output's shape from the model's graph (None: several outputs, or a subclassed model)."""
    model = getattr(model, "inner", model)  # precision's Float32Outputs wrapper
    try:
        outputs = model.outputs
    except (AttributeError, ValueError):
        return None
    if not outputs or len(outputs) != 1:
        return None
    return tuple(outputs[0].shape)


def _last_activation(model) -> Optional[str]:
    """'linear', 'softmax', 'sigmoid' (...) of the layer that makes a functional model's one output; None unknown."""
    model = getattr(model, "inner", model)
    try:
        layer = model.outputs[0]._keras_history[0]
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    if type(layer) is keras.layers.Softmax:
        return "softmax"
    # Keras' own classes only: a subclass may apply a softmax of its own in call() over a linear `activation`
    activation = getattr(layer, "activation", None)
    if activation is None or type(layer) not in (keras.layers.Dense, keras.layers.Activation, keras.layers.EinsumDense,
                                                 keras.layers.Conv1D, keras.layers.Conv2D):
        return None
    return getattr(activation, "__name__", None)


def _loss_kind(loss) -> Optional[str]:
    """The Keras function name of a Keras loss (CategoricalCrossentropy: categorical_crossentropy), else None."""
    fn = getattr(loss, "fn", loss)
    return getattr(fn, "__name__", None)


def _from_logits(loss) -> Optional[bool]:
    """The loss's from_logits: a Keras loss object's setting, or for a loss function (a name as in compile(),
    `loss="sparse_categorical_crossentropy"`, wrapped by keras_compat.FunctionLoss) its default; None: unknown."""
    value = _config_from_logits(loss)
    if isinstance(value, bool):
        return value
    function = _loss_function(loss)
    try:
        default = inspect.signature(function).parameters["from_logits"].default if function else None
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, bool) else None


def _config_from_logits(loss):
    try:
        return loss.get_config().get("from_logits")
    except (AttributeError, NotImplementedError, TypeError):
        return None


def _loss_function(loss) -> Optional[Callable]:
    """The Keras loss function a loss computes with when it is given as one (by name, as compile() takes it, or
    as the function), not as a loss object with its own from_logits; else None."""
    function = getattr(loss, "fn", loss)
    named = callable(function) and not isinstance(function, keras.losses.Loss)
    return function if named and getattr(function, "__module__", "").startswith("keras") else None


def _setting_of(loss, cli: bool, value: bool) -> tuple:
    """(what sets the loss's from_logits now, the fix setting it to `value`): the override, the class's argument,
    or for a function (a name as compile() takes it) its default and the class that has the argument:
    'sparse_categorical_crossentropy' -> keras.losses.SparseCategoricalCrossentropy(from_logits=True)."""
    function = _loss_function(loss) if not isinstance(_config_from_logits(loss), bool) else None
    if cli:
        return "loss.from_logits=" + str(not value).lower(), f"loss.from_logits={str(value).lower()}"
    if function is not None:
        name = getattr(function, "__name__", "")
        cls = "".join(word.capitalize() for word in name.split("_"))
        return (f"the loss {name!r} (from_logits={not value}, its default)",
                f"loss=keras.losses.{cls}(from_logits={value})")
    return f"{type(loss).__name__}(from_logits={not value})", f"{type(loss).__name__}(from_logits={value})"


def _loss_setting(class_name: str, from_logits: Optional[bool], cli: bool) -> str:
    if cli:
        return f"loss._target_=keras.losses.{class_name}"
    logits = "" if from_logits is None else f"from_logits={from_logits}"
    return f"Trainer(loss=keras.losses.{class_name}({logits}))"


def check_labels(loss, model, sample_batch, cli: bool) -> None:
    """A categorical loss given class ids, or a sparse one given one-hot rows of the output's width: a ConfigError
    naming the loss that fits these labels."""
    out = _output_shape(model)
    _, y, _ = keras.utils.unpack_x_y_sample_weight(sample_batch)
    kind = _loss_kind(loss)
    if out is None or y is None or not hasattr(y, "shape") or kind not in CATEGORICAL + SPARSE + ELEMENTWISE \
            or not out[-1]:
        return
    labels, classes = tuple(y.shape), out[-1]
    if kind in ELEMENTWISE:
        _check_elementwise(type(loss).__name__, labels, out, cli)
        return
    ids = len(labels) == len(out) - 1 or (len(labels) == len(out) and labels[-1] == 1 and classes > 1)
    one_hot = len(labels) == len(out) and labels[-1] == classes and classes > 1
    name, logits = type(loss).__name__, _from_logits(loss)
    if kind in CATEGORICAL and ids:
        meant = "SparseCategoricalCrossentropy"
        raise ConfigError(f"loss {name} takes one-hot labels of the model's {classes} outputs (shape "
                          f"(batch, {classes})), and these labels are class ids (shape {_shape(labels)}). Fix: "
                          f"{_loss_setting(meant, logits, cli)} for class ids, or one-hot labels.")
    if kind in SPARSE and one_hot:
        raise ConfigError(f"loss {name} takes class ids (shape (batch,)), and these labels are one-hot rows of "
                          f"the model's {classes} outputs (shape {_shape(labels)}). Fix: "
                          f"{_loss_setting('CategoricalCrossentropy', logits, cli)} for one-hot labels, or class "
                          "ids (argmax of the rows).")


def _check_elementwise(name: str, labels: tuple, out: tuple, cli: bool) -> None:
    """A loss that compares labels with outputs element by element (mse, mae) given one label per example for a
    model of several outputs: class ids for a classifier, most likely; (batch, 1) broadcast silently."""
    if out[-1] > 1 and len(labels) in (len(out) - 1, len(out)) and (len(labels) < len(out) or labels[-1] == 1):
        fix = ("loss._target_=keras.losses.SparseCategoricalCrossentropy (and, for a linear last layer, "
               "loss.from_logits=true)" if cli else
               "Trainer(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))")
        raise ConfigError(f"loss {name} compares labels with the model's outputs element by element, and these "
                          f"labels hold one value per example (shape {_shape(labels)}) for {out[-1]} outputs (shape "
                          f"(batch, {out[-1]})): class ids for a classifier? Fix: {fix} for class ids; or a model "
                          f"of one output, or labels of shape (batch, {out[-1]}).")


def _shape(shape: tuple) -> str:
    dims = ["batch" if i == 0 else str(d) for i, d in enumerate(shape)]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


def warn_if_logits_mismatch(loss, model, cli: bool) -> bool:
    """from_logits=False on a model whose last layer is linear (its outputs are logits, which the loss clips as if
    probabilities: it trains, badly, with no error), or from_logits=True after a softmax or sigmoid: warned once
    per Trainer. True when it warned."""
    logits, activation = _from_logits(loss), _last_activation(model)
    if logits is None or activation is None:
        return False
    if not logits and activation == "linear":
        now, fix = _setting_of(loss, cli, True)
        log.warning("The model's last layer is linear (it outputs logits), and %s makes the loss read them as "
                    "probabilities: it trains, to a far worse model, with no error. Fix: %s (or a softmax/sigmoid "
                    "last layer).", now, fix)
        return True
    if logits and activation in ("softmax", "sigmoid"):
        now, fix = _setting_of(loss, cli, False)
        log.warning("The model's last layer ends in a %s (it outputs probabilities), and %s makes the loss apply "
                    "one again: it trains, worse, with no error. Fix: %s (or a linear last layer).",
                    activation, now, fix)
        return True
    return False


def check_class_weight(class_weight: Optional[Mapping[Any, Any]], models: Mapping[str, Any], cli: bool) -> None:
    """class_weight keys beyond the model's classes weigh nothing (no label is that class): a ConfigError naming
    them and the classes the one model has (its output's width; 2 for one sigmoid output)."""
    if not class_weight or len(models) != 1:
        return
    out = _output_shape(next(iter(models.values())))
    if out is None or not out[-1]:
        return
    classes = out[-1] if out[-1] > 1 else 2
    beyond = sorted(int(k) for k in class_weight if str(k).lstrip("-").isdigit() and not 0 <= int(k) < classes)
    if beyond:
        setting = "data.class_weight" if cli else "fit(class_weight=...)"
        raise ConfigError(f"{setting} names classes {beyond} that the model does not have: it has {classes} classes "
                          f"(0..{classes - 1}), so their weights would weigh nothing. Fix: weights for classes "
                          f"0..{classes - 1} only, or a model with as many classes as the labels have.")
