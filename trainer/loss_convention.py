"""Keras `Loss` objects in a step of your own: the replica's batch mean, as on one device.

Keras 3 divides a reducing `Loss` object's value by the number of replicas whenever a tf.distribute
strategy is current (`scale_loss_for_distribution` in keras/src/losses/loss.py), because Keras' own trainer
then SUMS the gradients over replicas (and multiplies the logged loss back). `Trainer.update(loss, tape)`
takes the replica's batch mean and averages over replicas itself, so `keras.losses.X()(y, p)` in a
`train_step` on 2 replicas gave half the update and half the logged loss. While an overridden
`train_step`/`test_step` runs (it runs only when traced), that division is left out: a `Loss` object gives
what its function form gives (`tf.reduce_mean(keras.losses.x(y, p))`). `compute_loss` keeps Keras'
convention: its contract is this replica's share of the global mean, which is what Keras' division gives.

The switch is per thread (MirroredStrategy traces each replica in a thread of its own, entered inside the
wrapper) and Keras' function is looked up when a loss reduces, so it acts inside our steps only: any other
code, in this thread or another, gets Keras' division as before.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading

from keras.src.losses import loss as keras_loss

log = logging.getLogger("trainer.core")

_keras_divides = threading.local()
_keras_scale = keras_loss.scale_loss_for_distribution
# Keras looks the function up in its module when a loss reduces (reduce_values), so replacing the module's
# name reaches every Loss object; a Keras that does it otherwise is reported instead (per_replica_mean).
_HOOKED = "scale_loss_for_distribution" in keras_loss.reduce_values.__code__.co_names


def _divides() -> bool:
    return getattr(_keras_divides, "on", True)


@contextlib.contextmanager
def _keras_division(on: bool):
    before, _keras_divides.on = _divides(), on
    try:
        yield
    finally:
        _keras_divides.on = before


def _scale_loss_for_distribution(value):
    """Keras' division by the replicas, except inside a step that `per_replica_mean` wraps."""
    return _keras_scale(value) if _divides() else value


if _HOOKED:
    keras_loss.scale_loss_for_distribution = _scale_loss_for_distribution


def per_replica_mean(step, replicas: int):
    """`step` (an overridden train_step or test_step, run by strategy.run), with Keras Loss objects
    giving the replica's batch mean while it runs (is traced)."""
    if not _HOOKED and replicas > 1:
        log.warning("This Keras version divides a Keras Loss object's value by the %d replicas in a way the Trainer "
                    "cannot undo: in an overridden step, a loss given to self.update or returned as a log would be "
                    "1/%d of its value. Fix: the function form, tf.reduce_mean(keras.losses.binary_crossentropy(y, p)), "
                    "or Loss(reduction=None) and tf.reduce_mean.", replicas, replicas)

    def run(*args, **kwargs):  # not framework_code: autograph converts the step it calls
        with _keras_division(False):
            return step(*args, **kwargs)

    return run


def keras_convention(compute_loss):
    """An overridden `compute_loss` (which returns this replica's share of the global mean): Keras Loss
    objects inside it divide by the replicas, as Keras does, also when an overridden step calls it."""
    @functools.wraps(compute_loss)
    def with_keras_division(self, *args, **kwargs):
        with _keras_division(True):
            return compute_loss(self, *args, **kwargs)

    return with_keras_division
