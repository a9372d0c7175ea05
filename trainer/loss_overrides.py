"""The loss and metrics of a command line, checked before anything is built: Keras' string shorthand
(`loss=categorical_crossentropy`, `metrics=[accuracy]`), which this config takes as `_target_` nodes, is refused
with the override that works (trainer/argv_check.py, before Hydra composes: no TensorFlow); a `_target_` that
names no class, or an argument its class does not take, is refused naming the one meant (trainer/assemble.py's
parts_of, before the parts are made). Else Hydra's "Cannot instantiate config of type str", "Cannot merge
DictConfig with ListConfig" or a traceback from the class's constructor ended the run with exit 1."""
from __future__ import annotations

import difflib
import inspect
from typing import Any, List, Optional

# Keras 3's classes (keras.losses, keras.metrics) that its string shorthand names (tests/test_loss_checks.py
# keeps them in step with the installed Keras): the fix a shorthand gets is read here without importing Keras.
LOSS_CLASSES = ("BinaryCrossentropy", "BinaryFocalCrossentropy", "CTC", "CategoricalCrossentropy",
                "CategoricalFocalCrossentropy", "CategoricalHinge", "Circle", "CosineSimilarity", "Dice", "Hinge",
                "Huber", "KLDivergence", "LogCosh", "MeanAbsoluteError", "MeanAbsolutePercentageError",
                "MeanSquaredError", "MeanSquaredLogarithmicError", "Poisson", "SparseCategoricalCrossentropy",
                "SquaredHinge", "Tversky")
METRIC_CLASSES = ("AUC", "Accuracy", "BinaryAccuracy", "BinaryCrossentropy", "BinaryIoU", "CategoricalAccuracy",
                  "CategoricalCrossentropy", "CategoricalHinge", "CosineSimilarity", "F1Score", "FBetaScore",
                  "FalseNegatives", "FalsePositives", "Hinge", "IoU", "KLDivergence", "LogCoshError",
                  "MeanAbsoluteError", "MeanAbsolutePercentageError", "MeanIoU", "MeanSquaredError",
                  "MeanSquaredLogarithmicError", "Poisson", "Precision", "R2Score", "Recall",
                  "RootMeanSquaredError", "SparseCategoricalAccuracy", "SparseCategoricalCrossentropy",
                  "SparseTopKCategoricalAccuracy", "SquaredHinge", "TopKCategoricalAccuracy", "TrueNegatives",
                  "TruePositives")
ALIASES = {"mse": "MeanSquaredError", "mae": "MeanAbsoluteError", "mape": "MeanAbsolutePercentageError",
           "msle": "MeanSquaredLogarithmicError", "kld": "KLDivergence", "bce": "BinaryCrossentropy",
           "rmse": "RootMeanSquaredError"}
# Keras' fit reads "accuracy" by the loss; this config's recipes train on integer labels (a sparse loss)
ACCURACY = {"accuracy": "SparseCategoricalAccuracy", "acc": "SparseCategoricalAccuracy",
            "sparse_accuracy": "SparseCategoricalAccuracy"}


def _squeezed(name: str) -> str:
    return name.replace("_", "").lower()


TAKE_FROM_LOGITS = {"BinaryCrossentropy", "BinaryFocalCrossentropy", "CategoricalCrossentropy",
                    "CategoricalFocalCrossentropy", "SparseCategoricalCrossentropy", "CTC"}


def keras_class(name: str, module: str) -> Optional[str]:
    """The class of keras.<module> that Keras' shorthand `name` (categorical_crossentropy, mse, accuracy) names."""
    if module == "metrics" and name.lower() in ACCURACY:
        return ACCURACY[name.lower()]
    classes = LOSS_CLASSES if module == "losses" else METRIC_CLASSES
    found = ALIASES.get(name.lower()) or next((c for c in classes if _squeezed(c) == _squeezed(name)), None)
    return found if found in classes else None


def _meant(name: str, classes) -> Optional[str]:
    by_key = {_squeezed(c): c for c in classes}
    close = difflib.get_close_matches(_squeezed(name), list(by_key), n=1, cutoff=0.7)
    return by_key[close[0]] if close else None


def _loss_fix(name: str) -> str:
    cls = keras_class(name, "losses")
    if cls is None:
        meant = _meant(name, LOSS_CLASSES)
        hint = f" (did you mean keras.losses.{meant}?)" if meant else ""
        return (f"No Keras loss is called {name!r}{hint}. Fix: loss._target_=keras.losses.<Class> "
                f"(e.g. keras.losses.{meant or 'SparseCategoricalCrossentropy'}; python -m trainer --cfg job shows "
                "the recipe's loss)")
    if cls not in TAKE_FROM_LOGITS:
        return (f"Fix: loss._target_=keras.losses.{cls} ~loss.from_logits ({cls} takes no from_logits, which the "
                "classification recipes set; drop `~loss.from_logits` if yours has none: python -m trainer --cfg job "
                "shows the loss)")
    return (f"Fix: loss._target_=keras.losses.{cls} (the recipe's other loss.* keys, such as from_logits, stay; "
            "python -m trainer --cfg job shows them)")


def _metric_fix(names: List[Any]) -> str:
    fixes, unknown = [], []
    for name in names:
        cls = keras_class(str(name), "metrics")
        if cls is None:
            unknown.append(str(name))
            continue
        fixes.append(f"'++metrics.{name}._target_=keras.metrics.{cls}'")
    text = f"Fix: {' '.join(fixes)}" if fixes else "Fix: '++metrics.NAME._target_=keras.metrics.<Class>'"
    if unknown:
        meant = [m for m in (_meant(n, METRIC_CLASSES) for n in unknown) if m]
        text += (f" ({', '.join(map(repr, unknown))}: no Keras metric of that name"
                 + (f"; did you mean {', '.join(f'keras.metrics.{m}' for m in meant)}?)" if meant else ")"))
    return text + "; the key is the name it is logged under (++: adds it, or replaces the recipe's)"


def shorthand_problem(override) -> Optional[str]:
    """`loss=NAME`, `metrics=[NAMES]` or `metrics=NAME` (Keras' compile() forms), as one line with the override
    that works; None for anything else (a node, null, a `_target_` override)."""
    key, given = override.key_or_group, override.input_line
    if override.is_delete() or (override.is_sweep_override() and not override.is_choice_sweep()):
        return None
    for value in (override.value().list if override.is_choice_sweep() else [override.value()]):  # loss=mse,mae
        if key == "loss" and isinstance(value, str):
            return (f"{given}: loss is a node naming a class (loss._target_=keras.losses.<Class>, its arguments as "
                    f"loss.KEY=VALUE), not Keras' string shorthand. {_loss_fix(value)}.")
        if key == "metrics" and isinstance(value, (str, list)):
            names = value if isinstance(value, list) else [value]
            return (f"{given}: metrics is a dict, name -> a node naming a class (metrics.accuracy._target_="
                    f"keras.metrics.SparseCategoricalAccuracy), not Keras' list of names. {_metric_fix(names)}.")
    return None


def check_targets(cfg) -> None:
    """Each `_target_` of cfg.loss and cfg.metrics names a class (or function), and every other key of its node is
    an argument it takes: else a ConfigError naming the one meant (keras.losses.SparseCategoricalCrossEntropy:
    ...Crossentropy), where Hydra said "Error locating target" or the constructor's TypeError was a traceback."""
    from omegaconf import DictConfig

    nodes = [("loss", cfg.get("loss"))]
    metrics = cfg.get("metrics")
    if isinstance(metrics, DictConfig):
        nodes += [(f"metrics.{name}", node) for name, node in metrics.items()]
    for where, node in nodes:
        if isinstance(node, DictConfig) and isinstance(node.get("_target_"), str):
            _check_node(where, node)


def _import_failed(where: str, target: str, module_name: str, exc: Exception) -> str:
    """Why `module_name` did not import, with its own error: a module of the user's that is there but fails on a
    dependency of its own (or a bug) was reported as "no module", hiding the import that failed."""
    missing = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if missing and (module_name == missing or module_name.startswith(missing + ".")):  # the module named is absent
        return (f"{where}._target_={target}: no module {module_name!r} can be imported ({exc}). Fix: the full path "
                f"of a class, e.g. {where}._target_=keras.losses.SparseCategoricalCrossentropy")
    return (f"{where}._target_={target}: importing {module_name!r} failed: {type(exc).__name__}: {exc}. Fix: that "
            f"error, in {module_name} or what it imports (e.g. install the missing package).")


def _check_node(where: str, node) -> None:
    import importlib

    from hydra._internal.utils import _locate  # hydra.utils.get_object logs an ERROR of its own first

    from trainer.config import ConfigError

    target = node._target_
    try:
        found = _locate(target)
    except Exception:  # noqa: BLE001 - Hydra's ImportError: say which name is wrong and the one meant
        module_name, _, name = target.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - the module is not there, or fails as it is imported
            raise ConfigError(_import_failed(where, target, module_name, exc)) from None
        names = [n for n in dir(module) if not n.startswith("_") and n[:1].isupper() == name[:1].isupper()]
        meant = _meant(name, names)
        hint = f" (did you mean {module_name}.{meant}?)" if meant else ""
        raise ConfigError(f"{where}._target_={target}: {module_name} has no {name!r}{hint}. Fix: "
                          f"{where}._target_={module_name}.{meant or '<one of its classes>'}.") from None
    _check_arguments(where, node, found)


def _check_arguments(where: str, node, found) -> None:
    from trainer.config import ConfigError

    try:
        parameters = inspect.signature(found).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    takes = [p.name for p in parameters]
    extra = [str(k) for k in node if not str(k).startswith("_") and str(k) not in takes]
    if extra:
        name = getattr(found, "__name__", node._target_)
        raise ConfigError(f"{where}._target_={node._target_}: {name} takes no argument {extra[0]!r} (the config "
                          f"gives {where}.{extra[0]}, kept from the recipe's {where}; {name} takes "
                          f"{', '.join(t for t in takes if t != 'self')}). Fix: ~{where}.{extra[0]} on the "
                          "command line, or a class that takes it.")
