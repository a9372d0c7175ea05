"""Keras layers with the same weights, config and results as Keras' own, computed with faster kernels.

Keras 3's BatchNormalization computes its moments and its normalization as a chain of elementwise ops
(mean, squared difference, multiply, add, ...) in float32, forward and backward. In a ResNet step under
mixed_bfloat16 on an AMX CPU that chain takes longer than the convolutions AMX sped up, and the casts around
it add more (docs/benchmarks.md). TensorFlow's FusedBatchNormV3 does each direction in one oneDNN kernel
(cuDNN on GPUs), takes bfloat16 in and out and keeps its statistics in float32. Keras 2 used it; Keras 3
does not.
"""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

log = logging.getLogger(__name__)

# The input and output dtypes the fused kernel takes (float32 and bfloat16 are tested on CPUs; bfloat16 on
# GPUs is TensorFlow's cuDNN kernel, not tried here).
_FUSED_DTYPES = (tf.float32, tf.bfloat16, tf.float16)


@keras.saving.register_keras_serializable(package="trainer")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization`, computed with TensorFlow's fused kernel where it applies.

    Same weights (names, shapes, order), config and rules as Keras' layer: the moving statistics move by
    `momentum` towards the batch's mean and (biased) variance, training mode only when the layer is
    trainable, so checkpoints of either load into the other (a `.keras` file names this class: load it
    after `import trainer.layers`). Keras' own computation is used for what the fused kernel does not
    take: masks, batch renormalization, `synchronized=True`, inputs that are not 4-D with the channels
    last, and float64."""

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            self._say_once_why_not_fused(inputs, mask)
            return super().call(inputs, training=training, mask=mask)
        inputs = tf.convert_to_tensor(inputs)
        ones = tf.ones(tf.shape(self.moving_mean), tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else ones
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros_like(ones)
        if training and self.trainable:
            outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, data_format="NHWC", is_training=True
            )
            self._update_moving_statistics(inputs, mean, unbiased_variance)
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                data_format="NHWC",
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        rank = len(inputs.shape)
        return (
            mask is None
            and not self.renorm
            and not self.synchronized
            and rank == 4
            and self.axis % rank == 3
            and tf.as_dtype(inputs.dtype) in _FUSED_DTYPES
        )

    def _say_once_why_not_fused(self, inputs, mask) -> None:
        """A user who swapped the layer in for speed learns that this one got none (logged once per layer)."""
        if getattr(self, "_said_why_not_fused", False):
            return
        self._said_why_not_fused = True
        reasons = [why for why, applies in (
            ("a mask", mask is not None), ("renorm=True", self.renorm), ("synchronized=True", self.synchronized),
            (f"a {len(inputs.shape)}-D input", len(inputs.shape) != 4),
            (f"axis={self.axis} (the fused kernel takes channels last)", len(inputs.shape) == 4 and self.axis % 4 != 3),
            (f"{tf.as_dtype(inputs.dtype).name} inputs", tf.as_dtype(inputs.dtype) not in _FUSED_DTYPES),
        ) if applies]
        log.info("BatchNormalization %r computes as Keras' layer, not fused, because of %s", self.name,
                 ", ".join(reasons))

    def _update_moving_statistics(self, inputs, mean, unbiased_variance) -> None:
        """Keras' rule, on the batch's biased variance: the kernel returns the unbiased one (n / (n - 1))."""
        shape = tf.shape(inputs)
        count = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
        variance = unbiased_variance * tf.maximum(count - 1.0, 0.0) / count
        momentum = self.momentum
        for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):  # in float32, as Keras
            moved = tf.cast(moving, tf.float32) * momentum + tf.cast(batch, tf.float32) * (1.0 - momentum)
            moving.assign(tf.cast(moved, moving.dtype))
