"""Keras `Loss` objects in a step of your own: the replica's batch mean, as on one device.

Keras 3 divides a reducing `Loss` object's value by the number of replicas whenever a tf.distribute
strategy is current (`scale_loss_for_distribution` in keras/src/losses/loss.py), because Keras' own trainer
then SUMS the gradients over replicas (and multiplies the logged loss back). `Trainer.update(loss, tape)`
takes the replica's batch mean and averages over replicas itself, so `keras.losses.X()(y, p)` in a
`train_step` on 2 replicas gave half the update and half the logged loss. While an overridden
`train_step`/`test_step` runs (it runs only when traced), that division is left out: a `Loss` object gives
what its function form gives (`tf.reduce_mean(keras.losses.x(y, p))`).

In such a step every value is the replica's batch mean, so any arithmetic on it is right: `self.compute_loss`
returns its body's value (this replica's share of the global mean, Keras' convention, which the default step
sums over replicas) times the replicas, `compute_gradients` gives the gradients of that, `apply_gradients`
and a Trainer optimizer's own `apply_gradients` average them over replicas. Outside it (the default step,
gradient accumulation) `compute_loss`'s value is that share, marked (mark_replica_share) so that the loss
tracker and a returned log take it as such.

The switch is per thread (MirroredStrategy traces each replica in a thread of its own, entered inside the
wrapper) and Keras' function is looked up when a loss reduces, so it acts inside our steps only: any other
code, in this thread or another, gets Keras' division as before. `tf.nn.compute_average_loss` (with or without
global_batch_size) and `tf.nn.scale_regularization_loss`, TensorFlow's tutorial habit, divide by the replicas too:
inside an overridden step they are multiplied back (tf.nn's module names are replaced, as Keras' is).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading

import tensorflow as tf
from keras.src.losses import loss as keras_loss

log = logging.getLogger("trainer.core")

_state = threading.local()  # .divides: Keras' division on; .own_step: the replicas inside an overridden step
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
    return getattr(_state, "divides", True)


def own_step_replicas() -> int:
    """The replicas while an overridden train_step/test_step runs (is traced) in this thread, else 0: there
    every loss and gradient is the replica's batch mean (see the module's docstring)."""
    return getattr(_state, "own_step", 0)


@contextlib.contextmanager
def _convention(divides: bool, own_step: int):
    before = _divides(), own_step_replicas()
    _state.divides, _state.own_step = divides, own_step
    try:
        yield
    finally:
        _state.divides, _state.own_step = before


def outside_own_step():
    """The framework's own apply (Updater.apply): Keras' convention, as outside an overridden step."""
    return _convention(True, 0)


@functools.wraps(_keras_scale)
def _scale_loss_for_distribution(value):
    """Keras' division by the replicas, except inside a step that `per_replica_mean` wraps."""
    return _keras_scale(value) if _divides() else value


_scale_loss_for_distribution._trainer_loss_convention = True
if _HOOKED:
    keras_loss.scale_loss_for_distribution = _scale_loss_for_distribution


def _times_replicas(tf_function):
    """tf.nn.compute_average_loss / scale_regularization_loss (the TF distributed tutorial's habit) give the
    replica's share of the global mean (÷ the replicas); inside an overridden step, the replica's batch mean."""
    @functools.wraps(tf_function)
    def batch_mean(*args, **kwargs):
        share, replicas = tf_function(*args, **kwargs), own_step_replicas()
        return share * tf.cast(replicas, share.dtype) if replicas > 1 else share

    batch_mean._trainer_loss_convention = True
    return batch_mean


def _hook_tf_nn() -> None:
    for module in {sys.modules.get(name) for name in ("tensorflow._api.v2.nn", "tensorflow._api.v2.compat.v2.nn")}:
        for name in ("compute_average_loss", "scale_regularization_loss"):
            function = getattr(module, name, None)
            if function is not None and not _ours(function):
                setattr(module, name, _times_replicas(function))


_hook_tf_nn()


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _ensure_hooked(replicas: int) -> None:
    """Keras' module still holds our function (a mock.patch or a reload may have replaced it); if not, it is
    put back, and that said once."""
    global _keras_scale
    _hook_tf_nn()
    if not _HOOKED:
        if replicas > 1:
            _warn_once("not hooked", "This Keras version divides a Keras Loss object's value by the replicas in a way "
                       "the Trainer cannot undo: in an overridden step, a loss given to self.update or returned as a "
                       "log would be 1/replicas of its value. Fix: the function form, "
                       "tf.reduce_mean(keras.losses.binary_crossentropy(y, p)), or "
                       "Loss(reduction=None) and tf.reduce_mean.")
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


def divided(grads, replicas: int):
    """Gradients of a replica's batch mean (an overridden step's) made that replica's share of the mean's
    gradient, which the all-reduce sums; IndexedSlices (an embedding's) stay sparse."""
    if replicas <= 1:
        return grads
    part = lambda g: g if g is None else (  # noqa: E731
        tf.IndexedSlices(g.values / replicas, g.indices, g.dense_shape) if isinstance(g, tf.IndexedSlices)
        else g / replicas)
    return [part(g) for g in grads]


def per_replica_mean(step, replicas: int):
    """`step` (an overridden train_step or test_step, run by strategy.run), with Keras Loss objects
    giving the replica's batch mean while it runs (is traced)."""
    def run(*args, **kwargs):  # not framework_code: autograph converts the step it calls
        _ensure_hooked(replicas)
        with _convention(False, replicas):
            return step(*args, **kwargs)

    return run


def keras_convention(compute_loss):
    """`compute_loss` (the Step's, an override of the class, or one assigned to an instance), whose body returns
    this replica's share of the global mean: Keras Loss objects inside it divide by the replicas, as Keras does.
    In an overridden step its value × the replicas is returned (the batch mean, so `compute_loss(...) + term`
    is right); elsewhere the share, marked as such (mark_replica_share)."""
    if _ours(compute_loss):
        return compute_loss

    @functools.wraps(compute_loss)
    def with_keras_division(*args, **kwargs):
        replicas = own_step_replicas()
        with _convention(True, 0):  # a super().compute_loss inside returns the share too
            share = compute_loss(*args, **kwargs)
        return mark_replica_share(share) if not replicas or share is None else share * replicas

    with_keras_division._trainer_loss_convention = True
    return with_keras_division
