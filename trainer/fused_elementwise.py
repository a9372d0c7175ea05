"""GELU and LayerNormalization as one XLA kernel each way, for Keras layers as they are.

Keras 3 computes `gelu` and `LayerNormalization` as chains of elementwise TensorFlow ops: the tanh GELU is
eight ops forward and more backward, each a pass over memory, and under mixed_bfloat16 each converts
bfloat16 to float32 and back. In the Transformer recipe's step on an AMX CPU these chains took longer than
the matmuls AMX sped up (docs/benchmarks.md). Here each direction is one `tf.function(jit_compile=True)`
(XLA fuses the chain into one loop over the data, in float32 registers) joined by `tf.custom_gradient`; the
rest of the step stays TensorFlow's graph, so oneDNN keeps the matmuls. Results equal Keras' in float32 up
to the order of sums; under bfloat16 they are rounded once instead of after each op.

Only where a gradient tape records (a train step; also the first forward pass of a block that
trainer.recompute recomputes, which runs with recording paused): without one (evaluation, predict, export)
Keras' own ops run, so inference results are Keras' exactly and exported graphs hold no XLA call (tf2onnx
cannot convert one). The choice is made when a function is traced: a `tf.function` first traced under a tape
keeps the fused graph. Each kernel is traced and compiled once per input shape (the Transformer recipe's
bucket lengths).

`fuse_elementwise(model)` swaps them into a built model in place, keeping its weights and config (a
keras-hub encoder builds its sublayers itself: this is how such a model gets them). Called on a Trainer's
model after the Trainer traced its step, the Trainer traces again before its next step (model_edits.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading

import keras
import tensorflow as tf
from tensorflow.python.eager import record  # TensorFlow's own "does a tape record?" (no public API has it)

from trainer import model_edits

log = logging.getLogger(__name__)

_TANH_SCALE = math.sqrt(2.0 / math.pi)  # the tanh approximation's sqrt(2 / pi)
_CUBIC = 0.044715
_FUSED_DTYPES = (tf.float32, tf.bfloat16, tf.float16)
_backward = threading.local()  # set while a forward pass runs whose backward pass comes later (recompute)


@contextlib.contextmanager
def backward_follows():
    """Within it the fused kernels run although no tape records: trainer.recompute's first forward pass,
    which tf.recompute_grad runs with recording paused, so that it computes what the recomputation does."""
    outer = getattr(_backward, "follows", False)
    _backward.follows = True
    try:
        yield
    finally:
        _backward.follows = outer


def _gradients_follow() -> bool:
    return record.could_possibly_record() or getattr(_backward, "follows", False)


def _fused_input(x) -> bool:
    """A dense tensor of a dtype the kernels take, in a pass whose gradients are wanted."""
    return isinstance(x, tf.Tensor) and x.dtype in _FUSED_DTYPES and _gradients_follow()


def _gelu_kernels(approximate: bool):
    """Forward and backward GELU, each one XLA kernel computing in float32."""

    @tf.function(jit_compile=True, autograph=False)
    def forward(x):
        xf = tf.cast(x, tf.float32)
        if approximate:
            y = 0.5 * xf * (1.0 + tf.tanh(_TANH_SCALE * (xf + _CUBIC * xf * xf * xf)))
        else:
            y = 0.5 * xf * (1.0 + tf.math.erf(xf * math.sqrt(0.5)))
        return tf.cast(y, x.dtype)

    @tf.function(jit_compile=True, autograph=False)
    def backward(x, dy):
        xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
        if approximate:
            t = tf.tanh(_TANH_SCALE * (xf + _CUBIC * xf * xf * xf))
            slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _TANH_SCALE * (1.0 + 3.0 * _CUBIC * xf * xf)
        else:
            density = tf.exp(-0.5 * xf * xf) / math.sqrt(2 * math.pi)
            slope = 0.5 * (1.0 + tf.math.erf(xf * math.sqrt(0.5))) + xf * density
        return tf.cast(dyf * slope, x.dtype)

    @tf.custom_gradient
    def gelu(x):
        return forward(x), lambda dy: backward(x, dy)

    return gelu


_GELU = {True: _gelu_kernels(True), False: _gelu_kernels(False)}


@keras.saving.register_keras_serializable(package="trainer")
def gelu(x, approximate=False):
    """`keras.activations.gelu` (same values and gradients), one XLA kernel each way where a tape records."""
    if not _fused_input(x):  # no gradients wanted, a ragged or sparse tensor, float64
        return keras.activations.gelu(x, approximate=approximate)
    return _GELU[bool(approximate)](x)


@keras.saving.register_keras_serializable(package="trainer")
def gelu_approximate(x):
    """The tanh approximation of GELU (keras-hub's BERT activation), fused as `gelu`."""
    return gelu(x, approximate=True)


@tf.function(jit_compile=True, autograph=False)
def _layer_norm_forward(x, gamma, beta, epsilon):
    xf = tf.cast(x, tf.float32)
    mean, variance = tf.nn.moments(xf, axes=[-1], keepdims=True)
    inv = tf.math.rsqrt(variance + epsilon) * gamma
    return tf.cast(xf * inv + (beta - mean * inv), x.dtype)


@tf.function(jit_compile=True, autograph=False)
def _layer_norm_backward(x, gamma, dy, epsilon):
    xf, dyf = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
    mean, variance = tf.nn.moments(xf, axes=[-1], keepdims=True)
    inv = tf.math.rsqrt(variance + epsilon)
    normalized = (xf - mean) * inv
    scaled = dyf * gamma
    dx = inv * (
        scaled
        - tf.reduce_mean(scaled, axis=-1, keepdims=True)
        - normalized * tf.reduce_mean(scaled * normalized, axis=-1, keepdims=True)
    )
    rows = [-1, tf.shape(x)[-1]]  # sums over every axis but the last, whatever the rank
    dgamma = tf.reduce_sum(tf.reshape(dyf * normalized, rows), 0)
    return tf.cast(dx, x.dtype), dgamma, tf.reduce_sum(tf.reshape(dyf, rows), 0)


@tf.custom_gradient
def _layer_norm(x, gamma, beta, epsilon):
    def grad(dy):
        dx, dgamma, dbeta = _layer_norm_backward(x, gamma, dy, epsilon)
        return dx, dgamma, dbeta, None

    return _layer_norm_forward(x, gamma, beta, epsilon), grad


@keras.saving.register_keras_serializable(package="trainer")
class LayerNormalization(keras.layers.LayerNormalization):
    """`keras.layers.LayerNormalization` over the last axis, one XLA kernel each way.

    Same weights, config and results as Keras' layer (which computes in float32 too); a `.keras` file names
    this class: load it after `import trainer.fused_elementwise`. Keras' own computation is used without a
    recording tape, for other axes, `rms_scaling`, and float64."""

    def call(self, inputs):
        if not _fused_input(inputs):
            return super().call(inputs)
        if not self._fusable(inputs):
            self._say_once_why_not_fused(inputs)
            return super().call(inputs)
        width = inputs.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([width], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([width], tf.float32)
        epsilon = tf.constant(self.epsilon, tf.float32)
        return tf.cast(_layer_norm(inputs, gamma, beta, epsilon), self.compute_dtype)

    def _fusable(self, inputs) -> bool:
        """Over the last axis only (of a known size), without rms_scaling."""
        rank = len(inputs.shape)
        axes = _axes(self)
        last_only = rank >= 2 and [a % rank for a in axes] == [rank - 1]
        return last_only and inputs.shape[-1] is not None and not self.rms_scaling


    def _say_once_why_not_fused(self, inputs) -> None:
        """A user who fused the layer for speed learns that this one got none (logged once per layer)."""
        if getattr(self, "_said_why_not_fused", False):
            return
        self._said_why_not_fused = True
        rank = len(inputs.shape)
        why = ("rms_scaling=True" if self.rms_scaling else
               f"a {rank}-D input" if rank < 2 else
               f"an input of unknown width {inputs.shape}" if inputs.shape[-1] is None else
               f"axis={self.axis}, not only the last axis of a {rank}-D input")
        log.info("LayerNormalization %r computes as Keras' layer, not fused, because of %s", self.name, why)


def _axes(layer) -> list:
    """The layer's axes as a list: Keras keeps an int until the layer is built, a list after."""
    return [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)


def _may_fuse(layer) -> bool:
    """An exact Keras LayerNormalization over one axis, without rms_scaling (the rank is checked per call)."""
    if type(layer) is not keras.layers.LayerNormalization:
        return False
    axes = _axes(layer)
    return len(axes) == 1 and not layer.rms_scaling


def _fused_activation(activation):
    """The fused twin of a Keras or keras-hub GELU activation, or None for anything else."""
    if activation is keras.activations.gelu:
        return gelu
    hub = sys.modules.get("keras_hub.src.utils.keras_utils")
    if hub is not None and activation is getattr(hub, "gelu_approximate", None):
        return gelu_approximate
    return None


def fuse_elementwise(model) -> dict:
    """Swaps the fused LayerNormalization and GELU into a built model, in place; returns what it swapped.

    Best before the first train step. A Trainer that traced its step already traces it again before its next
    step (model_edits.py); Keras' `model.fit` on this model too (its train function is made again); a
    `tf.function` of your own traced before keeps Keras' ops until it is traced again. Every layer that is exactly
    `keras.layers.LayerNormalization` over one axis without rms_scaling becomes this module's (same object,
    same weights; an axis other than the last computes as Keras does); every Dense and EinsumDense layer
    whose `activation` is Keras' `gelu` or keras-hub's `gelu_approximate` gets the fused one (a layer that
    only passes its activation on to the sublayers it builds, as keras-hub's TransformerEncoder does, keeps
    it: its config stays Keras'). Subclasses of LayerNormalization and other activations are left alone."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"fuse_elementwise takes a Keras model or layer, got {type(model).__name__}: call it on the "
                        "model your builder returns, before the first train step")
    swapped, changed = {"LayerNormalization": 0, "gelu": 0}, []
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if _may_fuse(layer):
            layer.__class__ = LayerNormalization
            swapped["LayerNormalization"] += 1
            changed.append(layer)
        applies_activation = isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
        fused = _fused_activation(layer.activation) if applies_activation else None
        if fused is not None:
            layer.activation = fused
            swapped["gelu"] += 1
            changed.append(layer)
    model_edits.record(changed, by="fuse_elementwise")  # a Trainer that traced its step traces it again
    if changed and getattr(model, "train_function", None) is not None:  # Keras' model.fit ran: it keeps its own
        model.make_train_function(force=True)  # Keras' way to trace again (its docs, after changing `trainable`)
        log.info("fuse_elementwise: Keras' model.fit train function of %r is made again, with the fused layers",
                 model.name)
    return swapped
