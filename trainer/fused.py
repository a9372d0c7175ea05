"""Fused optimizer updates: Keras' Adam/AdamW/SGD arithmetic in one TensorFlow kernel per variable.

Why: Keras 3 writes each update as separate ops (Adam: about ten, each a full pass over the variable
and its slots), and without XLA TensorFlow runs them one by one. TensorFlow's own training kernels
(ResourceApplyAdam, ResourceApplyKerasMomentum; the ones Keras 2 used) do the same arithmetic in one
pass. Measured on this 2-core CPU for the 20M-parameter MLP: 59 ms per Adam update with Keras' ops,
20 ms fused (benchmarks/bench_step.py). The formulas are Keras' (checked in tests/test_step.py). A step XLA
compiles whole takes Keras' ops instead (`FusedUpdate.in_use`, set per trace): XLA fuses them on its own, and
the kernels' XLA lowering is slower there (an embedding's sparse gradient goes through a sort-based unique; the
measurements are in docs/benchmarks.md).

Only the exact Keras classes are fused (a subclass may have its own update_step) and only options the
kernels express (no amsgrad); anything else keeps Keras' update. An embedding's sparse gradient
(IndexedSlices) is fused for Adam: Keras' update of it is dense anyway (every row's m and v decay), but
Keras moves v towards the sum of each gathered row's square, not the square of the summed rows as the
kernel does; `_sparse_to_dense` shifts v on the touched rows so that the kernel lands on Keras' value.
SGD keeps Keras' update for sparse gradients.

Decoupled weight decay (AdamW, or any of them with `weight_decay`) is `w - w * (wd * lr)`: one full-size
multiply per variable where Keras makes two (`w * wd * lr`), with Keras' rounding of the decay.
"""
from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf


def _handle(variable):
    """The resource handle of a Keras or tf variable (inside strategy.extended.update: this device's)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


FLOAT_DTYPES = (tf.float32, tf.float64, tf.bfloat16, tf.float16)


def _sparse_to_dense(optimizer: keras.optimizers.Adam, gradient: tf.IndexedSlices, variable, velocity):
    """The dense gradient ResourceApplyAdam takes, after adding (s - g^2) (1 - b2) / b2 to v on the touched
    rows (s: the sum of the squares of a row's gathered gradients, g: their sum); the kernel's
    v <- b2 v + (1 - b2) g^2 then gives Keras' b2 v + (1 - b2) s."""
    dtype = variable.dtype
    rows, position = tf.unique(gradient.indices)
    values = tf.cast(gradient.values, dtype)
    summed = tf.math.unsorted_segment_sum(values, position, tf.size(rows))
    squares = tf.math.unsorted_segment_sum(tf.square(values), position, tf.size(rows))
    beta_2 = tf.cast(optimizer.beta_2, dtype)
    shift = (squares - tf.square(summed)) * ((1 - beta_2) / beta_2)
    tf.raw_ops.ResourceScatterAdd(resource=_handle(velocity), indices=rows, updates=shift)
    return tf.scatter_nd(tf.expand_dims(rows, 1), summed, tf.shape(variable, out_type=rows.dtype))


def _adam_kernel(optimizer: keras.optimizers.Adam, gradient, variable, learning_rate) -> None:
    dtype = variable.dtype
    local_step = tf.cast(optimizer.iterations + 1, dtype)
    index = optimizer._get_variable_index(variable)
    if isinstance(gradient, tf.IndexedSlices):
        gradient = _sparse_to_dense(optimizer, gradient, variable, optimizer._velocities[index])
    tf.raw_ops.ResourceApplyAdam(
        var=_handle(variable),
        m=_handle(optimizer._momentums[index]),
        v=_handle(optimizer._velocities[index]),
        beta1_power=tf.pow(tf.cast(optimizer.beta_1, dtype), local_step),
        beta2_power=tf.pow(tf.cast(optimizer.beta_2, dtype), local_step),
        lr=tf.cast(learning_rate, dtype),
        beta1=tf.cast(optimizer.beta_1, dtype),
        beta2=tf.cast(optimizer.beta_2, dtype),
        epsilon=tf.cast(optimizer.epsilon, dtype),
        grad=tf.cast(gradient, dtype),
        use_locking=False,
        use_nesterov=False,
    )


def _momentum_kernel(optimizer: keras.optimizers.SGD, gradient, variable, learning_rate) -> None:
    dtype = variable.dtype
    tf.raw_ops.ResourceApplyKerasMomentum(
        var=_handle(variable),
        accum=_handle(optimizer.momentums[optimizer._get_variable_index(variable)]),
        lr=tf.cast(learning_rate, dtype),
        grad=tf.cast(gradient, dtype),
        momentum=tf.cast(optimizer.momentum, dtype),
        use_locking=False,
        use_nesterov=bool(optimizer.nesterov),
    )


class FusedUpdate:
    """The fused update of one optimizer (one per optimizer, however many Trainers share it). `in_use` is
    read when a step is traced: false while a step that XLA compiles whole (forward, backward and update) is
    traced, which then gets Keras' ops, and for a Trainer that asked for Keras' ops."""

    def __init__(self):
        self.in_use = True


def fused_update_of(optimizer) -> Optional[FusedUpdate]:
    """The fused update installed on `optimizer` (by a Trainer before), or None."""
    return optimizer.__dict__.get("_trainer_fused_update")


def _install(optimizer, kernel, takes_sparse: bool) -> FusedUpdate:
    keras_update = optimizer.update_step  # what the kernel does not take keeps Keras' update
    fused = FusedUpdate()

    def update_step(gradient, variable, learning_rate):
        sparse = isinstance(gradient, tf.IndexedSlices)
        if not fused.in_use or variable.dtype not in FLOAT_DTYPES or (sparse and not takes_sparse):
            return keras_update(gradient, variable, learning_rate)
        kernel(optimizer, gradient, variable, learning_rate)

    optimizer.update_step = update_step
    optimizer._trainer_fused_update = fused
    return fused


def _install_weight_decay(optimizer, fused: FusedUpdate) -> None:
    """Keras' _apply_weight_decay (TensorFlow backend) with the arithmetic in one pass."""
    keras_decay = optimizer._apply_weight_decay

    def decay_all(distribution, variables):
        def decay(variable):
            if optimizer._use_weight_decay(variable):
                factor = (tf.cast(optimizer.weight_decay, variable.dtype)
                          * tf.cast(optimizer.learning_rate, variable.dtype))
                variable.assign_sub(variable * factor)

        for variable in variables:
            if isinstance(variable, keras.Variable):
                variable = variable.value
            distribution.extended.update(variable, decay, group=False)

    def apply_weight_decay(variables):
        if not fused.in_use:
            return keras_decay(variables)
        if optimizer.weight_decay is None:
            return
        tf.__internal__.distribute.interim.maybe_merge_call(decay_all, optimizer._distribution_strategy, variables)

    optimizer._apply_weight_decay = apply_weight_decay


def fuse(optimizer) -> Optional[FusedUpdate]:
    """Gives `optimizer` a fused update_step (and weight decay) when the kernels express it exactly; None if
    it did not. An optimizer fused before (a second Trainer of it) keeps its one FusedUpdate."""
    if fused_update_of(optimizer) is not None:
        return fused_update_of(optimizer)
    kind = type(optimizer)
    if kind in (keras.optimizers.Adam, keras.optimizers.AdamW) and not optimizer.amsgrad:
        fused = _install(optimizer, _adam_kernel, takes_sparse=optimizer.beta_2 > 0)  # the shift divides by beta_2
    elif kind is keras.optimizers.SGD and optimizer.momentum != 0:
        fused = _install(optimizer, _momentum_kernel, takes_sparse=False)
    else:
        return None
    if optimizer.weight_decay:
        _install_weight_decay(optimizer, fused)
    return fused
