"""Keras' compile() habits, taken as Keras takes them: a compiled model's loss, optimizer and metrics, and the
string identifiers and metric functions compile() accepts. Without this, a compiled model's compile() settings
were silently dropped (its metrics vanished, and a later model.evaluate() used another loss than training), and
optimizer="adam" or loss="mse" failed deep inside the first step. Everything here runs at Trainer(), before
any data is read or step traced; what cannot be taken is a ConfigError naming the fix.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import keras

from trainer.config import ConfigError
from trainer.per_output import PerOutputError, indexes, per_output_loss_fix, per_output_metrics_fix, structure

log = logging.getLogger("trainer.core")

def _is_binary_or_sparse(y_true, y_pred) -> Tuple[bool, bool]:
    """Keras compile()'s rule (trainers/compile_utils.py) for what 'accuracy' and 'crossentropy' mean: by the
    static shapes of the labels and the outputs, read when the step is traced."""
    is_binary = y_pred.shape[-1] == 1
    is_sparse = len(y_true.shape) < len(y_pred.shape) or (y_true.shape[-1] == 1 and y_pred.shape[-1] > 1)
    return is_binary, is_sparse


def _by_shape(y_true, y_pred, binary, sparse, categorical, what: str):
    """`binary`, `sparse` or `categorical` (y_true, y_pred), chosen by _is_binary_or_sparse as compile() chooses;
    labels or outputs of several tensors (a dict) are a PerOutputError. `what`: "loss 'crossentropy'", ..."""
    for side, value in (("outputs", y_pred), ("labels", y_true)):
        if keras.tree.is_nested(value):
            kind = what.split()[0]
            fix = (per_output_loss_fix if kind == "loss" else per_output_metrics_fix)(indexes(value))
            raise PerOutputError(f"The {what} compares one output with its labels, but the {side} are "
                                 f"{structure(value)}: a {kind} per output is not supported (the Trainer gives it all "
                                 f"the labels and outputs). {fix}")
    is_binary, is_sparse = _is_binary_or_sparse(y_true, y_pred)
    return (binary if is_binary else sparse if is_sparse else categorical)(y_true, y_pred)


@keras.saving.register_keras_serializable(package="trainer")
def accuracy_by_shape(y_true, y_pred):
    """compile(metrics=['accuracy']): binary, sparse categorical or categorical accuracy, by the shapes."""
    return _by_shape(y_true, y_pred, keras.metrics.binary_accuracy, keras.metrics.sparse_categorical_accuracy,
                     keras.metrics.categorical_accuracy, "metric 'accuracy'")


@keras.saving.register_keras_serializable(package="trainer")
def crossentropy_by_shape(y_true, y_pred):
    """compile(loss='crossentropy'): binary, sparse categorical or categorical crossentropy, by the shapes."""
    return _by_shape(y_true, y_pred, keras.losses.binary_crossentropy, keras.losses.sparse_categorical_crossentropy,
                     keras.losses.categorical_crossentropy, "loss 'crossentropy'")


def _same_rank(y_true, y_pred):
    """Keras' rule (losses/loss.py squeeze_or_expand_to_same_rank) for a loss function compile() wraps: a last
    axis of 1 on one side only is squeezed, or the other side's rank-1 tensor expanded to match it."""
    true_rank, pred_rank = len(y_true.shape), len(y_pred.shape)
    if true_rank == pred_rank + 1 and y_true.shape[-1] == 1:
        if pred_rank == 1:
            return y_true, keras.ops.expand_dims(y_pred, -1)
        return keras.ops.squeeze(y_true, -1), y_pred
    if pred_rank == true_rank + 1 and y_pred.shape[-1] == 1:
        if true_rank == 1:
            return keras.ops.expand_dims(y_true, -1), y_pred
        return y_true, keras.ops.squeeze(y_pred, -1)
    return y_true, y_pred


class FunctionLoss(keras.losses.Loss):
    """A loss function (y_true, y_pred) as compile() wraps one (Keras' LossFunctionWrapper, which Keras does
    not export): labels of shape (batch,) and outputs (batch, 1) brought to one rank first, per-example values
    (reduction None: the step averages over the global batch). Its copies hold the same function object."""

    def __init__(self, fn, name: Optional[str] = None, reduction=None, dtype=None):
        super().__init__(name=name or getattr(fn, "__name__", None), reduction=reduction, dtype=dtype)
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(*_same_rank(y_true, y_pred))

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "fn": self.fn}


class FunctionMetric(keras.metrics.MeanMetricWrapper):
    """A metric function (y_true, y_pred) -> per-example values, averaged as compile() wraps one. Its copies
    (the eval metrics, a remake under the strategy) hold the same function object: a lambda or a local
    function needs no serialization."""

    def get_config(self) -> Dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "fn": self._fn, **self._fn_kwargs}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class Unweighted(keras.metrics.Metric):
    """`metric` without sample weights: what Keras' compile(metrics=...) computes (only its weighted_metrics are
    weighted), where the Trainer's metrics weigh each example by its sample weight (class_weight included).
    Trainer(metrics=[Unweighted(keras.metrics.SparseCategoricalAccuracy(name="accuracy"))]) reports Keras'."""

    def __init__(self, metric: keras.metrics.Metric, name: Optional[str] = None, dtype=None):
        super().__init__(name=name or metric.name, dtype=dtype or metric.dtype)
        self.metric = metric

    def update_state(self, y_true, y_pred, sample_weight=None):
        return self.metric.update_state(y_true, y_pred)

    def result(self):
        return self.metric.result()

    def reset_state(self) -> None:
        self.metric.reset_state()

    def get_config(self) -> Dict[str, Any]:  # a copy of the metric: from_config makes the Trainer's copies of it
        return {"metric": type(self.metric).from_config(self.metric.get_config()), "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _compares_one_output(metric) -> bool:
    """A metric of Keras' (or compile()'s 'accuracy'), which compares one tensor of labels with one of outputs; not a
    metric function or Metric class of the user's, which may read the dicts."""
    if isinstance(metric, Unweighted):
        metric = metric.metric
    if isinstance(metric, FunctionMetric):
        fn = metric._fn
        return fn in (accuracy_by_shape, crossentropy_by_shape) or getattr(fn, "__module__", "").startswith("keras")
    return type(metric).__module__.split(".")[0] == "keras"


def check_whole_output_metrics(metrics: Mapping[str, Any], outputs, labels) -> None:
    """The default step gives each metric all the labels and outputs: with several (a dict or list), a Keras metric
    is a PerOutputError naming the fix, said when the model's outputs are first seen (it failed inside the traced
    step on "'dict' object has no attribute 'shape'")."""
    for side, value in (("outputs", outputs), ("labels", labels)):
        if value is None or not keras.tree.is_nested(value):
            continue
        named = [name for name, metric in metrics.items() if _compares_one_output(metric)]
        if named:
            raise PerOutputError(f"Trainer(metrics=...): the model's {side} are {structure(value)}, and the metrics "
                                 f"{named} compare one output with its labels: metrics per output are not supported "
                                 "(the default step gives each metric all the labels and outputs, as it does the "
                                 f"loss). {per_output_metrics_fix(indexes(value))}")


def _takes_labels_and_predictions(fn) -> bool:
    """A function of (y_true, y_pred), not a zero-argument builder."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(required) >= 2


def _close_names(name: str, module) -> str:
    """'did you mean ...? ' for a close public name of `module` (keras.losses, .metrics, .optimizers), else ''."""
    names = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)]
    found = difflib.get_close_matches(name, names + [n.lower() for n in names if n[:1].isupper()], n=1, cutoff=0.6)
    return f"did you mean {found[0]!r}? Else " if found else ""


def metric_of(metric, where: str = "Trainer(metrics=...)"):
    """One metric as compile() takes it: 'accuracy'/'acc' by the shapes, another name (keras.metrics.get, named
    as given), a config dict, a metric function (wrapped), a Metric or a builder (as they are)."""
    if isinstance(metric, keras.metrics.Metric) or inspect.isclass(metric):
        return metric
    if isinstance(metric, str) and metric.lower() in ("accuracy", "acc"):
        return FunctionMetric(accuracy_by_shape, name=metric)
    if isinstance(metric, (str, dict)):
        try:
            made = keras.metrics.get(metric)
        except (ValueError, TypeError):
            hint = _close_names(metric, keras.metrics) if isinstance(metric, str) else ""
            raise ConfigError(f"{where}: {metric!r} is not a Keras metric name. Fix: {hint}a name compile() takes "
                              "('accuracy', 'mae', 'AUC', ...), or a metric object, e.g. "
                              "keras.metrics.SparseCategoricalAccuracy(name='accuracy')") from None
        if not isinstance(made, keras.metrics.Metric):
            made = FunctionMetric(made)
        if isinstance(metric, str):
            made.name = metric  # as compile() names it
        return made
    if callable(metric) and _takes_labels_and_predictions(metric):
        return FunctionMetric(metric, name=getattr(metric, "__name__", None))
    return metric  # a builder, or something make_metrics refuses


def metrics_of(metrics, where: str = "Trainer(metrics=...)"):
    """Trainer(metrics=...): a list (or one metric), or a mapping name -> metric, each by metric_of."""
    if metrics is None:
        return None
    if isinstance(metrics, Mapping):
        _refuse_per_output(where, metrics.items(), "the entry {name!r}: {value}", indexes(metrics))
        return {name: metric_of(m, where) for name, m in metrics.items()}
    metrics = [metrics] if isinstance(metrics, (str, keras.metrics.Metric)) or callable(metrics) else list(metrics)
    _refuse_per_output(where, enumerate(metrics), "the element [{name}], {value},", indexes(metrics))
    return [metric_of(m, where) for m in metrics]


def _refuse_per_output(where: str, items, shown: str, keys: List[Any]) -> None:
    """Keras' metrics per output, {'cls': ['accuracy'], ...} or [['accuracy'], ['mae']]: a PerOutputError (a mapping
    names each metric, name -> one metric; a list holds metrics), where it said "['accuracy'] is not a Keras metric".
    `keys`: the outputs' as the fix reads them (per_output.indexes)."""
    for name, value in items:
        if isinstance(value, (list, tuple)) or (isinstance(value, Mapping) and "class_name" not in value):
            given = shown.format(name=name, value=_shown(value))
            raise PerOutputError(f"{where}: {given} reads as metrics per output (Keras' compile() form), which are not "
                                 "supported: the Trainer's metrics are one list, or a mapping name -> one metric, each "
                                 f"given all the labels and outputs. {per_output_metrics_fix(keys)}")


def loss_of(loss, where: str = "Trainer(loss=...)"):
    """The loss as compile() takes it: a name (keras.losses.get; 'crossentropy'/'ce' by the shapes), a config
    dict, a Loss class or object, a function (y_true, y_pred). Per-output losses (a dict or list over the
    outputs) are refused here, with the fix."""
    if loss is None or isinstance(loss, keras.losses.Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in ("crossentropy", "ce"):
        return FunctionLoss(crossentropy_by_shape, name=loss)
    if isinstance(loss, str) or (isinstance(loss, Mapping) and "class_name" in loss):
        try:
            made = keras.losses.get(loss)
        except (ValueError, TypeError):
            hint = _close_names(loss, keras.losses) if isinstance(loss, str) else ""
            raise ConfigError(f"{where}: {loss!r} is not a Keras loss name. Fix: {hint}a name compile() takes "
                              "('sparse_categorical_crossentropy', 'mse', ...), or a loss object, e.g. "
                              "keras.losses.SparseCategoricalCrossentropy(from_logits=True)") from None
        if isinstance(made, keras.losses.Loss):
            return made  # its reduction is replaced by per-example (components.per_example_loss)
        # as compile() wraps a function: labels of shape (batch,) and outputs (batch, 1) are brought to one rank
        return FunctionLoss(made, name=loss if isinstance(loss, str) else None)
    if isinstance(loss, (Mapping, list, tuple)) or hasattr(loss, "keys"):  # a Keras model's tracked DictWrapper too
        raise ConfigError(f"{where}: a loss per output ({type(loss).__name__} {_shown(loss)}) is not supported: "
                          f"the default step computes one loss from the labels and the outputs. "
                          f"{per_output_loss_fix(indexes(loss))}")
    if inspect.isclass(loss) and issubclass(loss, keras.losses.Loss):
        return loss()
    if not callable(loss):
        raise ConfigError(f"{where}: {_shown(loss)} is not a loss. Fix: a Keras loss name or object, or a function "
                          "(y_true, y_pred) -> per-example loss")
    return loss


def _optimizer_from(identifier):
    return keras.optimizers.get(identifier)


def optimizer_of(optimizer, where: str = "Trainer(optimizer=...)"):
    """A name or config dict (keras.optimizers.get, with Keras' defaults) -> a builder the Trainer calls under the
    strategy scope (one per model with several); anything else as it is."""
    if not isinstance(optimizer, (str, dict)):
        return optimizer
    try:
        keras.optimizers.get(optimizer)  # said now, not when the optimizers are made
    except (ValueError, TypeError):
        hint = _close_names(optimizer, keras.optimizers) if isinstance(optimizer, str) else ""
        raise ConfigError(f"{where}: {optimizer!r} is not a Keras optimizer name. Fix: {hint}a name compile() takes "
                          "('adam', 'sgd', 'rmsprop', 'adamw', ...), or an optimizer, e.g. "
                          "optimizer=lambda: keras.optimizers.Adam(learning_rate=1e-3)") from None
    return functools.partial(_optimizer_from, optimizer)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _compiled(model) -> Dict[str, Any]:
    """What the model's compile() set (Keras 3): its optimizer (the inner one of a LossScaleOptimizer: the
    Trainer scales the loss itself), loss, and metrics and weighted_metrics as given to compile()."""
    if not getattr(model, "compiled", False):
        return {}
    given = getattr(getattr(model, "_compile_config", None), "config", None) or {}  # compile()'s own arguments
    found: Dict[str, Any] = {}
    optimizer = getattr(model, "optimizer", None)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    if optimizer is not None:
        found["optimizer"] = optimizer
    if getattr(model, "loss", None) is not None:
        if given.get("loss_weights") is not None:
            raise ConfigError(f"The model's compile(loss_weights={_shown(given['loss_weights'])}) is not taken over "
                              "by the Trainer. Fix: give the weighted loss as Trainer(loss=...), e.g. "
                              "loss=lambda y, p: 0.5 * keras.losses.mean_squared_error(y, p)")
        found["loss"] = given.get("loss", model.loss)  # as given (model.loss may be a tracked dict)
    metrics = [Unweighted(_instance(metric_of(m, "the model's compile(metrics=...)")))  # as compile() computes them
               for m in _flat(given.get("metrics"), "metrics")]
    names = {m.name for m in metrics}
    for m in _flat(given.get("weighted_metrics"), "weighted_metrics"):
        metrics.append(_instance(metric_of(m, "the model's compile(weighted_metrics=...)")))
        if metrics[-1].name in names:  # one name each: metrics=['accuracy'], weighted_metrics=['accuracy']
            metrics[-1].name = "weighted_" + metrics[-1].name
    if metrics:
        found["metrics"] = metrics
    return found


def _instance(metric):
    return metric() if inspect.isclass(metric) else metric


def _flat(metrics, argument: str) -> List[Any]:
    """compile()'s metrics over the one output; per-output ones (a dict, a list of lists) are refused."""
    if metrics is None:
        return []
    if not isinstance(metrics, (list, tuple)):
        metrics = [metrics]
    if any(isinstance(m, (list, tuple)) or (isinstance(m, Mapping) and "class_name" not in m) for m in metrics):
        raise ConfigError(f"The model's compile({argument}=...) gives metrics per output, which the Trainer does not "
                          "take over. Fix: Trainer(metrics=[...]) with metrics over the whole output, or update "
                          "per-output metrics in an overridden train_step/test_step (docs/research.md)")
    return list(metrics)


def _name(what: str, value) -> str:
    if what == "optimizer":
        return f"optimizer {type(value).__name__}"
    if what == "metrics":
        return "metrics [" + ", ".join(m if isinstance(m, str) else getattr(m, "name", None)
                                       or getattr(m, "__name__", type(m).__name__) for m in value) + "]"
    return f"loss {value if isinstance(value, str) else getattr(value, 'name', None) or _shown(value)}"


def keras_arguments(models: Mapping[str, keras.Model], one_model: bool, loss, optimizer,
                    optimizers: Optional[Mapping[str, Any]], metrics) -> tuple:
    """Trainer()'s (loss, optimizer, optimizers, metrics) with Keras' identifiers resolved, and for one compiled
    model (model=...) what its compile() set in place of each the Trainer was not given (said once at INFO); one
    the Trainer was given wins, and a WARNING names what of compile() goes unused."""
    compiled = _compiled(models["model"]) if one_model and "model" in models else {}
    given = {"loss": loss, "optimizer": optimizer if optimizers is None else optimizers, "metrics": metrics}
    adopted, unused = [], []
    for what, value in compiled.items():
        (unused if given[what] is not None else adopted).append(_name(what, value))
    where = {what: f"the model's compile({what}=...)" if what in compiled and given[what] is None
             else f"Trainer({what}=...)" for what in given}
    if given["loss"] is None and "loss" in compiled:
        loss = compiled["loss"]
    if given["optimizer"] is None and "optimizer" in compiled:
        optimizer = compiled["optimizer"]
    if metrics is None and "metrics" in compiled:
        metrics = compiled["metrics"]
    if adopted:
        log.info("The model was compiled: training with its compile() %s (the Trainer's own arguments would "
                 "replace them)", ", ".join(adopted))
    if unused:
        log.warning("The model's compile() %s are not used: Trainer(...) was given its own. Keras' model.evaluate(), "
                    "model.fit() and a .keras save still use compile()'s. Fix: leave them out of Trainer(...) to train "
                    "with compile()'s, or call model.compile(...) with the Trainer's to make them agree.",
                    ", ".join(unused))
    optimizers = None if optimizers is None else {name: optimizer_of(o, "Trainer(optimizers=...)")
                                                  for name, o in optimizers.items()}
    return (loss_of(loss, where["loss"]), optimizer_of(optimizer, where["optimizer"]), optimizers,
            metrics_of(metrics, where["metrics"]))
