"""The Trainer: the step, the inner loop of K steps in one tf.function, and the outer Python loop.

Three layers, as in Orbit and Keras' own trainer:
  * `train_step(data)` / `test_step(data)`: one replica's work (forward, loss, scaled loss, unscaled
    gradients, apply). Override them, or `compute_loss`, in a subclass to change the step.
  * `_make_train_function`: wraps the step in `strategy.run`, loops it `steps_per_loop` times inside one
    `tf.function`, and applies XLA. The only place that compiles anything.
  * `fit`: the Python loop: logging, evaluation, checkpoints, callbacks, faults, signals.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.util import deprecation as _tf_deprecation

from trainer import precision as precision_lib
from trainer.callbacks import Callback, CallbackList, default_callbacks
from trainer.checkpoint import NO_BEST, Checkpointer, non_finite_weights
from trainer.config import ConfigError, PrecisionConfig, TrainerConfig
from trainer.data import DataError, release_in_background
from trainer.distribute import StrategyError
from trainer.fused import fuse
from trainer.loss_scale import LossScale
from trainer.precision import PrecisionError
from trainer import signals

log = logging.getLogger(__name__)

DataArg = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]


class _KeptIterator:
    """What a fit() call that ended normally leaves for the next call on the same data set. When it is
    let go (fit() on other data, or the Trainer is freed), its iterator dies on the release thread: after a
    100 s run, destroying it in the calling thread took 45 s (tf.data's autotuner wait, see data.py)."""

    def __init__(self, data: DataArg, step: int, iterator: Any):
        self.data, self.step, self.iterator = data, step, iterator

    def __del__(self):
        if self.iterator is not None:
            holder, self.iterator = [self.iterator], None
            try:
                release_in_background(holder)
            except Exception:  # late in interpreter shutdown module globals may be gone: it dies here
                holder.clear()


class NumericalError(RuntimeError):
    """Training cannot go on: too many non-finite steps in a row, or weights that are no longer finite."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved (when a run folder is set) before this is raised."""


class _PreemptedAndSaved(TrainingInterrupted):
    """Raised by TF's PreemptionCheckpointHandler (as its exit_fn) once every worker has saved."""


def _build(obj_or_builder):
    """Objects may be given ready-made or as zero-argument builders (called under the strategy scope)."""
    ready = (keras.layers.Layer, keras.metrics.Metric, keras.optimizers.Optimizer, keras.losses.Loss)
    if callable(obj_or_builder) and not isinstance(obj_or_builder, ready):
        return obj_or_builder()
    return obj_or_builder


def _per_example_loss(loss):
    """Keras losses reduce by default; the step needs per-example values to average over the global batch."""
    if isinstance(loss, keras.losses.Loss) and loss.reduction is not None:
        config = loss.get_config()
        config["reduction"] = None
        return type(loss).from_config(config)
    return loss


class Trainer:
    """Trains a Keras model with tf.function steps, mixed precision and a tf.distribute strategy.

    Args:
      model: a keras.Model, or a zero-argument function that builds one (preferred: it is then built
        under the strategy scope and after the dtype policy is set).
      loss: a Keras loss (its reduction is replaced by per-example) or a function (y, y_pred) -> per-example.
      optimizer: a Keras optimizer or a zero-argument function that builds one.
      metrics: Keras metrics (or builders), or a mapping name -> metric; computed on train and eval.
      strategy: a tf.distribute.Strategy (default: TensorFlow's current/default strategy).
      precision: a policy name ("float32", "mixed_float16", "mixed_bfloat16") or a PrecisionConfig.
      run_dir: where metrics.jsonl, checkpoints/ and tensorboard/ go; None: nothing is written.
      callbacks: extra Callback objects (the progress bar and writers are added from `config`).
      config: loop settings (TrainerConfig); keyword `options` override single fields of it.
      seed: seeds Python, NumPy, TensorFlow and Keras, the data order and the step RNG.
      clipnorm: clip the unscaled gradients to this global norm before applying them.
    """

    def __init__(
        self,
        model,
        loss,
        optimizer,
        metrics: Union[Sequence[Any], Mapping[str, Any], None] = None,
        *,
        strategy: Optional[tf.distribute.Strategy] = None,
        precision: Union[str, PrecisionConfig] = "float32",
        run_dir: Union[str, Path, None] = None,
        callbacks: Iterable[Callback] = (),
        config: Optional[TrainerConfig] = None,
        seed: int = 0,
        clipnorm: Optional[float] = None,
        is_chief: bool = True,
        **options,
    ):
        self.config = dataclasses.replace(config or TrainerConfig(), **options)
        self.precision = PrecisionConfig(policy=precision) if isinstance(precision, str) else precision
        self.strategy = strategy or tf.distribute.get_strategy()
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            signals.reclaim_sigterm_from_tensorflow()  # its coordination service's handler swallows SIGTERM
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_chief = is_chief
        self.seed = seed
        self.clipnorm = clipnorm
        self.stop_training = False  # a callback may set it; the loop stops after the current loop

        if self.config.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(seed)
        precision_lib.set_policy(self.precision.policy)  # before any layer exists
        if self.precision.debug_numerics:
            tf.debugging.enable_check_numerics()

        with self.strategy.scope():
            self.model: keras.Model = _build(model)
            if self.model is model:  # ready-made: built before this Trainer set the policy and entered the scope
                self._check_ready_made_model(explicit_strategy=strategy is not None)
            self.optimizer: keras.optimizers.Optimizer = _build(optimizer)

            def metric(m):  # a ready-made metric is remade here, so its variables belong to the strategy
                built = _build(m)
                return type(built).from_config(built.get_config()) if built is m and strategy is not None else built

            if isinstance(metrics, Mapping):
                named = {name: metric(m) for name, m in metrics.items()}
            else:
                named = {}
                for m in metrics or ():
                    m = metric(m)
                    named[m.name] = m
            self.metrics: Dict[str, keras.metrics.Metric] = named
            self.eval_metrics = {name: type(m).from_config(m.get_config()) for name, m in named.items()}
            self.train_loss = keras.metrics.Mean(name="loss")
            self.eval_loss = keras.metrics.Mean(name="loss")
            self.grad_norm = keras.metrics.Mean(name="grad_norm")
            self.loss_scale = self._make_loss_scale()
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.rng = tf.random.Generator.from_seed(seed)  # for recipes' augmentation seeds
            # No best yet: the worst finite value (NaN would trip precision.debug_numerics on every read).
            self.best = tf.Variable(NO_BEST.get(self.config.best_mode, math.nan), dtype=tf.float32, trainable=False, name="best_metric")
        self.loss = _per_example_loss(loss)
        # Our step all-reduces the gradients itself (clipping and the finite check need the global
        # gradient), so the Keras optimizer's own all-reduce must not sum them a second time.
        self.optimizer._all_reduce_sum_gradients = lambda grads_and_vars: grads_and_vars
        if self.config.fused_optimizer and fuse(self.optimizer):
            log.info("Optimizer: %s with TensorFlow's fused update kernels (trainer.fused_optimizer=false: Keras' ops)",
                     type(self.optimizer).__name__)
        self.jit_compile = self._resolve_jit_compile()
        self.callbacks = CallbackList(list(callbacks))
        self._built = False
        self._train_function = None
        self._eval_function = None
        self.traces: Dict[str, int] = {"train": 0, "eval": 0}
        self._accumulators = None
        self._tracing_xla = False
        self._kept_iterator: Optional[_KeptIterator] = None
        self.checkpointer: Optional[Checkpointer] = None
        self._state_restored = False  # resumed, warm-started or started fresh by the first fit() call
        self._configured_lr: Optional[float] = None
        # Variable path -> factor applied to its unscaled gradient (e.g. a lower backbone rate when
        # fine-tuning; with SGD this equals a per-variable learning rate). Call
        # reset_step_functions() after changing it, or after freezing/unfreezing layers.
        self.grad_multipliers: Dict[Any, float] = {}

    def _check_ready_made_model(self, explicit_strategy: bool) -> None:
        """A model built before the Trainer keeps the dtype policy and device placement of that moment."""
        policy = self.precision.policy
        compute = precision_lib.compute_dtype(policy).name
        layers = list(self.model._flatten_layers(include_self=False, recursive=True))
        if policy != "float32" and layers and not any(layer.compute_dtype == compute for layer in layers):
            raise PrecisionError(
                f"The model was built before the Trainer set precision {policy!r}: all its layers compute in "
                f"{layers[0].compute_dtype}. Fix: pass a function that builds it (model=lambda: build_model()), "
                f"or build it after keras.mixed_precision.set_dtype_policy({policy!r})."
            )
        weights = [w.value if isinstance(w, keras.Variable) else w for w in self.model.weights]
        if explicit_strategy and weights and not self.strategy.extended.variable_created_in_scope(weights[0]):
            raise StrategyError(
                "The model's variables were created outside the strategy's scope, so they are not mirrored "
                "across its replicas. Fix: pass a function that builds the model (model=lambda: build_model()), "
                "or build it under strategy.scope()."
            )

    # ------------------------------------------------------------------------------------------
    # The step (one replica). Override these to change what a step does.
    # ------------------------------------------------------------------------------------------

    def compute_loss(self, x, y, y_pred, sample_weight=None) -> tf.Tensor:
        """Per-example loss averaged over the *global* batch, plus this replica's share of the
        regularization losses; summing it over replicas gives the mean loss."""
        per_example = tf.cast(self.loss(y, y_pred), tf.float32)
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
        loss = tf.nn.compute_average_loss(per_example, sample_weight=weight)  # weight: per example, rank unknown
        if self.model.losses:
            loss += tf.nn.scale_regularization_loss(tf.add_n([tf.cast(l, tf.float32) for l in self.model.losses]))
        return loss

    def compute_gradients(self, data):
        """Forward, loss (float32), scaled loss, gradients of the scaled loss, unscaled gradients."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self.model(x, training=True)
            loss = self.compute_loss(x, y, y_pred, sample_weight)
            scaled_loss = self.loss_scale.scale_loss(loss)
        scaled_grads = tape.gradient(scaled_loss, self.model.trainable_variables)
        unscaled_grads = self.loss_scale.unscale(scaled_grads)
        self._update_metrics(self.metrics, self.train_loss, loss, y, y_pred, sample_weight)
        return loss, unscaled_grads

    def apply_gradients(self, unscaled_grads, loss=None) -> None:
        """All-reduce, finite check, clip, apply (or skip), update the loss scale."""
        if self.strategy.num_replicas_in_sync > 1:
            unscaled_grads = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, unscaled_grads
            )
            if loss is not None:
                loss = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, loss)
        if self.grad_multipliers:
            factors = [self.grad_multipliers.get(v.path, 1.0) for v in self.model.trainable_variables]
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
        if self.loss_scale.enabled or self.precision.skip_nonfinite:
            self._apply_if_finite(unscaled_grads, finite)
        else:  # no wait for the finite check: updates start as soon as their gradients are ready
            self.optimizer.apply(unscaled_grads, self.model.trainable_variables)
        self.loss_scale.update(finite)

    def train_step(self, data) -> None:
        """One replica's training step on one batch."""
        loss, unscaled_grads = self.compute_gradients(data)
        self.apply_gradients(unscaled_grads, loss)

    def test_step(self, data) -> None:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self.model(x, training=False)
        loss = self.compute_loss(x, y, y_pred, sample_weight)
        self._update_metrics(self.eval_metrics, self.eval_loss, loss, y, y_pred, sample_weight)

    def _update_metrics(self, metrics, loss_tracker, loss, y, y_pred, sample_weight):
        batch = tf.cast(tf.shape(tf.nest.flatten(y)[0])[0], tf.float32)
        # `loss` is this replica's share of the global mean; × replicas gives its own batch mean.
        loss_tracker.update_state(loss * self.strategy.num_replicas_in_sync, sample_weight=batch)
        for metric in metrics.values():
            metric.update_state(y, y_pred, sample_weight=sample_weight)

    def _apply_if_finite(self, grads, finite) -> None:
        if self._tracing_xla:  # the whole step of one replica in XLA: no branch, no cross-replica decision
            self._apply_selected(grads, finite)
        elif tf.__internal__.distribute.strategy_supports_no_merge_call():
            self._apply_by_cond(grads, finite)
        else:
            # Mirrored-style strategies: a cond whose branch calls merge_call (as optimizer.apply does) is
            # not allowed in a replica context, so decide in the cross-replica context, as Keras'
            # LossScaleOptimizer does, and run the apply per replica from there.
            variables = self.model.trainable_variables

            def cross_replica(strategy, grads, finite):
                finite = strategy.experimental_local_results(finite)[0]
                tf.cond(
                    finite,
                    lambda: strategy.extended.call_for_each_replica(
                        lambda g: self.optimizer.apply(g, variables), args=(grads,)
                    ),
                    self._skip_update,
                )

            tf.distribute.get_replica_context().merge_call(cross_replica, args=(grads, finite))

    def _skip_update(self) -> None:
        """A skipped step still counts in `iterations`, so learning-rate schedules see the global step."""
        self.optimizer.iterations.assign_add(1)

    def _apply_by_cond(self, grads, finite) -> None:
        def apply():
            self.optimizer.apply(grads, self.model.trainable_variables)

        tf.cond(finite, apply, self._skip_update)

    def _apply_selected(self, grads, finite) -> None:
        """The skip without a branch, for a step compiled by XLA: apply, then put back the old value
        of every model and optimizer variable if the step was not finite. XLA fuses the update and the
        select into one in-place pass per variable; a tf.cond there makes it copy all the variables."""
        variables = self.model.trainable_variables
        state = [v for v in list(variables) + list(self.optimizer.variables) if v is not self.optimizer.iterations]
        before = [tf.convert_to_tensor(v) for v in state]  # read before the update (program order)
        self.optimizer.apply(grads, variables)  # `iterations` counts skipped steps too, as in _skip_update
        for v, old in zip(state, before):
            v.assign(tf.where(finite, tf.convert_to_tensor(v), old))

    # Gradient accumulation: K micro-batches per optimizer update ------------------------------

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

    # ------------------------------------------------------------------------------------------
    # Building and compiling
    # ------------------------------------------------------------------------------------------

    def _on_cpu(self) -> bool:
        return not tf.config.list_physical_devices("GPU") and not isinstance(self.strategy, tf.distribute.TPUStrategy)

    def _step_fits_one_cluster(self) -> bool:
        """One replica, no accumulation: the only case where the update can join the step's XLA cluster
        (the all-reduce's merge_call cannot live in one on every platform)."""
        return self.strategy.num_replicas_in_sync == 1 and self.config.grad_accum_steps == 1

    def _xla_whole_step(self) -> bool:
        """Whether XLA compiles the update with the rest of the step (where it can: _step_fits_one_cluster).
        Auto, measured on this 2-core CPU (`python scripts/bench_step.py --only xla_layout`): inside XLA
        the step of the small ResNet and Transformer is 2-13% faster (no op-by-op updates of dozens of
        small variables), outside it the MLP's (20M parameters in 6 variables) is 4-10% faster (TF's
        fused kernels run multi-threaded, XLA:CPU's loops do not keep up)."""
        possible = self._step_fits_one_cluster()
        if self.config.xla_whole_step is not None:
            if self.config.xla_whole_step and not possible:
                log.warning("trainer.xla_whole_step=true is ignored with several replicas or grad_accum_steps > 1")
            return self.config.xla_whole_step and possible
        if not possible:
            return False
        return not self._on_cpu() or self._mean_variable_size() < 1_000_000

    def _mean_variable_size(self) -> float:
        sizes = [v.shape.num_elements() for v in self.model.trainable_variables]
        return sum(sizes) / len(sizes) if sizes else 0.0

    def _resolve_jit_compile(self) -> bool:
        on_cpu = self._on_cpu()
        if self.precision.debug_numerics:  # its checks (DebugNumericSummaryV2) are ops XLA cannot compile
            if self.config.jit_compile:
                raise PrecisionError("precision.debug_numerics=true cannot run inside XLA: add trainer.jit_compile=false")
            if self.config.jit_compile is None:
                log.info("XLA: off (precision.debug_numerics=true checks every op, which XLA cannot compile)")
            return False
        if self.config.jit_compile is not None:
            if self.config.jit_compile and on_cpu and self.precision.policy == "mixed_bfloat16":
                precision_lib.advise_xla_bfloat16_on_cpu()
            return bool(self.config.jit_compile)
        if self.precision.policy == "mixed_float16" and on_cpu:
            log.info(
                "XLA: on (trainer.jit_compile=null means auto): TensorFlow's float16 kernels are very slow "
                "on CPUs, XLA's are not. trainer.jit_compile=false turns it off."
            )
            return True
        if (self.precision.policy == "mixed_bfloat16" and on_cpu and self.strategy.num_replicas_in_sync == 1
                and precision_lib.xla_bfloat16_is_faster_here()):  # measured on one replica of a 2-core CPU
            log.info(
                "XLA: on (trainer.jit_compile=null means auto): on an Intel CPU with AVX-512 BF16 and no AMX, "
                "TensorFlow's own bfloat16 matmuls are slow and XLA's are not (scripts/bench.py, trainer with XLA "
                "over without: MLP 1.43-1.48x, ResNet 1.17-1.28x, Transformer 1.40-1.45x). "
                "trainer.jit_compile=false turns it off."
            )
            return True
        return False

    def _make_loss_scale(self) -> LossScale:
        p = self.precision
        needs_scaling = p.policy == "mixed_float16" or (p.policy == "mixed_bfloat16" and p.scale_bfloat16)
        if not needs_scaling:
            if p.loss_scale is not None:
                log.info("precision.loss_scale is ignored for %s (no loss scaling)", p.policy)
            return LossScale("none")
        if p.loss_scale is not None:
            return LossScale("fixed", initial_scale=p.loss_scale, growth_interval=p.growth_interval)
        return LossScale("dynamic", initial_scale=p.initial_scale, growth_interval=p.growth_interval)

    def build(self, sample_batch) -> None:
        """Creates every variable before any step is traced: model (on a sample batch), float32-output
        check, optimizer slots (Keras builds them lazily, which fails inside tf.function under a
        distribution strategy) and the accumulators."""
        if self._built:
            return
        x, _, _ = keras.utils.unpack_x_y_sample_weight(sample_batch)
        with self.strategy.scope():
            outputs = self.model(tf.nest.map_structure(lambda t: t[:2], x), training=False)  # 2 examples suffice
            precision_lib.keep_layers_in_float32(self.model, self.precision.float32_layers)
            wrapped = precision_lib.ensure_float32_outputs(self.model, outputs, self.precision.strict_outputs)
            if wrapped is not self.model:
                wrapped(tf.nest.map_structure(lambda t: t[:2], x), training=False)  # build the wrapper
                self.model = wrapped
            if self.precision.policy != "float32":
                precision_lib.check_variables_float32(self.model)
                batch = tf.nest.flatten(x)[0].shape[0]
                precision_lib.warn_not_multiple_of_8(self.model, batch)
            self.optimizer.build(self.model.trainable_variables)
            log.info(
                "Model %s: %s parameters (%s trainable), compute dtype %s",
                self.model.name,
                f"{self.model.count_params():,}",
                f"{sum(int(np.prod(v.shape)) for v in self.model.trainable_variables):,}",
                self.precision.policy,
            )
            if self.config.grad_accum_steps > 1:
                # One per replica (ON_READ): each replica accumulates its own micro-batch gradients.
                self._accumulators = {
                    v.path: tf.Variable(
                        tf.zeros(v.shape, tf.float32),
                        trainable=False,
                        synchronization=tf.VariableSynchronization.ON_READ,
                        aggregation=tf.VariableAggregation.NONE,
                        name="grad_accumulator",
                    )
                    for v in self.model.trainable_variables
                }
        self._built = True

    def reset_step_functions(self) -> None:
        """Drops the traced step functions: the next loop traces again (after freezing/unfreezing
        layers or changing grad_multipliers, which are read at trace time)."""
        self._train_function = None
        self._eval_function = None

    def _wrap_xla(self, fn):
        """`fn` compiled with XLA (when on). With several replicas, one compiled function per replica:
        an XLA cluster lives on one device, and each replica's trace must capture its own variables."""
        if not self.jit_compile:
            return fn
        inner = fn

        def fn(*args):
            self._tracing_xla = True  # read at trace time by _apply_if_finite
            try:
                return inner(*args)
            finally:
                self._tracing_xla = False

        if self.strategy.num_replicas_in_sync == 1:
            return tf.function(fn, jit_compile=True, reduce_retracing=True)
        compiled = {}

        def per_replica(*args):
            replica = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
            if replica not in compiled:
                compiled[replica] = tf.function(fn, jit_compile=True, reduce_retracing=True)
            return compiled[replica](*args)

        return per_replica

    def _make_train_function(self):
        """strategy.run(step) × steps_per_loop inside one tf.function; XLA where TensorFlow allows it."""
        accum = self.config.grad_accum_steps
        compute_gradients, step, accumulate_step = self.compute_gradients, self.train_step, self.accumulate_step
        overridden = type(self).train_step is not Trainer.train_step
        custom_step = overridden and accum == 1
        if overridden and accum > 1:
            log.warning("The overridden train_step is not used with grad_accum_steps > 1 (accumulate_step and "
                        "apply_accumulated are)")
        if self.jit_compile and custom_step and not self._step_fits_one_cluster():
            log.warning("XLA: an overridden train_step with several replicas runs without XLA")
        elif self.jit_compile:
            if custom_step or self._xla_whole_step():
                # One XLA cluster for the whole step: forward, backward, metrics and the update, which
                # XLA fuses (a non-finite step is undone by a select: _apply_selected).
                if custom_step and self.config.xla_whole_step is False:
                    log.warning("trainer.xla_whole_step=false is ignored for an overridden train_step (it cannot be split)")
                log.info("XLA: the whole train step (forward, backward, update) is compiled (%s)",
                         "overridden train_step" if custom_step else "trainer.xla_whole_step")
                step = self._wrap_xla(self.train_step)
            else:
                # XLA compiles forward, backward, loss and metrics; the all-reduce and the (fused)
                # update run outside it.
                why = "several replicas or gradient accumulation"
                if self.config.xla_whole_step is False:
                    why = "trainer.xla_whole_step=false"
                elif self._step_fits_one_cluster():
                    why = (f"auto: on a CPU, variables averaging {self._mean_variable_size():,.0f} parameters update "
                           "faster with TF's fused kernels; trainer.xla_whole_step=true compiles the update too")
                log.info("XLA: forward and backward are compiled; all-reduce and the update run outside XLA (%s)", why)
                compute_gradients = self._wrap_xla(self.compute_gradients)

                def step(data):
                    loss, grads = compute_gradients(data)
                    self.apply_gradients(grads, loss)

                def accumulate_step(data):
                    _, grads = compute_gradients(data)
                    self._accumulate(grads)

        def one_update(iterator):
            if accum == 1:
                self.strategy.run(step, args=(next(iterator),))
            else:
                for _ in tf.range(accum):
                    self.strategy.run(accumulate_step, args=(next(iterator),))
                self.strategy.run(self.apply_accumulated)
            self.step.assign_add(1)

        def train_loop(iterator, num_steps):
            self.traces["train"] += 1  # Python side effect: runs once per trace
            for _ in tf.range(num_steps):
                one_update(iterator)

        return tf.function(train_loop)

    def _make_eval_function(self):
        step = self._wrap_xla(self.test_step)

        def eval_loop(iterator, max_batches):
            self.traces["eval"] += 1
            n = tf.constant(0, tf.int64)
            while n < max_batches:
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                self.strategy.run(step, args=(batch.get_value(),))
                n += 1
            return n

        return tf.function(eval_loop)

    def _distribute(self, data: DataArg, skip_batches: int = 0, training: bool = True):
        """A tf.data.Dataset (global batches) or an InputContext -> Dataset function (per-replica
        batches) -> a distributed data set. Training data repeats, and skips the batches already
        consumed: with a seeded shuffle the order is the same as in an uninterrupted run."""
        if isinstance(data, tf.data.Dataset):
            ds = data
            if training:
                ds = ds.repeat().skip(skip_batches)
            return self.strategy.experimental_distribute_dataset(ds)

        def fn(ctx):
            if training and skip_batches and getattr(data, "skips_itself", False):
                return data(ctx, skip_steps=skip_batches).repeat()  # data.py: DatasetFn
            ds = data(ctx)
            if training:  # a step takes one per-replica batch for each replica this pipeline feeds
                ds = ds.repeat().skip(skip_batches * (ctx.num_replicas_in_sync // ctx.num_input_pipelines))
            return ds

        return self.strategy.distribute_datasets_from_function(fn)

    # ------------------------------------------------------------------------------------------
    # The outer loop
    # ------------------------------------------------------------------------------------------

    def checkpoint_objects(self) -> Dict[str, Any]:
        """Everything a checkpoint must hold to continue exactly."""
        weights = {id(w) for w in self.model.weights}
        # Keras 3 layers keep their dropout RNG state (SeedGenerator) outside model.weights.
        seed_states = [v.value for v in self.model.variables if id(v) not in weights]
        objects = dict(
            model=self.model,
            optimizer=self.optimizer,
            step=self.step,
            loss_scale=self.loss_scale,
            rng=self.rng,
            best_metric=self.best,
            seed_states=seed_states,
        )
        return objects

    @staticmethod
    def total_steps(steps: Optional[int], epochs: Optional[float], steps_per_epoch: Optional[int]) -> int:
        candidates = []
        if steps:
            candidates.append(int(steps))
        if epochs:
            if steps_per_epoch is None:
                raise ConfigError("trainer.epochs needs a training set of known size; set trainer.max_steps")
            if steps_per_epoch < 1:
                raise ConfigError("trainer.epochs: an epoch of this training set is shorter than one step "
                                  "(data.batch_size x trainer.grad_accum_steps examples); lower them or set trainer.max_steps")
            candidates.append(int(math.ceil(epochs * steps_per_epoch)))
        if not candidates:
            raise ConfigError("say how long to train: trainer.max_steps or trainer.epochs (fit(steps=...))")
        return min(candidates)

    def fit(
        self,
        train_data: DataArg,
        eval_data: Optional[DataArg] = None,
        *,
        steps: Optional[int] = None,
        epochs: Optional[float] = None,
        steps_per_epoch: Optional[int] = None,
        batch_size: Optional[int] = None,
    ) -> Dict[str, float]:
        """Trains until `steps` (or `epochs`) and returns the final eval logs (or the last train logs).

        Resumes from `run_dir/checkpoints` when it holds checkpoints and `config.resume` is true.
        `steps_per_epoch` counts steps (optimizer updates): by default, the data set's batches over
        `config.grad_accum_steps`.
        """
        cfg = self.config
        steps = steps if steps is not None else cfg.max_steps
        epochs = epochs if epochs is not None else cfg.epochs
        if isinstance(train_data, tf.data.Dataset) and steps_per_epoch is None:
            card = int(train_data.cardinality())  # batches; a step reads grad_accum_steps of them
            steps_per_epoch = card // cfg.grad_accum_steps if card > 0 else None
        total = self.total_steps(steps, epochs, steps_per_epoch)
        self.total = total

        # Build every variable before restoring (restore matches them) and before tracing.
        kept = self._kept_iterator
        self._kept_iterator = None  # kept again only if this call ends normally
        if kept is None or kept.data is not train_data:
            if isinstance(train_data, tf.data.Dataset):
                probe = [iter(train_data)]
            else:  # what one replica of this strategy would be given
                probe = [iter(train_data(tf.distribute.InputContext(1, 0, self.strategy.num_replicas_in_sync)))]
            sample = next(probe[0])
            release_in_background(probe)  # its age includes filling a shuffle buffer: see data.py
            self.build(sample)
            self.batch_size = int(tf.nest.flatten(sample)[0].shape[0]) * (
                1 if isinstance(train_data, tf.data.Dataset) else self.strategy.num_replicas_in_sync
            )
            replicas = self.strategy.num_replicas_in_sync
            if isinstance(train_data, tf.data.Dataset) and self.batch_size % replicas:
                raise DataError(
                    f"The training batches ({self.batch_size} examples) do not split evenly over the {replicas} "
                    f"replicas, so the loss would be misweighted. Fix: a batch size that is a multiple of "
                    f"{replicas}, with .batch(..., drop_remainder=True) for the last one."
                )
        if batch_size:
            self.batch_size = batch_size
        self.stop_training = False  # a callback's stop ends one fit() call, not the later ones
        if not self._state_restored:  # a later fit() call: the model and optimizer in memory are the newest
            if self.run_dir is not None:
                self.checkpointer = Checkpointer(
                    self.run_dir / "checkpoints",
                    self.checkpoint_objects(),
                    keep=cfg.keep_checkpoints,
                    keep_best=cfg.keep_best,
                    best_metric=cfg.best_metric,
                    best_mode=cfg.best_mode,
                    is_chief=self.is_chief,
                )
                configured = self._configured_settings()
                if self.checkpointer.prepare(resume=cfg.resume, init_from=cfg.init_from, model=self.model) is not None:
                    self._keep_configured_settings(*configured)
                    if math.isnan(float(self.best.numpy())):  # saved before NO_BEST existed
                        self.best.assign(NO_BEST.get(cfg.best_mode, math.nan))
                self._configured_lr = configured[0]  # recorded with each checkpoint (_save)
            elif cfg.init_from:
                from trainer.checkpoint import warm_start

                warm_start(self.model, cfg.init_from)
            self._state_restored = True

        start = int(self.step.numpy())
        self.steps_per_epoch = steps_per_epoch
        if kept is not None and kept.data is train_data and kept.step == start:
            # A later fit() call on the same data continues where the last one ended.
            iterator, kept.iterator = kept.iterator, None
        else:
            if start:  # tf.data produces the skipped batches (reads, decodes) and drops them: it takes time
                log.info("Data: skipping the %d batches the first %d steps trained on, to resume in the same order",
                         start * cfg.grad_accum_steps, start)
            iterator = iter(self._distribute(train_data, skip_batches=start * cfg.grad_accum_steps))
        kept = None  # one not reused dies on the release thread (_KeptIterator.__del__)
        callbacks = CallbackList(default_callbacks(self) + self.callbacks.callbacks)
        callbacks.on_train_begin(self)

        eval_logs: Dict[str, float] = {}
        train_logs: Dict[str, float] = {}
        step = start
        window_start, window_step = time.perf_counter(), step
        last_ckpt_time = time.monotonic()
        self._reset(self.metrics, self.train_loss, self.grad_norm)
        self._nonfinite_at_start = self._skips_checked = int(self.loss_scale.skipped_steps.numpy())
        sigterm_before = signals.sigterm_handler_outside_deferral()
        preemption = self._preemption_handler()
        # Under multi-worker, TF's PreemptionCheckpointHandler owns SIGTERM (it makes every worker save
        # at the same step); we keep SIGINT. On GCP VMs it does not take SIGTERM (it polls maintenance
        # notices, or is unsupported): SIGTERM keeps its default there, as one worker cannot save alone.
        tf_owns_sigterm = preemption is not None and signals.sigterm_owned_by(preemption)
        interrupted = signals.SignalCatcher(signal.SIGINT) if preemption is not None else signals.SignalCatcher(signal.SIGTERM, signal.SIGINT)
        compile_seconds = None
        try:
            if tf_owns_sigterm:
                signals.hand_pending_sigterm_to_tensorflow()
            with interrupted:
                if interrupted.signum is not None:  # arrived during start-up: no step trained, nothing to save
                    raise TrainingInterrupted(signal.Signals(interrupted.signum).name)
                while step < total and not self.stop_training:
                    k = self._steps_to_next_event(step, total)
                    if self._train_function is None:  # first loop, or reset by a callback
                        self._train_function = self._make_train_function()
                    t0 = time.perf_counter()
                    self._train_function(iterator, tf.constant(k, tf.int64))
                    step += k
                    if compile_seconds is None:
                        compile_seconds = time.perf_counter() - t0
                        log.info("First loop (trace/compile + %d steps): %.2fs", k, compile_seconds)
                        window_start, window_step = time.perf_counter(), step
                    callbacks.on_loop_end(self, step)
                    self._check_numerics(step)  # before a preemption save: never save (and exit on) bad weights
                    if preemption is not None and step < total:  # at the end, the run finishes instead
                        with _tf_deprecation.silence():  # TF calls its own deprecated total_run_calls
                            preemption.save_checkpoint_if_preempted(step)
                    if step % max(cfg.log_every, 1) == 0 or step == total:
                        elapsed = time.perf_counter() - window_start
                        train_logs = self._train_logs(step, (step - window_step) * self.batch_size * cfg.grad_accum_steps, elapsed)
                        callbacks.on_log(self, step, train_logs)
                        window_start, window_step = time.perf_counter(), step
                    paused = time.perf_counter()  # evaluation and saving do not count as training time
                    if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                        eval_logs = self.evaluate(eval_data, step=step, callbacks=callbacks)
                        if self.checkpointer:
                            self.checkpointer.update_best(step, eval_logs)
                    due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or (
                        cfg.checkpoint_every_secs and time.monotonic() - last_ckpt_time >= cfg.checkpoint_every_secs
                    )
                    if self.checkpointer and due and step < total:
                        self._save(step)
                        last_ckpt_time = time.monotonic()
                    window_start += time.perf_counter() - paused
                    if interrupted.signum is not None and step < total:
                        raise TrainingInterrupted(signal.Signals(interrupted.signum).name)
                if step == start >= total:  # a finished run started again: no new rows, no new save
                    log.info("The run is already at step %d of %d: nothing to train (raise trainer.max_steps to "
                             "continue it).", step, total)
                    if eval_data is not None:
                        eval_logs = self.evaluate(eval_data, step=step)
                else:
                    if eval_data is not None:
                        eval_logs = self.evaluate(eval_data, step=step, callbacks=callbacks)
                        if self.checkpointer:
                            self.checkpointer.update_best(step, eval_logs)
                    if self.checkpointer:
                        self._save(step)
                    if interrupted.signum is not None:  # a checkpoint at the last step means the run is complete
                        log.warning("Received %s during the last loop: finished the run (final evaluation and save) "
                                    "instead of stopping one loop early.", signal.Signals(interrupted.signum).name)
        except _PreemptedAndSaved as e:
            log.warning(
                "Preemption notice at step %d (%s or the platform's maintenance notice to a worker of this run): "
                "every worker saved step %d; run the same commands again to resume.", step, e, step,
            )
            callbacks.on_train_end(self, {"step": step, "interrupted": True})
            raise
        except TrainingInterrupted as e:
            if step == start:
                log.warning("Received %s at step %d, before this run trained a step: nothing new to save; run the "
                            "same command again to %s.", e, step, "resume" if start else "start")
            elif self.checkpointer:
                path = self._save(step)
                log.warning("Received %s at step %d: saved %s; run the same command again to resume.", e, step, path)
            else:
                log.warning("Received %s at step %d: stopping (no run folder, nothing saved).", e, step)
            callbacks.on_train_end(self, {"step": step, "interrupted": True})
            raise
        except BaseException as e:  # writers and the progress bar are closed; the error goes on unchanged
            try:
                callbacks.on_train_end(self, {"step": step, "failed": f"{type(e).__name__}: {e}"[:500]})
            except Exception:  # noqa: BLE001 - never hide the error that ended the run
                log.exception("A callback's on_train_end failed while fit() was ending on an error")
            raise
        finally:
            if tf_owns_sigterm:  # TF's handler must not outlive this fit() (it would swallow later SIGTERMs)
                signals.restore_sigterm(sigterm_before)
        summary = {**train_logs, **{f"eval_{k}": v for k, v in eval_logs.items() if k not in ("step", "split")}}
        summary["step"] = step
        summary["traces"] = dict(self.traces)
        if self.run_dir is not None or self.strategy.extended._in_multi_worker_mode():
            # 0.1-0.2 s per 20M parameters: for runs that write a summary, not for every fit() call.
            summary["weights_sha256"] = self.weights_fingerprint()
        self._kept_iterator = _KeptIterator(train_data, step, iterator)
        if compile_seconds is not None:
            summary["first_loop_seconds"] = compile_seconds
        callbacks.on_train_end(self, summary)
        return eval_logs or train_logs

    def _configured_settings(self):
        """A constant learning rate and a none/fixed loss scale: values a restore would overwrite."""
        lr = self.optimizer._learning_rate
        constant_lr = float(keras.ops.convert_to_numpy(lr)) if isinstance(lr, keras.Variable) else None
        return constant_lr, float(self.loss_scale.scale.numpy())

    def _configured_record(self) -> Path:
        return self.run_dir / "checkpoints" / "configured.json"

    def _keep_configured_settings(self, constant_lr, scale) -> None:
        """After a resume, a learning rate changed in the configuration (since the newest checkpoint's run,
        per checkpoints/configured.json) and a fixed scale win over the checkpoint's values; a rate that a
        callback changed during the run is kept (a schedule is code and follows the config anyway). A
        dynamic scale's value is state and is kept, unless it is 1: the value of a run without loss
        scaling (float32 resumed as float16) or at the floor; it restarts at its initial value then."""
        try:
            recorded = json.loads(self._configured_record().read_text()).get("lr")
        except (OSError, ValueError, AttributeError):  # none (a run from before this record) or unreadable
            recorded = None  # then the configuration wins, as it did before
        if constant_lr is not None and recorded != constant_lr:
            restored = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
            if restored != constant_lr:
                self.optimizer.learning_rate = constant_lr
                log.info("Learning rate %g from the configuration (the checkpoint had %g)", constant_lr, restored)
        restored = float(self.loss_scale.scale.numpy())
        if restored != scale and (self.loss_scale.mode != "dynamic" or restored <= 1.0):
            self.loss_scale.scale.assign(scale)
            log.info("Loss scale %g from the configuration (the checkpoint had %g)", scale, restored)

    def _preemption_handler(self):
        """TF's preemption support for multi-worker runs: on SIGTERM to any worker, every worker saves at
        the same step, then raises _PreemptedAndSaved. TF decides when; our Checkpointer saves (non-finite
        guard, temporary folders for non-chief workers, retention). TF's handler also wants a checkpoint
        manager, which it restores at once: it gets one over an empty scratch folder, because prepare()
        has already restored (with its fallback past unreadable checkpoints)."""
        if self.checkpointer is None or not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return None

        def exit_fn():
            raise _PreemptedAndSaved("SIGTERM")

        scratch = tempfile.mkdtemp(prefix="trainer-preemption-")
        try:
            handler = tf.distribute.experimental.PreemptionCheckpointHandler(
                self.strategy.cluster_resolver,
                tf.train.CheckpointManager(self.checkpointer.checkpoint, scratch, max_to_keep=1),
                termination_config=tf.distribute.experimental.TerminationConfig(
                    exit_fn=exit_fn, save_fn=lambda step: self._save(step)
                ),
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("Multi-worker preemption handling on: SIGTERM to any worker saves a checkpoint on all, then exits")
        return handler

    def weights_fingerprint(self) -> str:
        """SHA-256 of all model weights: equal on every worker of a run, and across bit-identical runs."""
        import hashlib

        digest = hashlib.sha256()
        for w in self.model.weights:
            digest.update(keras.ops.convert_to_numpy(w).tobytes())
        return digest.hexdigest()[:16]

    def _steps_to_next_event(self, step: int, total: int) -> int:
        cfg = self.config
        k = min(cfg.steps_per_loop, total - step)
        for every in (cfg.log_every, cfg.eval_every, cfg.checkpoint_every):
            if every:
                k = min(k, every - step % every)
        return max(k, 1)

    def _reset(self, metrics, *trackers):
        for m in list(metrics.values()) + list(trackers):
            m.reset_state()

    def _train_logs(self, step: int, examples: int, seconds: float) -> Dict[str, float]:
        logs = {"step": step, "split": "train", "loss": float(self.train_loss.result())}
        logs.update({name: float(m.result()) for name, m in self.metrics.items()})
        # nan when no step was timed in this window (the first loop, with its compile time, is not timed)
        logs["examples_per_sec"] = examples / seconds if examples > 0 and seconds > 0 else float("nan")
        logs["grad_norm"] = float(self.grad_norm.result())
        logs["lr"] = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        if self.loss_scale.enabled:
            logs["loss_scale"] = float(self.loss_scale.scale.numpy())
        logs["skipped_steps"] = int(self.loss_scale.skipped_steps.numpy())
        self._reset(self.metrics, self.train_loss, self.grad_norm)
        return logs

    def _check_numerics(self, step: int) -> None:
        ls = self.loss_scale
        consecutive = int(ls.consecutive_skips.numpy())
        at_floor = int(ls.skips_at_floor.numpy())
        limit = self.precision.max_consecutive_skips
        applied_nonfinite = not ls.enabled and not self.precision.skip_nonfinite
        if applied_nonfinite and int(ls.skipped_steps.numpy()) > self._nonfinite_at_start:
            raise NumericalError(
                f"Stopping at step {step}: a step had a non-finite loss or gradients and, with "
                "precision.skip_nonfinite=false, was applied: the weights are no longer finite and are not "
                "saved. The last good checkpoint is intact; precision.skip_nonfinite=true skips such steps. "
                "To find the cause: a lower optimizer.lr, optimizer.clipnorm=1.0, or "
                "precision.debug_numerics=true to name the first bad op."
            )
        skipped = int(ls.skipped_steps.numpy())
        if skipped > self._skips_checked:  # a skip undoes the update, not what the forward pass assigned
            self._skips_checked = skipped
            self._check_weights_finite(step)
        if consecutive >= limit or at_floor >= 5:
            why = (
                f"the dynamic loss scale is at its floor of 1 and {at_floor} more steps still overflowed"
                if at_floor >= 5
                else f"{consecutive} consecutive steps had non-finite loss or gradients (limit: precision.max_consecutive_skips={limit})"
            )
            raise NumericalError(
                f"Stopping at step {step}: {why}; {int(ls.skipped_steps.numpy())} steps skipped in all. "
                "The model is producing inf/NaN, not just float16 overflow. Try: a lower optimizer.lr, "
                "optimizer.clipnorm=1.0, precision=mixed_bfloat16 or float32, precision.float32_layers=[...] "
                "for LayerNorm/Softmax, or precision.debug_numerics=true to name the first bad op. "
                "The last good checkpoint is intact."
            )

    def _check_weights_finite(self, step: int) -> None:
        bad = non_finite_weights(self.model)
        if bad:
            raise NumericalError(
                f"Stopping at step {step}: the model's weights are no longer finite ({len(bad)} of them, e.g. "
                f"{bad[:3]}) and are not saved; the last good checkpoint is intact. Skipping a non-finite step "
                "undoes its update, but not what its forward pass assigned: BatchNormalization's moving "
                "statistics take in a NaN or inf batch as it passes. Check the input data for NaN/inf; or "
                "try a lower optimizer.lr, optimizer.clipnorm=1.0, or precision.debug_numerics=true to name "
                "the first bad op."
            )

    def _save(self, step: int) -> Optional[str]:
        """Saves a checkpoint; non-finite weights end the run (exit 3) instead of a save that is refused.
        With it, the configured constant learning rate (see _keep_configured_settings): written only once
        a checkpoint holds that run's state, and after every worker has read the old record at its start."""
        self._check_weights_finite(step)
        path = self.checkpointer.save(step)
        if path is not None and self._configured_lr is not None:  # the chief's save
            record = self._configured_record()
            record.with_suffix(".tmp").write_text(json.dumps({"lr": self._configured_lr}))
            os.replace(record.with_suffix(".tmp"), record)
        return path

    def evaluate(self, eval_data: DataArg, *, steps: Optional[int] = None, step: Optional[int] = None, callbacks=None) -> Dict[str, float]:
        """Computes the loss and metrics over the whole eval set (or `steps` batches)."""
        if self._eval_function is None:
            self._eval_function = self._make_eval_function()
        self._reset(self.eval_metrics, self.eval_loss)
        steps = steps or self.config.eval_steps
        holder = [iter(self._distribute(eval_data, training=False))]  # its only reference: see the end
        bar = None
        if self.config.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
        done, chunk = 0, 25  # batches per call: the bar moves while the loop stays in the graph
        while steps is None or done < steps:
            want = chunk if steps is None else min(chunk, steps - done)
            n = int(self._eval_function(holder[0], tf.constant(want, tf.int64)))
            done += n
            if bar is not None:
                bar.update(n)
            if n < want:
                break
        if bar is not None:
            bar.close()
        release_in_background(holder)  # destroying it can wait for tf.data's autotuner (see data.py)
        logs = {"step": int(self.step.numpy()) if step is None else step, "split": "eval", "loss": float(self.eval_loss.result())}
        logs.update({name: float(m.result()) for name, m in self.eval_metrics.items()})
        if callbacks is not None:
            callbacks.on_eval_end(self, logs["step"], logs)
        return logs
