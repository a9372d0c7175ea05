"""bench.py's workloads: each model's builder, its synthetic data and its analytic FLOPs, and the
precisions the matrix runs. bench_step.py and bench_jit_measure.py train the same models."""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from trainer.layers import BatchNormalization

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
SHORT = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}
POOL_BATCHES = 8  # distinct synthetic batches per data set (cycled)
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its batch, its synthetic data and its analytic multiply-accumulate count."""

    name: str
    batch: int
    build: Callable[[], keras.Model]  # builds under the current global dtype policy
    make_data: Callable[[np.random.Generator], Tuple[np.ndarray, np.ndarray]]  # POOL_BATCHES batches
    macs: int  # forward multiply-accumulates per example (matmul/conv only)
    first_layer_macs: int  # MACs of a first layer fed by the raw input: no input gradient
    formula: str
    description: str
    matmul_dims: Optional[Tuple[int, ...]] = None  # an MLP's layer widths: its matmul ceiling is measured

    @property
    def train_flops_per_example(self) -> int:
        return 2 * (3 * self.macs - self.first_layer_macs)


def _softmax_head(x, classes):
    """The guide's rule: the last activation in float32, so the loss is computed in float32."""
    x = keras.layers.Dense(classes, name="dense_logits")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)


def mlp_workload(units=4096, batch=512, in_dim=784, classes=10) -> Workload:
    """The mixed-precision guide's model: 784-4096-4096-10, softmax in float32."""

    def build():
        inputs = keras.Input((in_dim,), name="digits")
        x = keras.layers.Dense(units, activation="relu", name="dense_1")(inputs)
        x = keras.layers.Dense(units, activation="relu", name="dense_2")(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="mlp")

    def data(rng):
        x = rng.random((POOL_BATCHES, batch, in_dim), dtype=np.float32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    macs = in_dim * units + units * units + units * classes
    return Workload(
        "mlp", batch, build, data, macs, in_dim * units,
        f"MACs = {in_dim}*{units} + {units}*{units} + {units}*{classes}; first layer {in_dim}*{units}",
        f"MLP {in_dim}-{units}-{units}-{classes} (the TF mixed-precision guide's model), batch {batch}",
        (in_dim, units, units, classes),
    )


def resnet_workload(widths=(16, 32, 64), hw=32, batch=128, classes=10) -> Workload:
    """A small CIFAR-style ResNet: 3x3 stem, one basic block per stage (stride 2 after the first),
    1x1 projection shortcuts, BatchNorm (the recipes' fused one, trainer.layers), global average pooling."""

    def build():
        inputs = keras.Input((hw, hw, 3), name="images")

        def conv_bn(x, filters, kernel, stride):
            x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
            return BatchNormalization()(x)

        x = keras.layers.ReLU()(conv_bn(inputs, widths[0], 3, 1))
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            y = keras.layers.ReLU()(conv_bn(x, w, 3, stride))
            y = conv_bn(y, w, 3, 1)
            shortcut = x if stride == 1 and x.shape[-1] == w else conv_bn(x, w, 1, stride)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="resnet")

    def data(rng):
        x = rng.standard_normal((POOL_BATCHES, batch, hw, hw, 3), dtype=np.float32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    stem = hw * hw * 9 * 3 * widths[0]
    macs, cin = stem, widths[0]
    for i, w in enumerate(widths):
        s = hw // (2**i)  # output side of this stage
        macs += s * s * 9 * cin * w + s * s * 9 * w * w + (s * s * cin * w if (i or cin != w) else 0)
        cin = w
    macs += widths[-1] * classes
    return Workload(
        "resnet", batch, build, data, macs, stem,
        "MACs = stem hw^2*9*3*w0 + per stage s^2*9*(cin*w + w*w) [+ s^2*cin*w shortcut] + w_last*classes",
        f"ResNet (3 stages x 1 basic block, widths {widths}) on {hw}x{hw}x3, batch {batch}",
    )


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position vector to each token embedding."""

    def build(self, input_shape):
        self.positions = self.add_weight(shape=tuple(input_shape[1:]), initializer="glorot_uniform", name="positions")

    def call(self, x):
        return x + keras.ops.cast(self.positions, x.dtype)


def transformer_workload(seq=64, d=128, heads=4, ff=512, layers=2, vocab=8192, batch=64, classes=10) -> Workload:
    """A small post-LN Transformer encoder classifier over token ids (mean-pooled)."""

    def build():
        inputs = keras.Input((seq,), dtype="int32", name="tokens")
        x = PositionEmbedding()(keras.layers.Embedding(vocab, d)(inputs))
        for _ in range(layers):
            a = keras.layers.MultiHeadAttention(heads, d // heads)(x, x)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, a]))
            f = keras.layers.Dense(ff, activation="gelu")(x)
            f = keras.layers.Dense(d)(f)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, f]))
        x = keras.layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="transformer")

    def data(rng):
        x = rng.integers(0, vocab, (POOL_BATCHES, batch, seq), dtype=np.int32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    macs = layers * (4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * ff) + d * classes
    return Workload(
        "transformer", batch, build, data, macs, 0,
        "MACs = L*(4*T*d^2 [QKVO] + 2*T^2*d [scores, context] + 2*T*d*ff [FFN]) + d*classes; "
        "the embedding is a gather (0 MACs) and needs input gradients downstream",
        f"Transformer encoder: {layers} layers, T={seq}, d={d}, {heads} heads, ff={ff}, vocab={vocab}, batch {batch}",
    )


def workloads(quick: bool) -> Dict[str, Workload]:
    """The issue's workloads; `quick` shrinks every shape so a smoke test runs in seconds."""
    if quick:
        return {
            "mlp": mlp_workload(units=256, batch=64),
            "resnet": resnet_workload(widths=(8, 16, 16), hw=16, batch=32),
            "transformer": transformer_workload(seq=16, d=32, heads=2, ff=64, layers=1, vocab=256, batch=16),
        }
    return {"mlp": mlp_workload(), "resnet": resnet_workload(), "transformer": transformer_workload()}


def make_dataset(arrays) -> tf.data.Dataset:
    """Whole batches from an in-memory pool: cached, repeated, prefetched (no input-pipeline cost).

    tf.data autotuning is off: there is nothing to tune here, and with it on, destroying an iterator
    waits for the autotuner's next wake-up (10 ms after the iterator was made, then doubling periods),
    i.e. up to the iterator's own age. `model.fit` and the hand loop make a new iterator in every timed
    call (the Trainer keeps its own), so their calls took 0-100% longer, at random: calls of 3.0-3.5 s
    measured 5.11 s = (2^9 - 1) x 10 ms."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(arrays).cache().repeat().prefetch(2).with_options(options)


def make_loss():
    return keras.losses.SparseCategoricalCrossentropy()  # the model outputs float32 probabilities


def make_metrics(names: List[str]):
    table = {"accuracy": lambda: keras.metrics.SparseCategoricalAccuracy(name="accuracy")}
    return [table[n]() for n in names]
