"""One optimizer's update: all-reduce → finite check → clip → apply (or skip) → loss-scale update.

Every optimizer of a Trainer gets one `Updater`, so each gets the same guarantees: its own loss scale
(checkpointed), the all-reduce once, one finite check per update (a skipped update is counted), clipping
of the unscaled gradients, the fused update kernels, and its `grad_norm` in the logs.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf

from trainer.ema import warm_up_decay
from trainer.fused import fuse, fused_update_of
from trainer.loss_convention import divided, outside_own_step, own_step_replicas
from trainer.loss_scale import LossScale
from trainer.tracing import framework_code

log = logging.getLogger(__name__)
_state = threading.local()  # .in_apply: this thread runs Updater.apply, which has all-reduced the gradients


class Updater:
    """Applies unscaled gradients to `variables()` with `optimizer`.

    Args:
      name: the optimizer's name in the Trainer (its logs are prefixed with it when there are several).
      variables: returns the variables it updates (read at trace time: after freezing layers, call
        `Trainer.reset_step_functions()`).

    `compile_in_xla` is called by step_functions.py from the XLA plan: when XLA compiles the update with the
    rest of the step, a non-finite update is undone by a select instead of skipped by a branch, and the update
    is Keras' ops (fused.py's kernels are for updates outside XLA).
    """

    def __init__(self, name: str, optimizer: keras.optimizers.Optimizer, variables: Callable[[], List],
                 loss_scale: LossScale, *, strategy: tf.distribute.Strategy, clipnorm: Optional[float],
                 skip_nonfinite: bool, fused: bool, grad_multipliers: Callable[[], Dict]):
        self.name, self.optimizer, self.variables, self.loss_scale = name, optimizer, variables, loss_scale
        self.strategy, self.clipnorm, self.skip_nonfinite = strategy, clipnorm, skip_nonfinite
        self.grad_multipliers = grad_multipliers  # the Trainer's: variable path -> factor, read at trace time
        self.skip_by_select = False
        self.in_step = False  # set when a traced step calls apply(): only then has it a grad_norm to log
        with strategy.scope():
            self.grad_norm = keras.metrics.Mean(name="grad_norm")
        # apply() all-reduces the gradients itself (clipping and the finite check need the global gradient), so
        # the Keras optimizer's own all-reduce must not sum them a second time; an optimizer.apply_gradients of
        # the user's in an overridden step gets the mean over replicas (its gradients are of batch means), and
        # anywhere else Keras' sum. Keras' method is kept once on the optimizer: a second Trainer (or Updater) of
        # the same optimizer wraps it, not the first one's wrapper (which would divide twice).
        keras_sum = optimizer.__dict__.setdefault("_trainer_keras_sum", optimizer._all_reduce_sum_gradients)
        optimizer._all_reduce_sum_gradients = _own_apply_averages(keras_sum)
        warm_up_decay(optimizer)  # use_ema: the average's decay warms up (ema.py)
        self.fused = fused and fuse(optimizer) is not None  # an optimizer a Trainer fused before stays so:
        self.fused_update = fused_update_of(optimizer)  # with fused=False its kernels are switched off
        if self.fused_update is not None:
            self.fused_update.in_use = self.fused
        if self.fused:
            log.info("Optimizer %s: %s with TensorFlow's fused update kernels (set trainer.fused_optimizer=false for "
                     "Keras' ops)", name, type(optimizer).__name__)

    def compile_in_xla(self, whole_step: bool) -> None:
        """Read when a step is traced: with the whole step in XLA (step_functions.py, from the XLA plan) a
        non-finite update is undone by a select, and the update is Keras' ops, which XLA fuses itself."""
        self.skip_by_select = whole_step
        if self.fused_update is not None:
            self.fused_update.in_use = self.fused and not whole_step

    def build(self) -> None:
        """Creates the optimizer's slots now: Keras builds them lazily, which fails inside a tf.function
        under a distribution strategy, and a lazy build in a later trace retraces the step."""
        self.optimizer.build(self.variables())

    @framework_code
    def unscaled_gradients(self, tape: tf.GradientTape, loss, variables, divide: int = 1):
        """The float32 gradients of `loss` / `divide` with respect to `variables`, through this optimizer's
        loss scale (`LossScale.unscaled_gradients`): the one way from a loss to the gradients an update
        applies (the default step, `Trainer.update` and gradient accumulation all take it)."""
        return self.loss_scale.unscaled_gradients(tape, loss, variables, divide)

    @framework_code
    def apply(self, unscaled_grads, loss=None) -> None:
        """All-reduce, finite check, clip, apply (or skip), update the loss scale. `loss` is this
        replica's share of the global loss; a non-finite loss also skips the update."""
        with outside_own_step(), _in_apply():  # the optimizer's own all-reduce: none (_own_apply_averages)
            self._apply(unscaled_grads, loss)

    @framework_code
    def _apply(self, unscaled_grads, loss) -> None:
        self.in_step = True
        replica_context = tf.distribute.get_replica_context()
        if self.strategy.num_replicas_in_sync > 1:
            unscaled_grads = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, unscaled_grads)
            if loss is not None:
                loss = replica_context.all_reduce(tf.distribute.ReduceOp.SUM, loss)
        variables = self.variables()
        multipliers = self.grad_multipliers()
        if multipliers:
            factors = [multipliers.get(v.path, 1.0) for v in variables]
            unscaled_grads = [g if g is None or f == 1.0 else g * f for g, f in zip(unscaled_grads, factors)]
        grad_norm = tf.linalg.global_norm([g for g in unscaled_grads if g is not None])
        # One pass over the gradients: an inf or NaN anywhere makes the norm non-finite (so does a norm
        # beyond float32's range, which clipping could not handle either). The same all-reduced values
        # on every replica, so every replica takes the same branch.
        finite = tf.math.is_finite(grad_norm)
        if loss is not None:
            finite = tf.logical_and(finite, tf.math.is_finite(loss))
        self.grad_norm.update_state(tf.where(finite, grad_norm, 0.0), sample_weight=tf.cast(finite, tf.float32))
        if self.clipnorm:
            unscaled_grads, _ = tf.clip_by_global_norm(unscaled_grads, self.clipnorm, use_norm=grad_norm)
        if self.loss_scale.enabled or self.skip_nonfinite:
            self._apply_if_finite(unscaled_grads, variables, finite)
        else:  # no wait for the finite check: updates start as soon as their gradients are ready
            self.optimizer.apply(unscaled_grads, variables)
        self.loss_scale.update(finite)

    @framework_code
    def _apply_if_finite(self, grads, variables, finite) -> None:
        if self.skip_by_select:  # the whole step of one replica in XLA: no branch, no cross-replica decision
            self._apply_selected(grads, variables, finite)
        elif tf.__internal__.distribute.strategy_supports_no_merge_call():
            tf.cond(finite, lambda: self.optimizer.apply(grads, variables), self._skip)
        else:
            # Mirrored-style strategies: a cond whose branch calls merge_call (as optimizer.apply does) is
            # not allowed in a replica context, so decide in the cross-replica context, as Keras'
            # LossScaleOptimizer does, and run the apply per replica from there.
            def cross_replica(strategy, grads, finite):
                finite = strategy.experimental_local_results(finite)[0]
                tf.cond(
                    finite,
                    lambda: strategy.extended.call_for_each_replica(
                        lambda g: _reduced_apply(self.optimizer, g, variables), args=(grads,)
                    ),
                    self._skip,
                )

            tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, finite))

    @framework_code
    def _skip(self) -> None:
        """A skipped update still counts in `iterations`, so learning-rate schedules see the global step."""
        self.optimizer.iterations.assign_add(1)

    @framework_code
    def _apply_selected(self, grads, variables, finite) -> None:
        """The skip without a branch, for a step compiled by XLA: apply, then put back the old value of
        every variable and optimizer slot if the update was not finite. XLA fuses the update and the
        select into one in-place pass per variable; a tf.cond there makes it copy all the variables."""
        state = [v for v in list(variables) + list(self.optimizer.variables) if v is not self.optimizer.iterations]
        before = [tf.convert_to_tensor(v) for v in state]  # read before the update (program order)
        self.optimizer.apply(grads, variables)  # `iterations` counts skipped updates too, as in _skip
        for v, old in zip(state, before):
            v.assign(tf.where(finite, tf.convert_to_tensor(v), old))

    def logs(self, prefix: str = "") -> Dict[str, float]:
        """lr, grad_norm (mean over the window's finite updates), loss_scale, skipped_steps. The Trainer
        restarts grad_norm with its other window trackers (trainer.py _reset_train_trackers)."""
        logs = {}
        if self.in_step:  # not for an optimizer the step does not use
            logs[f"{prefix}grad_norm"] = float(self.grad_norm.result())
        logs[f"{prefix}lr"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        status = self.loss_scale.status()
        if status.enabled:
            logs[f"{prefix}loss_scale"] = status.scale
        logs[f"{prefix}skipped_steps"] = status.skipped_steps
        return logs


@contextlib.contextmanager
def _in_apply():
    before = getattr(_state, "in_apply", False)
    _state.in_apply = True
    try:
        yield
    finally:
        _state.in_apply = before


def _reduced_apply(optimizer, grads, variables) -> None:
    """optimizer.apply of all-reduced gradients in a thread of its own (call_for_each_replica starts one per
    replica, where apply()'s thread-local state is not set)."""
    with _in_apply():
        optimizer.apply(grads, variables)


def _own_apply_averages(keras_sum: Callable) -> Callable:
    """A Trainer optimizer's all-reduce: none in Updater.apply (done before); the mean over the replicas when
    the user's own step calls optimizer.apply_gradients (Keras' sum would give replicas × the gradient of the
    batch-mean loss, and no all-reduce let each replica's copy of the variables drift apart); anywhere else
    (an apply_gradients override called by the default step, Keras' own fit) Keras' sum, as Keras does."""
    def all_reduce(grads_and_vars):
        if getattr(_state, "in_apply", False):
            return grads_and_vars
        replicas = own_step_replicas()
        if replicas <= 1:
            return keras_sum(grads_and_vars)
        summed = list(keras_sum(grads_and_vars))  # Keras' SUM all-reduce (None gradients kept)
        return list(zip(divided([g for g, _ in summed], replicas), [v for _, v in summed]))

    return all_reduce


def _optimizers_of_your_own_average() -> None:
    """An optimizer the Trainer does not hold (made in the user's own step code), applied in an overridden
    step: there every loss is the replica's batch mean, so Keras' SUM all-reduce would give replicas × the
    update; it averages instead. Such an optimizer is in no checkpoint either: said once, with the fix."""
    from keras.src.backend.tensorflow.optimizer import TFOptimizer

    keras_sum = TFOptimizer._all_reduce_sum_gradients
    if getattr(keras_sum, "_trainer_average", False):
        return

    @functools.wraps(keras_sum)
    def all_reduce(self, grads_and_vars):
        replicas = own_step_replicas()
        if not replicas or "_trainer_keras_sum" in self.__dict__:  # not in an own step, or a Trainer optimizer
            return keras_sum(self, grads_and_vars)
        if id(self) not in _told_of:
            _told_of.add(id(self))
            log.warning("Optimizer %r is applied in an overridden step but is not one of the Trainer's: it is in no "
                        "checkpoint (a resume restarts its state), and gets no loss scaling, finite check or clipping; "
                        "its gradients are averaged over the replicas (the step's losses are batch means). Fix: give "
                        "it to the Trainer (Trainer(optimizers={name: optimizer})) and call "
                        "self.update(loss, tape, name).", getattr(self, "name", type(self).__name__))
        summed = list(keras_sum(self, grads_and_vars))
        if replicas <= 1:
            return summed
        return list(zip(divided([g for g, _ in summed], replicas), [v for _, v in summed]))

    all_reduce._trainer_average = True
    TFOptimizer._all_reduce_sum_gradients = all_reduce


_told_of: set = set()
_optimizers_of_your_own_average()
