"""What a Trainer holds, made from what the user gave: models, optimizers (one per model, by name),
metrics, loss and loss scales. Called under the strategy scope (trainer.py), after the dtype policy is set."""
from __future__ import annotations

import logging
import weakref
from typing import Callable, Dict, List, Mapping, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer import precision as precision_lib
from trainer.config import ConfigError, PrecisionConfig
from trainer.distribute import StrategyError
from trainer.errors import UserError
from trainer.loss_scale import LossScale
from trainer.precision import PrecisionError
from trainer.update import Updater

log = logging.getLogger("trainer.core")


def build(obj_or_builder):
    """Objects may be given ready-made or as zero-argument builders (called under the strategy scope)."""
    ready = (keras.layers.Layer, keras.metrics.Metric, keras.optimizers.Optimizer, keras.losses.Loss)
    if callable(obj_or_builder) and not isinstance(obj_or_builder, ready):
        return obj_or_builder()
    return obj_or_builder


# Reductions whose value differs from the Trainer's mean over the global batch (Keras' default,
# sum_over_batch_size, and "mean" give that mean): what each gives, and the fix
_OTHER_REDUCTIONS = {
    "sum": ("the sum over the batch", "Fix: drop reduction='sum'; for the scale of a sum's gradients, multiply the "
            "learning rate by the global batch size."),
    "mean_with_sample_weight": ("the weighted sum divided by the sum of the sample weights, not by the examples",
                                "Fix: drop reduction='mean_with_sample_weight', and give sample weights whose "
                                "mean is 1 for that division."),
}
_said_reduction: "weakref.WeakSet" = weakref.WeakSet()  # losses whose reduction was said to be replaced


def per_example_loss(loss):
    """Keras losses reduce by default; the step needs per-example values to average over the global batch. A
    reduction asked for that gives another value is replaced too, said once per loss object."""
    if isinstance(loss, keras.losses.Loss) and loss.reduction is not None:
        _say_reduction_replaced(loss)
        config = loss.get_config()
        config["reduction"] = None
        return type(loss).from_config(config)
    return loss


def _say_reduction_replaced(loss: keras.losses.Loss) -> None:
    if loss.reduction not in _OTHER_REDUCTIONS or loss in _said_reduction:
        return
    _said_reduction.add(loss)
    what, fix = _OTHER_REDUCTIONS[loss.reduction]
    log.warning("Trainer(loss=%s(reduction=%r)): the reduction is not used. The Trainer takes the per-example "
                "losses and averages them over the global batch (Keras' default reduction, 'sum_over_batch_size'), "
                "so the loss, its gradients and the logged value are the same on any number of replicas; %s is "
                "replaced by that mean. %s", type(loss).__name__, loss.reduction, what, fix)


def only(what: str, mapping: Dict, frozen=()):
    """The one entry of `mapping` (Trainer.model, .optimizer, .loss_scale); with several, an AttributeError naming
    what to use instead: the one model that trains when the others are frozen (a distillation's student)."""
    if len(mapping) != 1:
        trained = [n for n in mapping if what == "model" and n not in frozen]
        use = (f"trainer.models[{trained[0]!r}] (the one model that trains)" if len(trained) == 1
               else f"Trainer.{what}s[name]")
        raise AttributeError(f"Trainer.{what}: this Trainer has several ({sorted(mapping)}); use {use}")
    return next(iter(mapping.values()))


def make_models(model, models) -> Dict[str, keras.Model]:
    """{"model": model} for one model; name -> model for several (a dict, or a function returning one)."""
    if (model is None) == (models is None):
        raise TypeError("Trainer: give model= (one model) or models= (several), not both or neither")
    built = build(model if model is not None else models)
    if isinstance(built, Mapping):
        return _checked({name: build(m) for name, m in built.items()}, "model" if models is None else "models")
    if model is None and not isinstance(built, keras.Model):
        raise TypeError("Trainer(models=...) takes name -> model, or a function returning that; "
                        f"got {type(built).__name__}")
    return _checked({"model": built}, "model")


def _checked(models: Dict, given: str) -> Dict:
    """A thing that is no Keras model is refused here, naming the usual slip, not deep inside the first step."""
    for name, m in models.items():
        if not isinstance(m, keras.layers.Layer):
            raise TypeError(
                f"Trainer({given}=...): {name!r} is a {type(m).__name__} ({m!r}), not a Keras model. Functions that "
                "change a model in place return something else (fuse_elementwise returns what it swapped): call them "
                "on the model, then pass the model: `model = build(); fuse_elementwise(model); Trainer(model=model)`")
    return models


def freeze(frozen, models: Mapping[str, keras.Model], optimizers) -> frozenset:
    """The names of the frozen models (`Trainer(frozen=...)`), checked, each set `trainable = False`.

    A frozen model is in no checkpoint, so one an optimizer updated would resume from the weights its
    builder loads, not the trained ones: an optimizer for it is refused, as are variables it shares with a
    trained model (freezing it would freeze them too)."""
    names = frozenset([frozen] if isinstance(frozen, str) else frozen or ())
    unknown = sorted(names - set(models))
    if unknown:
        raise ConfigError(f"Trainer(frozen={sorted(names)}): {unknown} name no model (models: {sorted(models)})")
    if names and names == set(models):
        raise ConfigError(f"Trainer(frozen={sorted(names)}): every model is frozen, so nothing trains. Fix: freeze "
                          "only the models loaded from elsewhere (a distillation's teacher)")
    updated = sorted(names & set(optimizers or ()))
    if updated:
        raise ConfigError(f"Trainer(frozen=...): the frozen models {updated} have optimizers, but a frozen model is in "
                          "no checkpoint, so a resumed run would lose what they learned. Fix: drop optimizers[name] "
                          "of a frozen model, or do not freeze a model that trains")
    trained = {id(v) for name, m in models.items() if name not in names for v in m.weights}
    for name in sorted(names):
        shared = [v.path for v in models[name].weights if id(v) in trained]
        if shared:
            raise ConfigError(f"Trainer(frozen=...): frozen model {name!r} shares variables with a trained model "
                              f"({shared[:3]}); freezing it would freeze them too. Fix: give the "
                              "frozen model its own copy")
        models[name].trainable = False  # as Keras freezes: no trainable variables, BatchNormalization in inference mode
    return names


def frozen_builders(models, frozen) -> Dict[str, Callable]:
    """The frozen models given as builders (models={name: builder}), which random_frozen may call once more;
    a ready-made model (or a function returning the whole mapping) is not checked."""
    if not isinstance(models, Mapping):
        return {}
    return {name: b for name, b in models.items()
            if name in frozen and callable(b) and not isinstance(b, keras.layers.Layer)}


def random_frozen(builders: Mapping[str, Callable], models: Mapping[str, keras.Model], init_from) -> List[str]:
    """The frozen models that would stay at random weights all run: no init_from entry, and a builder that draws
    other weights when called again (one extra build each, after the first; under the same scope and policy).
    A builder that loads its weights builds the same ones twice. Said by frozen_watch.py once the step is known not
    to change them (a frozen model the step updates, an EMA target, is an error there, not random weights)."""
    loaded = set(init_from) if isinstance(init_from, Mapping) else set()
    found = []
    for name, builder in builders.items():
        if name in loaded or not models[name].weights:
            continue
        again = builder().weights
        first = models[name].weights
        if len(again) != len(first) or any(a.shape != b.shape or not np.array_equal(a.numpy(), b.numpy())
                                           for a, b in zip(again, first)):
            found.append(name)
        del again
    return found


def say_random_frozen(names: List[str], when: str = "") -> None:
    """The warning for random_frozen's models (said after the first loop, and again at the end of each fit() call)."""
    for name in names:
        log.warning("Frozen model %r has random weights%s: its builder draws new ones each call (called twice, they "
                    "differ) and no init_from names it, so the other models train against a random %s that never "
                    "trains. Fix: init_from={%r: PATH} (a checkpoint, .keras or .weights.h5 of it), or load its "
                    "weights in its builder.", name, when, name, name)


def make_optimizers(optimizer, optimizers, model_names, strategy=None) -> Dict[str, keras.optimizers.Optimizer]:
    """name -> optimizer, each training the model of its name; `optimizer` alone: one per model. Under the
    Trainer's `strategy` (given, or the scope it is made in) with several replicas, a ready-made optimizer
    must have been made under its scope (one replica counts each update once anyway)."""
    if optimizers is None:
        if optimizer is None:
            raise TypeError("Trainer: give optimizer= (a Keras optimizer or a function building one) or optimizers=")
        if len(model_names) > 1 and isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError("Trainer: a ready-made optimizer can train one model; with several models give a "
                            "function that builds one (called once per model), or optimizers={name: ...}")
        optimizers = {name: optimizer for name in model_names}
    unknown = sorted(set(optimizers) - set(model_names))
    if unknown:
        raise ConfigError(f"optimizers {unknown} name no model: each optimizer trains the model of the same name "
                          f"(models: {sorted(model_names)})")
    made = {name: build(opt) for name, opt in optimizers.items()}
    several = strategy is not None and strategy.num_replicas_in_sync > 1
    for name, opt in made.items():
        if several and not strategy.extended.variable_created_in_scope(opt.iterations.value):
            raise StrategyError(
                f"Optimizer {name!r} was made outside the strategy's scope: its step counter `iterations` is not "
                "mirrored, and every replica would add its update to it (2 replicas: twice per update), so "
                "learning-rate schedules and Adam's bias correction would run ahead. Fix: pass a function that "
                "builds it (optimizer=lambda: keras.optimizers.Adam(...)), or make it under strategy.scope(), or "
                "call model.compile() under strategy.scope() (a compiled model's optimizer).")
    return made


def make_metrics(metrics, remake: bool) -> Tuple[Dict[str, keras.metrics.Metric], Dict[str, keras.metrics.Metric]]:
    """(train metrics, eval metrics) by name; with `remake` a ready-made metric is made anew here, so its
    variables belong to the strategy."""
    def metric(m):
        built = build(m)
        # Keras' compile takes "accuracy"; which one it means depends on the loss
        if not isinstance(built, keras.metrics.Metric):
            raise ConfigError(f"Trainer(metrics=...): {m!r} is not a Keras metric. Fix: give metric objects or "
                              "functions building them, e.g. "
                              "metrics=[keras.metrics.SparseCategoricalAccuracy(name='accuracy')]")
        return type(built).from_config(built.get_config()) if built is m and remake else built

    if isinstance(metrics, Mapping):
        named = {name: metric(m) for name, m in metrics.items()}
    else:
        named = {(m := metric(x)).name: m for x in metrics or ()}
    return NamedMetrics(named), NamedMetrics({name: type(m).from_config(m.get_config()) for name, m in named.items()})


class MetricNameError(UserError, KeyError):
    """A metric looked up by a name the Trainer has none of (`self.metrics["acc"]` in a step)."""

    ag_pass_through = True  # raised while a step is traced: AutoGraph passes it on as it is, not in a StagingError

    def __str__(self) -> str:  # KeyError's would show the message quoted
        return str(self.args[0])


class NamedMetrics(dict):
    """name -> metric (Trainer.metrics, train_metrics, eval_metrics): a name it lacks is a MetricNameError naming the
    ones it has and the closest, where a step's `self.metrics["acc"]` was a bare KeyError inside TensorFlow's
    StagingError."""

    def __missing__(self, name):
        import difflib

        close = difflib.get_close_matches(str(name), [str(k) for k in self], n=1, cutoff=0.5)
        have = (f"its metrics are {sorted(self)}" + (f" (did you mean {close[0]!r}?)" if close else "") if self
                else "it has none")
        use = ("use one of those names (a metric's name is its `name=`, or its key in Trainer(metrics={...})), or "
               if self else "")
        raise MetricNameError(
            f"self.metrics[{name!r}]: this Trainer has no metric named {name!r}; {have}. Fix: {use}give the metric to "
            f"the Trainer: Trainer(metrics=[keras.metrics.SparseCategoricalAccuracy(name={name!r})]) (any Keras "
            "metric).")


def make_loss_scale(p: PrecisionConfig, say_ignored: bool) -> LossScale:
    """Dynamic for float16 (or bfloat16 with scale_bfloat16), fixed with precision.loss_scale, else none."""
    scaled = p.policy == "mixed_float16" or (p.policy == "mixed_bfloat16" and p.scale_bfloat16)
    if not scaled:
        if p.loss_scale is not None and say_ignored:  # a setting that does nothing is said, with the fix
            log.warning("precision.loss_scale=%g is ignored under precision=%s: loss scaling applies only to "
                        "mixed_float16 (and to mixed_bfloat16 with precision.scale_bfloat16=true). Fix: drop "
                        "precision.loss_scale, or use precision=mixed_float16.", p.loss_scale, p.policy)
        return LossScale("none")
    if p.loss_scale is not None:
        return LossScale("fixed", initial_scale=p.loss_scale, growth_interval=p.growth_interval)
    return LossScale("dynamic", initial_scale=p.initial_scale, growth_interval=p.growth_interval)


def check_ready_made_model(model: keras.Model, policy: str, strategy: tf.distribute.Strategy,
                           explicit_strategy: bool) -> None:
    """A model built before the Trainer keeps the dtype policy and device placement of that moment."""
    compute = precision_lib.compute_dtype(policy).name
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    if policy != "float32" and layers and not any(layer.compute_dtype == compute for layer in layers):
        raise PrecisionError(
            f"The model was built before the Trainer set precision {policy!r}: all its layers compute in "
            f"{layers[0].compute_dtype}. Fix: pass a function that builds it (model=lambda: build_model()), "
            f"or build it after keras.mixed_precision.set_dtype_policy({policy!r})."
        )
    weights = [w.value if isinstance(w, keras.Variable) else w for w in model.weights]
    if explicit_strategy and weights and not strategy.extended.variable_created_in_scope(weights[0]):
        raise StrategyError(
            "The model's variables were created outside the strategy's scope, so they are not mirrored "
            "across its replicas. Fix: pass a function that builds the model (model=lambda: build_model()), "
            "or build it under strategy.scope()."
        )


def make_updaters(trainer, clipnorm) -> Dict[str, Updater]:
    """One update pipeline (trainer/update.py) per optimizer of `trainer`, each with its own loss scale."""
    return {
        name: Updater(name, opt, lambda name=name: trainer.models[name].trainable_variables,
                      make_loss_scale(trainer.precision, say_ignored=i == 0), strategy=trainer.strategy,
                      clipnorm=clipnorm, skip_nonfinite=trainer.precision.skip_nonfinite,
                      fused=trainer.config.fused_optimizer, grad_multipliers=lambda: trainer.grad_multipliers)
        for i, (name, opt) in enumerate(trainer.optimizers.items())
    }
