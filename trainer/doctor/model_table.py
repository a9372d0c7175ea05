"""Section 2, the model under the candidate policy: per layer its compute, variable and output dtypes,
whether it is kept in float32 and why, and the dimensions that are not multiples of 8 with the nearest
fix (precision.dims_not_multiple_of_8); and whether the model's outputs are float32."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from trainer.layer_probe import LayerProbe, output_layers
from trainer.precision import OUTPUT_PAD_NOTE, dims_not_multiple_of_8, is_small_output, keep_layers_in_float32, \
    set_policy

# Layers whose compute dtype follows the policy but whose statistics Keras computes in float32 anyway.
FLOAT32_INSIDE = {
    "BatchNormalization": "Keras computes its mean and variance in float32",
    "GroupNormalization": "Keras computes its statistics in float32",
    "LayerNormalization": "Keras computes its statistics in float32",
}


@contextlib.contextmanager
def same_auto_names():
    """Keras' counters of automatic layer names ("dense", "dense_1", ...) are put back after the block, so
    every copy the doctor builds names its layers alike (keras.src internals; a no-op if they move)."""
    try:
        from keras.src.backend.common import global_state
    except ImportError:
        yield
        return
    before = dict(global_state.get_global_attribute("object_name_uids", default={}) or {})
    try:
        yield
    finally:
        counters = global_state.get_global_attribute("object_name_uids")
        if counters is not None:
            counters.clear()
            counters.update(before)


def build_under(builder: Callable[[], keras.Model], policy: str, sample_x, *, weights: Optional[list] = None,
                float32_layers: Sequence[str] = (), seed: int = 0) -> keras.Model:
    """A model from `builder` computing in `policy` (its variables are float32 under every policy), built
    on `sample_x`, with `weights` copied in, and precision.float32_layers applied as the Trainer does. The
    global policy is float32 again on return. The seed makes dropout draw the same masks in each copy."""
    set_policy(policy)
    try:
        with same_auto_names():
            keras.utils.set_random_seed(seed)
            model = builder()
            model(sample_x, training=False)
    finally:
        set_policy("float32")
    if weights is not None:
        model.set_weights(weights)
    quiet = logging.getLogger("trainer.precision")
    level, quiet.level = quiet.level, logging.ERROR  # the table reports it
    try:
        keep_layers_in_float32(model, float32_layers)
    finally:
        quiet.setLevel(level)
    return model


def _dtype_names(outputs) -> List[str]:
    return sorted({t.dtype.name for t in tf.nest.flatten(outputs) if hasattr(t, "dtype")})


def _float32_reason(layer, policy: str, float32_layers: Sequence[str], heads: set) -> str:
    if policy == "float32":
        return ""
    if layer.compute_dtype == "float32":
        if type(layer).__name__ in float32_layers:
            return f"precision.float32_layers has {type(layer).__name__}"
        if id(layer) in heads:
            return "model output: its dtype is float32 (the mixed-precision guide's rule)"
        if getattr(layer, "activation", None) is keras.activations.softmax or type(layer).__name__ == "Softmax":
            return "softmax, set to dtype float32 in the model"
        return "set to dtype float32 in the model"
    return FLOAT32_INSIDE.get(type(layer).__name__, "")


def _advice(layer, policy: str) -> str:
    reduced = policy != "float32" and layer.compute_dtype != "float32"
    if reduced and (getattr(layer, "activation", None) is keras.activations.softmax
                    or type(layer).__name__ == "Softmax"):
        return f"softmax computed in {layer.compute_dtype}"
    return ""


def model_section(builder: Callable[[], keras.Model], policy: str, sample_x, per_replica_batch: int, *,
                  weights: Optional[list] = None, float32_layers: Sequence[str] = ()) -> dict:
    """The per-layer table of the model under `policy` (see the module docstring)."""
    model = build_under(builder, policy, sample_x, weights=weights, float32_layers=float32_layers)
    output_dtypes: Dict[str, List[str]] = {}

    def on_output(name, layer, outputs):
        output_dtypes.setdefault(name, _dtype_names(outputs))

    with LayerProbe(model, on_output, record_calls=True) as probe:
        outputs = model(sample_x, training=False)
    heads = output_layers(probe.calls, outputs)  # as the Trainer's tip finds them
    x8 = {}
    for layer, attr, value in dims_not_multiple_of_8(model):
        x8.setdefault(probe.names[id(layer)], []).append((layer, attr, value))
    rows, fixes = [], []
    called_order = list(output_dtypes)  # the order the layers ran in (Keras lists nested layers otherwise)
    by_call = sorted(probe.layers, key=lambda layer: called_order.index(probe.names[id(layer)])
                     if probe.names[id(layer)] in called_order else len(called_order))
    for layer in by_call:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        name = probe.names[id(layer)]
        row = {"name": name, "class": type(layer).__name__, "compute_dtype": layer.compute_dtype,
               "variable_dtype": layer.variable_dtype if layer.weights else "-",
               "output_dtype": ",".join(output_dtypes.get(name, [])) or "-",
               "float32_reason": _float32_reason(layer, policy, float32_layers, heads),
               "output_layer": id(layer) in heads, "not_multiple_of_8": [], "advice": _advice(layer, policy)}
        for _, attr, value in x8.get(name, []):
            if is_small_output(layer, value, heads):
                row["not_multiple_of_8"].append(f"{attr}={value}: fine, an output layer's size is the task's")
                continue
            fix = -(-value // 8) * 8
            note = OUTPUT_PAD_NOTE if id(layer) in heads else ""
            row["not_multiple_of_8"].append(f"{attr}={value} -> {fix}" + (f" ({note})" if note else ""))
            fixes.append({"layer": name, "class": row["class"], "attribute": attr, "value": value, "fix": fix,
                          "note": note})
        rows.append(row)
    batch_fix = None
    if per_replica_batch % 8:
        batch_fix = {"per_replica_batch": per_replica_batch, "fix": -(-per_replica_batch // 8) * 8}
    outputs_float32 = _dtype_names(outputs) == ["float32"]
    return {"policy": policy, "layers": rows, "multiple_of_8_fixes": fixes, "batch_fix": batch_fix,
            "outputs_dtype": _dtype_names(outputs), "outputs_float32": outputs_float32,
            "outputs_note": "" if outputs_float32 else (
                "the outputs are not float32: the Trainer appends a float32 activation (or give the last layer "
                "dtype='float32'; precision.strict_outputs=true refuses instead)")}
