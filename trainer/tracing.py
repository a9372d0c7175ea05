"""What autograph converts when a step is traced.

Autograph rewrites every Python function a traced step calls (so `if`/`for` on tensors become graph
control flow), and the rewrite costs time at each first trace: ~0.05-0.35 s a function, 1.2-1.5 s for
the 29 functions of the default step (docs/internals.md). The framework's own helpers branch only on
Python values, so they are marked `framework_code` and run as written, as Keras 3 marks its step
functions. What users write or override (train_step, test_step, compute_gradients, compute_loss, a loss
function, a metric) stays converted.
"""
import tensorflow as tf


def framework_code(function):
    """Marks a framework helper that autograph must call as it is (no tensor-dependent Python
    control flow inside, and no user code reached through it)."""
    return tf.autograph.experimental.do_not_convert(function)
