"""A loss or metrics per output (Keras' compile(loss={'cls': ..., 'reg': ...}), metrics={'cls': ['accuracy']}, or a
Keras metric given a model's dict outputs): the Trainer gives its loss and each metric all the labels and outputs,
so these are a PerOutputError whose fix reads the model's own outputs by their keys (y['cls'] for dict outputs,
y[0] for a list of them).
"""
from __future__ import annotations

from typing import Any, List, Mapping

from trainer.config import ConfigError


def indexes(value) -> List[Any]:
    """Up to two keys of a model's several outputs (or of a loss or metrics per output), as a fix reads them with
    y[...]: a dict's names, a list's positions."""
    keys = list(value.keys()) if isinstance(value, Mapping) or hasattr(value, "keys") else list(range(len(value)))
    return keys[:2] or ["a"]


def _kind(keys: List[Any]) -> str:
    return "lists" if isinstance(keys[0], int) else "dicts"


def per_output_loss_fix(keys: List[Any]) -> str:
    """The fix for a loss per output: one function of the label and output dicts (lists), with `keys` (indexes)."""
    terms = " + ".join(f"keras.losses.mean_squared_error(y[{k!r}], p[{k!r}])" for k in keys)
    return (f"Fix: one loss over the model's outputs, a function (y_true, y_pred) -> per-example loss that reads the "
            f"{_kind(keys)}, e.g. loss=lambda y, p: {terms}; or override compute_loss (or train_step), see "
            "docs/research.md")


def per_output_metrics_fix(keys: List[Any]) -> str:
    """The fix for metrics per output: a metric function of the label and output dicts (lists), named by its key."""
    k = keys[0]
    name = f"{k}_accuracy" if isinstance(k, str) else f"output_{k}_accuracy"
    return (f"Fix: a metric function of the label and output {_kind(keys)}, named by its key, e.g. metrics={{{name!r}: "
            f"lambda y, p: keras.metrics.sparse_categorical_accuracy(y[{k!r}], p[{k!r}])}} (docs/keras.md, A model "
            "with several outputs); or a Trainer subclass whose train_step and test_step update each metric on its "
            f"output, self.metrics[{name!r}].update_state(y[{k!r}], y_pred[{k!r}]) (docs/research.md)")


class PerOutputError(ConfigError):
    """A loss or metric that compares one output with its labels, given a model's several outputs (a dict, a list).
    Raised where the outputs are known: the model's first call, or a step's trace."""

    ag_pass_through = True  # raised while a step is traced: AutoGraph passes it on as it is, not in a StagingError


def structure(value) -> str:
    """The outputs (or labels) as an error shows them: a dict's keys, a list's length."""
    if isinstance(value, Mapping) or hasattr(value, "keys"):
        return f"a dict {sorted(value.keys())}"
    return f"a {type(value).__name__} of {len(value)}"
