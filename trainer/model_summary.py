"""The per-layer model summary: `model_summary.txt` in the run folder, and a one-line total in the log.

Keras' `model.summary()` has no dtype column; under mixed precision that is the column one needs (a layer
that computes in float16 where it should not, a variable that is not float32). Each row: the layer's path,
its class, output shape, parameters, the dtype it computes in (its dtype policy's) and the dtype of its
variables (the variables themselves, not the policy). A nested model (a Sequential inside, the float32-output
wrapper around the user's model) is expanded, its layers named `outer/inner`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Mapping, Sequence, Tuple

import keras
import numpy as np

from trainer.float32_outputs import Float32Outputs

FILE = "model_summary.txt"
HEADER = ("layer", "class", "output shape", "params", "compute dtype", "variable dtype")


def _output_shape(layer) -> str:
    """The output shape when Keras knows it (a functional/Sequential graph); `?` for a subclassed model's
    layer, as Keras' own summary prints."""
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return "?"
    shapes = [tuple(t.shape) for t in keras.tree.flatten(output)]
    text = ", ".join(str(s).replace("None", "batch") for s in shapes)
    return text if len(shapes) == 1 else f"[{text}]"


def _params(layer) -> int:
    return sum(int(np.prod(w.shape)) for w in layer.weights)


def _children(model) -> list:
    """A model's layers as Keras lists them; the float32-output wrapper's own two (its `layers` are the user's)."""
    return model.wrapper_layers if isinstance(model, Float32Outputs) else model.layers


def rows(model, prefix: str = "") -> List[Tuple[str, ...]]:
    """One row per layer, a nested model's layers in its place."""
    found = []
    for layer in _children(model):
        name = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model) and layer.layers:
            found += rows(layer, f"{name}/")
            continue
        variables = sorted({str(keras.backend.standardize_dtype(w.dtype)) for w in layer.weights})
        found.append((name, type(layer).__name__, _output_shape(layer), f"{_params(layer):,}",
                      str(layer.dtype_policy.compute_dtype), ", ".join(variables) or "-"))
    return found


def table(model) -> str:
    """The model's rows as aligned text, with its totals."""
    lines = [HEADER, *rows(model)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*text, "", total_line(model)])


def total_line(model) -> str:
    """`269,322 parameters (269,322 trainable), computes in float16, variables float32`: the log's line."""
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    computes = (sorted({str(layer.dtype_policy.compute_dtype) for layer in _leaves(model)})
                or [str(model.dtype_policy.compute_dtype)])
    variables = sorted({str(keras.backend.standardize_dtype(w.dtype)) for w in model.weights}) or ["-"]
    return (f"{model.count_params():,} parameters ({trainable:,} trainable), computes in {', '.join(computes)}, "
            f"variables {', '.join(variables)}")


def _leaves(model) -> Iterable:
    for layer in _children(model):
        if isinstance(layer, keras.Model) and layer.layers:
            yield from _leaves(layer)
        else:
            yield layer


def write(path: Path, models: Mapping[str, keras.Model], frozen: Sequence[str] = ()) -> None:
    """Writes every model's table to `path` (a section per model; a frozen model is marked)."""
    sections = []
    for name, model in models.items():
        frozen_note = " - frozen: not trained, not checkpointed" if name in frozen else ""
        title = f"Model {name!r} ({model.name})" + frozen_note
        sections.append(f"{title}\n\n{table(model)}\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text("\n".join(sections))
    tmp.replace(path)
