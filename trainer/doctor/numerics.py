"""Section 3, numerics on a few real batches, against a float32 reference run of the same weights.

float16 (max 65504, smallest subnormal 2^-24 ~ 5.96e-8; smaller magnitudes flush to zero):
  * overflow: per layer the largest activation magnitude over the batches, and its headroom 65504 / max;
  * underflow: the fraction of nonzero gradient values (of the weights, and of the layers' outputs) whose
    magnitude times the loss scale is below 2^-24, without scaling and with the chosen scale;
  * the chosen scale: the largest power of two that keeps the largest scaled gradient HEADROOM times
    below 65504 (dynamic scaling settles near there);
  * the same batch run under mixed_float16 at that scale: finite or not, and its error against float32.
bfloat16 (float32's range, 8 significant bits): the relative error of the loss and of the gradients
when the same batch runs under mixed_bfloat16 with the same weights.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from trainer.doctor.model_table import build_under
from trainer.layer_probe import LayerProbe, layer_names, model_layers
from trainer.loss_scale import LossScale

FLOAT16_MAX = 65504.0
FLOAT16_TINIEST = 2.0**-24  # float16's smallest subnormal: a smaller magnitude is (at best) rounded to 0
SCALES = [2.0**k for k in range(0, 25)]
HEADROOM = 8.0  # the chosen scale keeps the largest scaled gradient 8x (3 doublings) below float16's max
UNDERFLOW_LIMIT = 0.01  # at most 1% of the nonzero gradient values may flush to zero at the chosen scale
# Relative errors against float32 a precision may have. The gradients' limit is loose: bfloat16 keeps 8
# significant bits, and through BatchNormalization's reductions a ResNet-20's gradient differs by ~0.2
# (a cosine of ~0.98) at initialization, far less than the gradients of two minibatches differ.
ERROR_LIMITS = {"loss": 0.01, "gradients": 0.3}


def _mean_loss(loss_fn, batch, model, training: bool) -> tf.Tensor:
    x, y, weight = keras.utils.unpack_x_y_sample_weight(batch)
    per_example = tf.cast(loss_fn(y, model(x, training=training)), tf.float32)
    if weight is not None:
        per_example = per_example * tf.cast(weight, tf.float32)
    return tf.reduce_mean(per_example)


class _Counts:
    """Magnitudes of gradient values, kept as counts below each scale's flush threshold."""

    def __init__(self):
        self.nonzero, self.largest = 0, 0.0
        self.below = np.zeros(len(SCALES), dtype=np.int64)

    def add(self, values) -> None:
        if isinstance(values, tf.IndexedSlices):  # an embedding's gradient: the rows the batch touched
            values = values.values
        magnitudes = np.abs(np.asarray(values, dtype=np.float64)).ravel()
        magnitudes = magnitudes[magnitudes > 0]
        if magnitudes.size:
            self.nonzero += magnitudes.size
            self.largest = max(self.largest, float(magnitudes.max()))
            self.below += np.array([np.count_nonzero(magnitudes * s < FLOAT16_TINIEST) for s in SCALES])

    def flushed(self, scale: float) -> float:
        """The fraction of nonzero values that `scale` leaves below 2^-24 (0 when there are none)."""
        if not self.nonzero:
            return 0.0
        return float(self.below[SCALES.index(scale)]) / self.nonzero


def reference_pass(model: keras.Model, loss_fn, batches: Sequence) -> dict:
    """float32, training mode, eager: per layer the largest |activation| and |gradient of the loss with
    respect to it| (None when the loss does not depend on it), and the counts of weight and activation
    gradient magnitudes. The outputs are watched: a layer with no weights upstream (a Rescaling of the
    inputs) still gets its gradient."""
    layers: Dict[str, dict] = {}
    weight_grads, activation_grads = _Counts(), _Counts()
    for batch in batches:
        recorded: List[tuple] = []

        def on_output(name, layer, outputs):
            floats = [t for t in tf.nest.flatten(outputs) if getattr(t, "dtype", tf.int32).is_floating]
            if floats:
                tape.watch(floats)
                recorded.append((name, layer, floats))

        with tf.GradientTape() as tape, LayerProbe(model, on_output):
            loss = _mean_loss(loss_fn, batch, model, training=True)
        variables = model.trainable_variables
        tensors = [t for _, _, ts in recorded for t in ts]
        grads = tape.gradient(loss, variables + tensors, unconnected_gradients=tf.UnconnectedGradients.NONE)
        for g in grads[: len(variables)]:
            if g is not None:
                weight_grads.add(g)
        activation_grad = iter(grads[len(variables):])
        for name, layer, floats in recorded:
            row = layers.setdefault(name, {"layer": name, "class": type(layer).__name__,
                                           "max_activation": 0.0, "max_gradient": None})
            for t in floats:
                row["max_activation"] = max(row["max_activation"], float(tf.reduce_max(tf.abs(t))))
                g = next(activation_grad)
                if g is not None:
                    activation_grads.add(g)
                    row["max_gradient"] = max(row["max_gradient"] or 0.0, float(tf.reduce_max(tf.abs(g))))
    return {"layers": layers, "weight_grads": weight_grads, "activation_grads": activation_grads}


def scale_fits(largest_gradient: float, scale: float) -> bool:
    return largest_gradient * scale * HEADROOM <= FLOAT16_MAX


def choose_scale(largest_gradient: float) -> float:
    """The largest power of two in SCALES with largest_gradient x scale x HEADROOM <= 65504; 1 when none
    fits (scale_fits then says so: a blocker for float16)."""
    fitting = [s for s in SCALES if scale_fits(largest_gradient, s)]
    return max(fitting) if fitting else 1.0


def _without_dropout(model: keras.Model) -> None:
    """Sets every dropout rate to 0 (Keras reads `rate` at call time): the policies' runs then compute the
    same function; a mask drawn in bfloat16 and one drawn in float32 differ where the draw is near the rate."""
    for layer in model_layers(model):
        if isinstance(getattr(layer, "rate", None), float):
            layer.rate = 0.0


def compare_pass(builder: Callable[[], keras.Model], policy: str, weights: list, batch, loss_fn,
                 float32_layers: Sequence[str], scale: float) -> dict:
    """The loss and unscaled gradients of one batch under `policy` at a fixed loss `scale` (1: none), in
    training mode (BatchNormalization on the batch's statistics, as in training) with dropout off, so every
    policy computes the same function; eagerly, float16 with XLA where it compiles (TensorFlow's float16 CPU
    kernels are very slow). The gradients come the way the Trainer's step takes them
    (`LossScale.unscaled_gradients`)."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    with warnings.catch_warnings():  # an overflowing float16 batch is what this pass looks for
        warnings.simplefilter("ignore", RuntimeWarning)
        model = build_under(builder, policy, x, weights=weights, float32_layers=float32_layers)
        _without_dropout(model)

        loss_scale = LossScale("fixed", initial_scale=scale)  # the Trainer's way to unscaled gradients

        def loss_and_grads(batch):
            with tf.GradientTape() as tape:
                loss = _mean_loss(loss_fn, batch, model, training=True)
            grads = loss_scale.unscaled_gradients(tape, loss, model.trainable_variables)
            return loss, [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
                          for g, v in zip(grads, model.trainable_variables)]

        loss, grads = None, None
        if policy == "mixed_float16":
            try:
                loss, grads = tf.function(loss_and_grads, jit_compile=True)(batch)
            except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, ValueError):
                pass  # a model XLA cannot compile: eagerly, slowly
        if loss is None:
            loss, grads = loss_and_grads(batch)
    compute = {names: layer.compute_dtype for names, layer in zip(layer_names(model).values(), model_layers(model))}
    return {"loss": float(loss), "grads": [g.numpy() for g in grads],
            "paths": [v.path for v in model.trainable_variables], "compute_dtypes": compute}


def relative_errors(reference: dict, other: dict) -> dict:
    """|loss - loss_32| / |loss_32|, ||g - g_32|| / ||g_32|| over all gradients, and the worst variable."""
    finite = math.isfinite(other["loss"]) and all(np.isfinite(g).all() for g in other["grads"])
    if not finite:
        return {"finite": False, "loss": math.inf, "gradients": math.inf, "worst_variable": None}
    loss_error = abs(other["loss"] - reference["loss"]) / max(abs(reference["loss"]), 1e-12)
    diff = math.sqrt(sum(float(np.sum((g - r) ** 2)) for g, r in zip(other["grads"], reference["grads"])))
    norm = math.sqrt(sum(float(np.sum(r**2)) for r in reference["grads"]))
    # The variable that contributes most to the error (not the largest relative error: a gradient that is
    # ~0 in float32, e.g. an attention key's bias, has a huge relative error and no effect).
    per_variable = [(float(np.linalg.norm(g - r)), float(np.linalg.norm(r)), path)
                    for g, r, path in zip(other["grads"], reference["grads"], reference["paths"])]
    error, size, path = max(per_variable) if per_variable else (0.0, 0.0, None)
    return {"finite": True, "loss": loss_error, "gradients": diff / max(norm, 1e-30),
            "worst_variable": {"path": path, "share_of_error": error / max(diff, 1e-30),
                               "relative_error": error / max(size, 1e-30)}}


def _float16_verdict(layers: List[dict], reference: dict, scale: float, errors: dict, kept_float32: set) -> dict:
    weight_grads, activation_grads = reference["weight_grads"], reference["activation_grads"]
    overflowing = [r for r in layers if r["max_activation"] >= FLOAT16_MAX and r["layer"] not in kept_float32]
    scaled_overflow = [r for r in layers
                       if (r["max_gradient"] or 0.0) * scale >= FLOAT16_MAX and r["layer"] not in kept_float32]
    underflow = max(weight_grads.flushed(scale), activation_grads.flushed(scale))
    largest = max(weight_grads.largest, activation_grads.largest)
    blockers = []
    if not scale_fits(largest, scale):
        blockers.append(f"no loss scale keeps the largest gradient ({largest:.3g}) in range ({HEADROOM:g}x below "
                        f"{FLOAT16_MAX:g}): float16 would overflow")
    if overflowing:
        blockers.append("activations overflow float16 in "
                        + ", ".join(f"{r['layer']} ({r['class']}, max {r['max_activation']:.3g})"
                                    for r in overflowing))
    if scaled_overflow:
        blockers.append(f"gradients overflow float16 at scale {scale:g} in "
                        + ", ".join(r["layer"] for r in scaled_overflow))
    if weight_grads.largest * scale >= FLOAT16_MAX:
        blockers.append(f"weight gradients overflow float16 at scale {scale:g} (largest {weight_grads.largest:.3g})")
    if underflow > UNDERFLOW_LIMIT:
        blockers.append(f"{underflow:.1%} of the gradient values flush to zero at scale {scale:g} "
                        f"(limit {UNDERFLOW_LIMIT:.0%})")
    if not errors["finite"]:
        blockers.append(f"the batch under mixed_float16 at scale {scale:g} gave inf/NaN")
    elif errors["gradients"] > ERROR_LIMITS["gradients"] or errors["loss"] > ERROR_LIMITS["loss"]:
        blockers.append(f"error against float32: loss {errors['loss']:.2g}, gradients {errors['gradients']:.2g} "
                        f"(limits {ERROR_LIMITS['loss']}, {ERROR_LIMITS['gradients']})")
    classes = sorted({r["class"] for r in overflowing})
    return {
        "loss_scale": scale, "scale_fits": scale_fits(largest, scale),
        "underflow": {"weight_gradients": {"unscaled": weight_grads.flushed(1.0),
                                           "at_scale": weight_grads.flushed(scale)},
                      "activation_gradients": {"unscaled": activation_grads.flushed(1.0),
                                               "at_scale": activation_grads.flushed(scale)}},
        "underflow_by_scale": [{"scale": s, "weight_gradients": weight_grads.flushed(s),
                                "activation_gradients": activation_grads.flushed(s)} for s in SCALES],
        "largest_gradient": largest,
        "overflowing_layers": [r["layer"] for r in overflowing],
        "float32_layers_override": f"precision.float32_layers=[{','.join(classes)}]" if classes else None,
        "error_vs_float32": errors, "blockers": blockers, "safe": not blockers,
    }


def numerics_section(builder: Callable[[], keras.Model], loss_fn, batches: Sequence, *, weights: Optional[list] = None,
                     float32_layers: Sequence[str] = (), progress: Callable[[str], None] = print) -> dict:
    """The numerics of `builder`'s model on `batches` (see the module docstring)."""
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batches[0])
    model = build_under(builder, "float32", x, weights=weights)
    weights = model.get_weights()  # before the training-mode passes move BatchNorm's statistics
    progress(f"numerics: float32 reference on {len(batches)} batch(es), every layer's activations and gradients")
    reference = reference_pass(model, loss_fn, batches)
    largest = max(reference["weight_grads"].largest, reference["activation_grads"].largest)
    scale = choose_scale(largest)
    progress("numerics: the first batch under float32, mixed_float16 and mixed_bfloat16 (same weights)")
    base = compare_pass(builder, "float32", weights, batches[0], loss_fn, float32_layers, 1.0)
    half = compare_pass(builder, "mixed_float16", weights, batches[0], loss_fn, float32_layers, scale)
    brain = compare_pass(builder, "mixed_bfloat16", weights, batches[0], loss_fn, float32_layers, 1.0)
    layers = []
    for row in reference["layers"].values():
        layers.append({**row, "headroom": FLOAT16_MAX / row["max_activation"] if row["max_activation"] else math.inf,
                       "float16_compute": half["compute_dtypes"].get(row["layer"], "float16")})
    kept = {name for name, dtype in half["compute_dtypes"].items() if dtype == "float32"}
    bf16_errors = relative_errors(base, brain)
    bf16_blockers = [] if bf16_errors["finite"] else ["the batch under mixed_bfloat16 gave inf/NaN"]
    if bf16_errors["finite"] and (bf16_errors["loss"] > ERROR_LIMITS["loss"]
                                  or bf16_errors["gradients"] > ERROR_LIMITS["gradients"]):
        bf16_blockers.append(f"error against float32: loss {bf16_errors['loss']:.2g}, gradients "
                             f"{bf16_errors['gradients']:.2g} (limits {ERROR_LIMITS['loss']}, "
                             f"{ERROR_LIMITS['gradients']})")
    return {
        "batches": len(batches), "float16_max": FLOAT16_MAX, "float16_smallest_subnormal": FLOAT16_TINIEST,
        "limits": {"underflow": UNDERFLOW_LIMIT, "headroom_of_chosen_scale": HEADROOM, **ERROR_LIMITS},
        "reference_loss": base["loss"], "layers": layers,
        "float16": _float16_verdict(layers, reference, scale, relative_errors(base, half), kept),
        "bfloat16": {"error_vs_float32": bf16_errors, "blockers": bf16_blockers, "safe": not bf16_blockers},
    }
