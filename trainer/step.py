"""The step: one replica's work on one batch. The Trainer inherits it; override any method to change it.

  * `train_step(data)`: forward, loss, gradients, update; may return a dict of scalar logs.
  * `update(loss, tape, optimizer=None)`: what research code calls per update (a GAN once per optimizer, a
    WGAN's critic once per batch of trainer.batches_per_step): gradients seeded with the loss scale →
    unscaled → that optimizer's Updater (all-reduce, finite check, clip, apply, loss scale; see update.py).
  * `compute_loss`, `compute_gradients`, `apply_gradients`: the pieces of the default step.
  * `accumulate_step(data)`, `apply_accumulated()`: what trainer.grad_accum_steps=K > 1 runs instead of
    train_step (K times, then once); a train_step overridden below them is refused then (accumulation.py).
  * `test_step(data)`: forward and metrics; may return a dict of scalar logs.
"""
from __future__ import annotations

from typing import Dict, Optional

import keras
import tensorflow as tf

from trainer.data import DataError
from trainer.subclassing import check_super_init
from trainer.loss_convention import divided, is_replica_share, keras_convention, own_step_replicas
from trainer.tracing import framework_code


class Step:
    """Mixed into Trainer. Expects: models, model, loss, updaters, train_metrics, eval_metrics, train_loss,
    eval_loss, strategy, config (see trainer.py)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_super_init(cls)  # an __init__ that forgets super().__init__(...) says so (subclassing.py)
        if cls.compute_loss is not Step.compute_loss:  # also a mixin's: Keras Loss objects in it keep Keras' division
            cls.compute_loss = keras_convention(cls.compute_loss)  # (loss_convention.py); no-op if already wrapped

    @framework_code
    def _wrap_own_compute_loss(self) -> None:
        """A compute_loss assigned to the instance (t.compute_loss = f) gets what a class's gets."""
        if "compute_loss" in vars(self):
            self.compute_loss = keras_convention(vars(self)["compute_loss"])

    # -- the default step ------------------------------------------------------------------------

    @keras_convention  # called in an overridden step, it returns the replica's batch mean (loss_convention.py)
    def compute_loss(self, x, y, y_pred, sample_weight=None) -> tf.Tensor:
        """Per-example loss averaged over the *global* batch, plus this replica's share of the
        regularization and `add_loss` losses; summing it over replicas gives the mean loss. An override
        returns the same; in an overridden train_step/test_step, `self.compute_loss` returns that × the
        replicas: the replica's batch mean, as on one device."""
        loss = tf.constant(0.0)
        if self.loss is not None:
            loss = self._global_mean(tf.cast(self.loss(y, y_pred), tf.float32), sample_weight)
        elif not self.model.losses:
            raise ValueError("Trainer(loss=None): the model adds no losses (add_loss) either; give a loss, or "
                             "override compute_loss (the default steps and gradient accumulation call it), or "
                             "train_step (calling self.update(loss, tape)) and test_step (or no eval data)")
        if self.model.losses:
            loss += tf.nn.scale_regularization_loss(tf.add_n([tf.cast(l, tf.float32) for l in self.model.losses]))
        return loss

    @framework_code
    def _global_mean(self, per_example, sample_weight):
        weight = None if sample_weight is None else tf.cast(sample_weight, tf.float32)
        if weight is not None and weight.shape.rank is not None and per_example.shape.rank is not None:
            # per example (batch,) or per element, e.g. a padding mask (batch, time)
            while weight.shape.rank > per_example.shape.rank and weight.shape[-1] == 1:
                weight = tf.squeeze(weight, -1)
            while weight.shape.rank < per_example.shape.rank:
                weight = weight[..., None]
            per_example, weight = per_example * weight, None  # then the mean over the elements, as Keras' fit does
        if per_example.shape.rank and per_example.shape.rank > 1:
            per_example = tf.reduce_mean(per_example, axis=list(range(1, per_example.shape.rank)))
        return tf.nn.compute_average_loss(per_example, sample_weight=weight)  # weight: per example, rank unknown

    @framework_code
    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None and self.loss is not None:
            raise DataError(
                "The training batches have no labels (each batch is one tensor, not (x, y)), but the Trainer's "
                f"loss {getattr(self.loss, 'name', self.loss)!r} needs them. Fix: batches of (x, y) "
                "[, sample_weight]; or, for unlabelled data (a VAE, a GAN), override train_step and call "
                "self.update(loss, tape) (see docs/research.md)."
            )
        return x, y, sample_weight

    def compute_gradients(self, data):
        """Forward, loss (float32), unscaled gradients (through the loss scale: Updater.unscaled_gradients)."""
        x, y, sample_weight = self._unpack(data)
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
        unscaled_grads = self.updater().unscaled_gradients(tape, loss, self.model.trainable_variables)
        self._update_metrics(self.train_metrics, self.train_loss, loss, y, y_pred, sample_weight)
        return loss, unscaled_grads

    def apply_gradients(self, unscaled_grads, loss=None, optimizer: Optional[str] = None) -> None:
        """All-reduce, finite check, clip, apply (or skip), update the loss scale (update.py). In an overridden
        step the gradients are of the replica's batch mean (compute_gradients' there too): averaged over replicas."""
        replicas = own_step_replicas()
        if replicas > 1:
            unscaled_grads, loss = divided(unscaled_grads, replicas), None if loss is None else loss / replicas
        self.updater(optimizer).apply(unscaled_grads, loss)

    def train_step(self, data) -> Optional[Dict[str, tf.Tensor]]:
        """One replica's training step on one batch (a tuple of K with trainer.batches_per_step=K). An override
        may return a dict of scalar logs: averaged over replicas and the log window, they reach every logger."""
        loss, unscaled_grads = self.compute_gradients(data)
        self.apply_gradients(unscaled_grads, loss)

    def test_step(self, data) -> Optional[Dict[str, tf.Tensor]]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.model(x, training=False)
        loss = self.compute_loss(x, y, y_pred, sample_weight) if y is not None or self.loss is None else None
        self._update_metrics(self.eval_metrics, self.eval_loss, loss, y, y_pred, sample_weight)

    def _update_metrics(self, metrics, loss_tracker, loss, y, y_pred, sample_weight):
        if loss is not None:
            batch = tf.cast(tf.shape(tf.nest.flatten(y_pred)[0])[0], tf.float32)
            # compute_loss's share of the global mean × replicas is this replica's batch mean (in an overridden
            # step, calling super().train_step, compute_loss gave that mean already)
            loss = loss * self.strategy.num_replicas_in_sync if is_replica_share(loss) else loss
            loss_tracker.update_state(loss, sample_weight=batch)
        if y is None:
            return  # unlabelled data: metrics compare predictions with labels
        for metric in metrics.values():
            metric.update_state(y, y_pred, sample_weight=sample_weight)

    # -- research code: any number of models, optimizers and losses --------------------------------

    @framework_code
    def updater(self, optimizer: Optional[str] = None):
        """The update pipeline of optimizer `optimizer` (default: the only one)."""
        name = optimizer if optimizer is not None else self.default_optimizer
        if name not in self.updaters:
            if name is None:
                raise ValueError(f"This Trainer has several optimizers {sorted(self.updaters)}: name the one to "
                                 "update, self.update(loss, tape, name). The default step trains one model; with "
                                 "several models, override train_step (see docs/research.md).")
            raise ValueError(f"No optimizer {name!r}: this Trainer's optimizers are {sorted(self.updaters)}")
        return self.updaters[name]

    @framework_code
    def update(self, loss, tape: tf.GradientTape, optimizer: Optional[str] = None) -> None:
        """Updates the variables of `optimizer` (a key of `Trainer.optimizers`, which is also the name of
        the model it trains; default: the only one) to lower `loss`, this replica's batch mean in
        float32, computed under `tape`.

        What the default step gets, this update gets too: the gradients of the loss scaled by that
        optimizer's own loss scale, unscaled once, averaged over replicas, a finite check that skips
        (and counts) a bad update, clipping, the fused update, and its grad_norm/lr in the logs.

        The loss is this replica's batch mean, as on one device: tf.reduce_mean, a Keras loss function
        such as keras.losses.binary_crossentropy, or a Keras Loss object (in an overridden step those
        skip Keras' division by the replicas: loss_convention.py).
        """
        updater = self.updater(optimizer)
        if loss.shape.rank != 0:
            raise ValueError(f"Trainer.update: the loss has shape {loss.shape}, not a scalar: take its mean over "
                             "the batch (tf.reduce_mean) first.")
        if loss.dtype != tf.float32:
            raise TypeError(f"Trainer.update: the loss is {loss.dtype.name}, not float32. Compute it from float32 "
                            "outputs (tf.cast(outputs, 'float32') inside the tape), as a mixed policy needs.")
        # compute_loss's value outside an overridden step (1/replicas of the batch mean) is divided already.
        divide = 1 if is_replica_share(loss) else self.strategy.num_replicas_in_sync
        unscaled_grads = updater.unscaled_gradients(tape, loss, updater.variables(), divide)
        # Keras would say "No gradients provided for any variable"
        if unscaled_grads and all(g is None for g in unscaled_grads):
            name = updater.name
            raise ValueError(f"Trainer.update(loss, tape, {name!r}): the loss has no gradient for any variable of "
                             f"model {name!r}, so optimizer {name!r} has nothing to apply. Likely cause: the model's "
                             "forward pass ran outside `with tf.GradientTape() as tape:` (or the loss comes from "
                             "another model, or through tf.stop_gradient). Fix: call the model and compute "
                             "the loss inside the tape.")
        updater.apply(unscaled_grads, loss / divide)

    # -- gradient accumulation: K micro-batches per optimizer update --------------------------------

    def accumulate_step(self, data) -> None:
        """Adds one micro-batch's unscaled gradients to this replica's accumulators (no all-reduce)."""
        _, unscaled_grads = self.compute_gradients(data)
        self._accumulate(unscaled_grads)

    def _accumulate(self, unscaled_grads) -> None:
        for v, g in zip(self.model.trainable_variables, unscaled_grads):
            if g is not None:
                self._accumulators[v.path].assign_add(tf.convert_to_tensor(g))

    def apply_accumulated(self) -> None:
        """The mean of the K micro-batch gradients goes through the usual apply (one finite check,
        one loss-scale update), then the accumulators are zeroed."""
        k = float(self.config.grad_accum_steps)
        grads = [self._accumulators[v.path].read_value() / k for v in self.model.trainable_variables]
        self.apply_gradients(grads)
        for acc in self._accumulators.values():
            acc.assign(tf.zeros_like(acc))

    def _make_accumulators(self) -> None:
        """One per replica (ON_READ): each replica accumulates its own micro-batch gradients."""
        self._accumulators = {
            v.path: tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False, name="grad_accumulator",
                                synchronization=tf.VariableSynchronization.ON_READ,
                                aggregation=tf.VariableAggregation.NONE)
            for v in self.model.trainable_variables
        }
