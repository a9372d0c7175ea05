"""Keras `Loss` objects in a step of your own: the replica's batch mean, as on one device.

Keras 3 divides a reducing `Loss` object's value by the number of replicas whenever a tf.distribute
strategy is current (`scale_loss_for_distribution` in keras/src/losses/loss.py), because Keras' own trainer
then SUMS the gradients over replicas (and multiplies the logged loss back). `Trainer.update(loss, tape)`
takes the replica's batch mean and averages over replicas itself, so `keras.losses.X()(y, p)` in a
`train_step` on 2 replicas gave half the update and half the logged loss. While an overridden
`train_step`/`test_step` runs (it runs only when traced), that division is left out: a `Loss` object gives
what its function form gives (`tf.reduce_mean(keras.losses.x(y, p))`). `compute_loss` keeps Keras'
convention: its contract is this replica's share of the global mean, which is what Keras' division gives.
Its value is marked as that share (mark_replica_share), so `update` and a returned log take it as such.

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
_warned = set()  # warnings said once per process


def _ours(function) -> bool:
    return getattr(function, "_trainer_loss_convention", False)


def _keras_original(function):
    """Keras' function under our wrapper(s) (a reload of this module finds its old wrapper in Keras' module)."""
    while _ours(function):
        function = function.__wrapped__
    return function


_keras_scale = _keras_original(keras_loss.scale_loss_for_distribution)
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


@functools.wraps(_keras_scale)
def _scale_loss_for_distribution(value):
    """Keras' division by the replicas, except inside a step that `per_replica_mean` wraps."""
    return _keras_scale(value) if _divides() else value


_scale_loss_for_distribution._trainer_loss_convention = True
if _HOOKED:
    keras_loss.scale_loss_for_distribution = _scale_loss_for_distribution


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _ensure_hooked(replicas: int) -> None:
    """Keras' module still holds our function (a mock.patch or a reload may have replaced it); if not, it is
    put back, and that said once."""
    global _keras_scale
    if not _HOOKED:
        if replicas > 1:
            _warn_once("not hooked", "This Keras version divides a Keras Loss object's value by the replicas in a way the "
                       "Trainer cannot undo: in an overridden step, a loss given to self.update or returned as a log "
                       "would be 1/replicas of its value. Fix: the function form, tf.reduce_mean("
                       "keras.losses.binary_crossentropy(y, p)), or Loss(reduction=None) and tf.reduce_mean.")
        return
    current = keras_loss.scale_loss_for_distribution
    if _ours(current):
        return
    if getattr(current, "__module__", None) == keras_loss.__name__:  # Keras' module reloaded: its new original
        _keras_scale = _scale_loss_for_distribution.__wrapped__ = current
    keras_loss.scale_loss_for_distribution = _scale_loss_for_distribution
    _warn_once("replaced", "keras.src.losses.loss.scale_loss_for_distribution was replaced by %r (a mock.patch or a "
               "reload?); the Trainer put its own back, which calls Keras' division outside an overridden step. "
               "Fix: patch keras' function before importing trainer, or not at all.", current)


def mark_replica_share(loss):
    """Marks `loss` (what compute_loss returns) as this replica's share of the global mean, so update and
    the logs can tell it from a replica's batch mean."""
    try:
        loss._trainer_replica_share = True
    except AttributeError:  # a value that takes no attribute (a Python float): left as it is
        pass
    return loss


def is_replica_share(loss) -> bool:
    return getattr(loss, "_trainer_replica_share", False)


def note_replica_share(replicas: int) -> None:
    """Said once: self.update was given compute_loss's value, already divided by the replicas."""
    if "share" not in _warned and replicas > 1:
        _warned.add("share")
        log.info("self.update got the value of self.compute_loss, this replica's share of the global mean (1/%d of "
                 "its batch mean): the Trainer takes it as such, so the update is that of the batch mean (its gradients are not "
                 "divided by the %d replicas again).", replicas, replicas)


def per_replica_mean(step, replicas: int):
    """`step` (an overridden train_step or test_step, run by strategy.run), with Keras Loss objects
    giving the replica's batch mean while it runs (is traced)."""
    def run(*args, **kwargs):  # not framework_code: autograph converts the step it calls
        _ensure_hooked(replicas)
        with _keras_division(False):
            return step(*args, **kwargs)

    return run


def keras_convention(compute_loss):
    """An overridden `compute_loss` (a function of the class, or one assigned to an instance; it returns this
    replica's share of the global mean): Keras Loss objects inside it divide by the replicas, as Keras does,
    also when an overridden step calls it; its value is marked as that share (mark_replica_share)."""
    if _ours(compute_loss):
        return compute_loss

    @functools.wraps(compute_loss)
    def with_keras_division(*args, **kwargs):
        with _keras_division(True):
            return mark_replica_share(compute_loss(*args, **kwargs))

    with_keras_division._trainer_loss_convention = True
    return with_keras_division
