"""The Trainer: a facade over the step (step.py), the update per optimizer (update.py), compiling
(step_functions.py), input (inputs.py), the outer loop (loop.py) and callbacks (callbacks/).

Three layers, as in Orbit and Keras' own trainer:
  * `train_step(data)` / `test_step(data)`: one replica's work. Override them, or `compute_loss`, in a
    subclass; research code with several models and optimizers calls `self.update(loss, tape, name)`.
  * step_functions.py wraps the step in `strategy.run`, loops it `steps_per_loop` times inside one
    `tf.function`, and applies XLA: the only place that compiles anything.
  * `fit`: input, callbacks, and loop.py's loop (logging, evaluation, checkpoints, signals).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import keras
import tensorflow as tf

from trainer import (auto_precision, components, data_position, debug, ema, evalsets, keras_compat, metric_attributes,
                     model_build, model_steps, saved, signals, step_functions)
from trainer import loop as loop_lib
from trainer import loss_fit
from trainer import precision as precision_lib
from trainer.accumulation import check_accumulation
from trainer.arrays import evaluate_inputs, fit_arguments, fit_inputs
from trainer.callbacks import (Callback, CallbackList, Checkpointing, DivergenceGuard, NumericalError, XlaChoice,
                               callback_list, loop_host_callbacks)
from trainer.callbacks.base import callback_objects
from trainer.checkpoint import NO_BEST, Checkpointer
from trainer.config import PrecisionConfig, TrainerConfig, check_ranges
from trainer.console import show_logs_unless_configured
from trainer.distribute import say_strategy_once, strategy_argument
from trainer.frozen_watch import FrozenWatch
from trainer.inputs import (DataArg, KeptIterator, batches_read_per_step, check_batches_per_step, sample_batch,
                            steps_per_epoch_of, total_steps, training_iterator, warn_if_epochs_cut)
from trainer.evaluating import evaluate
from trainer.loop import Loop, TrainingInterrupted
from trainer.memory import memory_logs
from trainer.keras_callbacks import refuse_fit_callbacks
from trainer.other_tools import check_keras_keywords, check_trainer_options, predict_data
from trainer.runlock import run_folder_lock
from trainer.step import Step
from trainer.tracking import Window
from trainer.trainer_properties import TrainerProperties
from trainer.user_traceback import user_errors_shown_short
from trainer.xla_measure import XlaMeasurement
from trainer.xla_plan import XlaPlan, decide_jit_compile

log = logging.getLogger("trainer.core")  # its old module name: the log channel README and docs show

__all__ = ["NumericalError", "Trainer", "TrainingInterrupted"]


class Trainer(TrainerProperties, Step):
    """Trains Keras models with tf.function steps, mixed precision and a tf.distribute strategy.

    Args:
      model: a keras.Model, or a zero-argument function that builds one (preferred: it is then built
        under the strategy scope and after the dtype policy is set).
      loss: a Keras loss (called per example and averaged over the global batch: a reduction='sum' is
        replaced, with a warning), a function (y, y_pred) -> per-example, or None (only the model's
        `add_loss` losses, or an overridden train_step's).
      optimizer: a Keras optimizer or a zero-argument function that builds one; with several models, a
        function, called once per model.
      metrics: Keras metrics (or builders), or a mapping name -> metric; computed on train and eval.
      models: instead of `model`, several: name -> model (or builder), or a function returning that dict.
        Each must have its variables (a keras.Input, or built in its builder).
      optimizers: name -> optimizer (or builder); each trains the model of the same name.
      frozen: names of models that do not train (a distillation's teacher): no optimizer, not in checkpoints or
        the weights fingerprint; their weights come from their builder or init_from on every run. It sets
        trainable=False on the user's model for good (BatchNorm then uses its moving statistics; Dropout stays
        active under training=True).
      strategy: a tf.distribute.Strategy, or as the CLI names it: "mirrored", {"name": "mirrored", "logical_cpus": 2}
        (distribute.strategy_argument); default: TensorFlow's current strategy.
      precision: a policy name ("float32", "mixed_float16", "mixed_bfloat16", "auto"), a PrecisionConfig, a
        dict of its fields, or a Keras dtype policy (keras.mixed_precision.Policy: by its name). Default float32,
        or mixed_float16 for a ready-made model made under that policy (precision.for_ready_made).
      run_dir: where metrics.jsonl, checkpoints/ and tensorboard/ go; None: nothing is written.
      callbacks: extra Callback objects, or one (the progress bar is added from `config`); Keras' callbacks are
        refused, naming the Trainer's way (trainer/keras_callbacks.py).
      loggers: where each train log and evaluation is recorded (trainer.callbacks.loggers: MetricsWriter,
        TensorBoardWriter, CSVLogger, MLflowLogger); None: metrics.jsonl and TensorBoard in `run_dir`
        (config.tensorboard=False: without TensorBoard). Only the chief worker's loggers write.
      config: loop settings (TrainerConfig); keyword `options` override single fields of it.
      seed: seeds Python, NumPy, TensorFlow and Keras, the data order and the step RNG.
      clipnorm: clip each optimizer's unscaled gradients to this global norm before applying them.
    """

    def __init__(self, model=None, loss=None, optimizer=None,
                 metrics: Union[Sequence[Any], Mapping[str, Any], None] = None, *,
                 models=None, optimizers: Optional[Mapping[str, Any]] = None, frozen: Iterable[str] = (),
                 strategy: Union[tf.distribute.Strategy, str, Mapping[str, Any], None] = None,
                 precision: Union[str, PrecisionConfig, Mapping[str, Any], keras.DTypePolicy, None] = None,
                 run_dir: Union[str, Path, None] = None, callbacks: Union[Callback, Iterable[Callback], None] = (),
                 loggers: Union[Callback, Iterable[Callback], None] = None,
                 config: Optional[TrainerConfig] = None, seed: int = 0, clipnorm: Optional[float] = None,
                 is_chief: bool = True, **options):
        check_trainer_options(type(self), options)  # max_step, max_epochs: the one meant, not the dataclass's error
        callbacks = callback_objects(callbacks, "callbacks")  # one alone too; a Keras callback is refused
        self.loggers = callback_objects(loggers, "loggers") if loggers is not None else None
        self.config = dataclasses.replace(config or TrainerConfig(), **options)
        self.best_metric_given = "best_metric" in options  # Trainer(best_metric="accuracy"): no default's switch
        check_batches_per_step(type(self), self.config)  # before any data or model is built
        show_logs_unless_configured(self.config.verbose)  # construction logs (the optimizer's kernels) show too
        self.precision = precision_lib.precision_config("float32" if precision is None else precision)
        strategy = strategy_argument(strategy)  # None for "default": TensorFlow's current one
        self.strategy = strategy or tf.distribute.get_strategy()
        # fast_dev_run writes nothing and reads no checkpoint: as if there were no run folder (trainer/debug.py)
        self.run_dir = Path(run_dir) if run_dir is not None and not self.config.fast_dev_run else None
        # policy=auto: this machine's answer, or on a resume the policy the run trained in
        self.precision = auto_precision.resolve(self.precision, self.strategy, run_dir=self.run_dir)
        self.precision = precision_lib.for_ready_made(model, self.precision, given=precision is not None)
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            signals.reclaim_sigterm_from_tensorflow()  # its coordination service's handler swallows SIGTERM
        self.is_chief, self.seed, self.clipnorm = is_chief, seed, clipnorm
        self.stop_training = False  # a callback may set it; the loop stops after the current loop
        self.resume_command: Optional[str] = None  # the CLI sets it: the command line that resumes this run
        self.sweep_job = False  # the CLI sets it in a multirun: a finished job run again is the sweep's rerun
        # the command line's entry points set it (assemble.Parts.build): an error's fix then names the override
        # (trainer.best_metric=...), else the Python argument (Trainer(best_metric=...))
        self.from_cli = False
        self.hparams: Dict[str, Any] = {}  # the CLI sets it: the composed config, flattened (MLflow's params)

        self._set_process_state(seed)

        self._make_parts(model, models, loss, optimizer, optimizers, metrics, frozen,
                         strategy_given=strategy is not None)
        self._step_functions = step_functions.StepFunctions(decide_jit_compile(
            self.config, self.precision, on_cpu=self._on_cpu(), replicas=self.strategy.num_replicas_in_sync))
        self.callbacks = CallbackList(callbacks)
        self.checkpointing = Checkpointing()
        self.divergence = DivergenceGuard()  # the run's reference loss and rollbacks, across fit() calls
        self.xla_choice = XlaChoice()  # trainer.jit_compile=measure's figures and choice, across fit() calls
        self.checkpointer: Optional[Checkpointer] = None  # made by the first fit() with a run_dir
        self.callback_list = CallbackList([])  # the current fit() call's, with the built-ins
        self._built = False
        self._accumulators = None
        self._kept_iterator: Optional[KeptIterator] = None
        self._fit_eval_limit = None  # (eval data, config, batches or None): from debug.plan_fit
        self._fit_inputs, self.eval_set_names = None, None  # fit()'s last arguments made ready; named eval sets
        self.last_train_logs: Dict[str, Any] = {}  # what a later fit() with nothing to train returns (no eval data)
        self.eval_batches: Optional[int] = None  # global batches the last evaluation read
        self.eval_counts: Dict[Optional[str], Dict[str, float]] = {}  # the last evaluation's, per set (None: one)

    def _make_parts(self, model, models, loss, optimizer, optimizers, metrics, frozen, strategy_given: bool) -> None:
        """The models, optimizers, metrics and the variables a checkpoint holds, made under the strategy's scope
        (a model builder runs there, after the dtype policy is set); then the per-example loss.
        `strategy_given`: Trainer(strategy=...) named one: a ready-made model is checked against it, and
        ready-made metrics are made anew so that their variables belong to it."""
        with self.strategy.scope():
            self.models: Dict[str, keras.Model] = components.make_models(model, models)
            if model is not None and self.models.get("model") is model:  # ready-made: built before the Trainer
                components.check_ready_made_model(model, self.precision.policy, self.strategy, strategy_given)
            loss, optimizer, optimizers, metrics = keras_compat.keras_arguments(  # Keras' names; a compiled model's
                self.models, model is not None, loss, optimizer, optimizers, metrics)
            self.frozen = components.freeze(frozen, self.models, optimizers)  # docs/research.md, Frozen models
            # a model's own train_step/test_step/compute_loss, which no step of the Trainer calls: model_steps.py
            model_steps.check_model_steps(type(self), self.models, self.frozen, "models" if model is None else "model")
            self._frozen_builders = components.frozen_builders(models, self.frozen)
            # the frozen models' weights kept as they started, and their random-weights warning: frozen_watch.py
            self.frozen_watch = FrozenWatch()
            trained = [n for n in self.models if n not in self.frozen]
            self.optimizers = components.make_optimizers(optimizer, optimizers, trained, self.strategy)
            self.train_metrics, self.eval_metrics = components.make_metrics(metrics, remake=strategy_given)
            self.train_loss = keras.metrics.Mean(name="loss")
            self.eval_loss = keras.metrics.Mean(name="loss")
            # Keras metrics a subclass holds itself (self.loss_tracker), adopted at fit(): metric_attributes.py
            self.attribute_metrics = metric_attributes.AttributeMetrics()
            # what a log window reports: the loss, the metrics and an overridden step's logs (its step_logs)
            self.train_window = Window(self.train_loss, self.train_metrics, {}, self.attribute_metrics.adopted)
            self.eval_window = Window(self.eval_loss, self.eval_metrics, {}, self.attribute_metrics.adopted)
            self._evaluating = False  # self.metrics is the eval metrics while evaluate() runs (and traces)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            self.rng = tf.random.Generator.from_seed(self.seed)  # for recipes' augmentation seeds
            # No best yet: the worst finite value (NaN would trip precision.debug_numerics on every read); for
            # best_mode=auto set when fit() decides the mode (callbacks/checkpointing.py)
            self.best = tf.Variable(NO_BEST.get(self.config.best_mode, NO_BEST["max"]), dtype=tf.float32,
                                    trainable=False, name="best_metric")
            # Variable path -> factor applied to its unscaled gradient (a lower backbone rate when fine-tuning).
            # Read at trace time; a change (or a change of `trainable`) is noticed before the next loop, which
            # traces the train step again (step_functions.py, trace_inputs.py).
            self.grad_multipliers: Dict[Any, float] = {}
            self.updaters = components.make_updaters(self, self.clipnorm)
        self.default_optimizer = next(iter(self.optimizers)) if len(self.optimizers) == 1 else None
        self.loss = components.per_example_loss(loss)

    def _set_process_state(self, seed: int) -> None:
        """TensorFlow's and Keras' process-wide settings this Trainer asks for, before any layer exists."""
        if self.config.deterministic:
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(seed)
        precision_lib.set_policy(self.precision.policy)
        if self.precision.policy == "mixed_float16" and self._on_cpu():  # before TensorFlow's line at the first op
            precision_lib.warn_float16_on_cpu()
        if self.precision.debug_numerics:
            tf.debugging.enable_check_numerics()

    # -- building and compiling -------------------------------------------------------------------

    def build(self, sample_batch) -> None:
        """Creates every variable before any step is traced: the model (on a sample batch), the
        float32-output check, every optimizer's slots (model_build.build_variables) and the accumulators."""
        if self._built:
            return
        if len(self.models) == 1 and type(self).train_step is Step.train_step:
            self._unpack(sample_batch)  # unlabelled data for a loss that needs labels: say so before tracing
        wrapped = model_build.build_variables(self, sample_batch)
        if wrapped is not None:
            self.model = wrapped
        with self.strategy.scope():
            if self.config.grad_accum_steps > 1:
                self._make_accumulators()
            self.frozen_watch.random = components.random_frozen(self._frozen_builders, self.models,
                                                                self.config.init_from)
        self._built = True

    def _on_cpu(self) -> bool:
        return precision_lib.device_kind(self.strategy) == "CPU"

    @property
    def xla_measurement(self) -> Optional[XlaMeasurement]:
        """What trainer.jit_compile=measure found (also when restored from a checkpoint); None before."""
        return self.xla_choice.measurement

    def plan_xla(self) -> XlaPlan:
        """How the train step is (or will be) compiled, and why: see xla_plan.plan_xla."""
        return step_functions.plan_of(self)

    def reset_step_functions(self) -> None:
        """Drops the traced step functions: the next loop traces again (after changing a Python value the step
        reads at trace time; `trainable` and grad_multipliers are noticed without it)."""
        step_functions.reset(self)

    def checkpoint_objects(self) -> Dict[str, Any]:
        """Everything a checkpoint must hold to continue exactly (trainer/saved.py)."""
        return saved.checkpoint_objects(self)

    # -- the loop ---------------------------------------------------------------------------------

    total_steps = staticmethod(total_steps)  # how long a fit() call trains: trainer/inputs.py

    @user_errors_shown_short
    def fit(self, train_data: Optional[DataArg] = None, eval_data: Optional[DataArg] = None, /, *,
            steps: Optional[int] = None, epochs: Optional[float] = None, steps_per_epoch: Optional[int] = None,
            batch_size: Optional[int] = None, validation_data=None, validation_split: Optional[float] = None,
            class_weight: Optional[Mapping] = None, sample_weight=None, shuffle: Optional[bool] = None,
            validation_batch_size: Optional[int] = None, **keywords) -> Dict[str, float]:
        """Trains until `steps` (or `epochs`: totals, unlike Keras) and returns the final eval logs (or train logs).

        `train_data`: a tf.data.Dataset, an InputContext -> Dataset function, or arrays x: then the second argument
        is y, as in Keras' fit(x, y, ...) (trainer/arrays.py; `x=`, `y=` and `eval_data=` as keywords too). `eval_data`
        (`validation_data`): one set, or a dict name -> set, logged as `<name>/<metric>` (evalsets.py). Resumes from
        `run_dir/checkpoints` when it holds checkpoints and `config.resume` is true. `steps_per_epoch`: by default,
        batches // the batches a step reads.
        """
        check_ranges(TrainerConfig, {"max_steps": steps, "epochs": epochs}, "trainer",  # fit()'s own
                     {"max_steps": "fit(steps=...)", "epochs": "fit(epochs=...)"})
        # when training starts, before the data; not at Trainer(): evaluating a run made one too (trainer_for)
        check_accumulation(self, self.config, cli=self.from_cli)
        show_logs_unless_configured(self.config.verbose)
        say_strategy_once(self.strategy)
        keras_callbacks = keywords.pop("callbacks", None)  # Keras' place for them: refused below, with an epoch's steps
        train_data, eval_data = fit_arguments(train_data, eval_data, keywords, self.fit)
        self._fit_inputs = fit_inputs(self._fit_inputs, self.seed, train_data, eval_data, batch_size,
                                      validation_data=validation_data, validation_split=validation_split,
                                      class_weight=class_weight, sample_weight=sample_weight, shuffle=shuffle,
                                      validation_batch_size=validation_batch_size)
        made, per_step = self._fit_inputs[1], batches_read_per_step(self.config)
        epoch_steps = made.steps_per_epoch(steps_per_epoch, per_step)
        refuse_fit_callbacks(keras_callbacks, epoch_steps or steps_per_epoch_of(made.train, per_step))
        if (made.train_examples and steps is None and epochs is None
                and not (self.config.max_steps or self.config.epochs)):
            epochs = 1  # Keras' default, for arrays (their size is known)
        with (run_folder_lock(self.run_dir, hold=self.is_chief, remove_unused=True) if self.run_dir is not None
              else contextlib.nullcontext()):
            return self._fit(made.train, made.eval, steps, epochs, epoch_steps, batch_size or made.batch_size)

    def _fit(self, train_data, eval_data, steps, epochs, steps_per_epoch, batch_size) -> Dict[str, float]:
        cfg = self.config
        if steps_per_epoch is None:
            steps_per_epoch = steps_per_epoch_of(train_data, batches_read_per_step(cfg))
        steps_per_epoch = debug.steps_per_epoch(cfg, steps_per_epoch)  # overfit_batches: an epoch is those batches
        limits = (steps if steps is not None else cfg.max_steps, epochs if epochs is not None else cfg.epochs)
        self.total = 0 if cfg.fast_dev_run else self.total_steps(  # fast_dev_run: debug.plan_fit says how long
            *limits, steps_per_epoch, cli=self.from_cli, epochs_from="fit" if epochs is not None else "Trainer")
        if not cfg.fast_dev_run:
            warn_if_epochs_cut(*limits, steps_per_epoch, steps, epochs, cli=self.from_cli)
        self.steps_per_epoch = steps_per_epoch
        self.data_pass_batches = data_position.pass_batches(  # the CLI's: train_examples // batch_size
            cfg, train_data, getattr(self, "data_pass_batches", None) if self.from_cli else None)
        train_data, eval_data, self.total, self._fit_eval_limit = debug.plan_fit(self, train_data, eval_data,
                                                                                 self.total)
        kept, self._kept_iterator = self._kept_iterator, None  # kept again only if this call ends normally
        if kept is None or kept.data is not train_data:  # build every variable before restoring and tracing
            sample, self.batch_size = sample_batch(train_data, self.strategy)
            self.build(sample)
        loss_fit.check_class_weight(self._fit_inputs and self._fit_inputs[1].class_weight, self.models, self.from_cli)
        if batch_size:
            self.batch_size = batch_size
        if eval_data is not None and type(self).test_step is Step.test_step and (
                len(self.models) > 1 or (self.loss is None and not self.model.losses)):
            raise TypeError("Trainer: evaluation with the default test_step needs one model and a loss "
                            "(Trainer(loss=...) or add_loss); override test_step, returning a dict of "
                            "logs, or give no eval data")
        self.stop_training = False  # a callback's stop ends one fit() call, not the later ones
        self.eval_set_names = evalsets.names_of(eval_data)  # None: one set, plain names (monitors read them)
        self.callback_list = callbacks = callback_list(self, self.callbacks.callbacks)
        callbacks.check_state()
        callbacks.check_monitors(self)  # before any callback writes into the run folder
        callbacks.on_train_begin(self)  # Checkpointing first: resume or warm start
        ema.start_averages(self)  # after a warm start; a resume keeps the checkpoint's averages
        start = int(self.step.numpy())
        metric_attributes.adopt(self)  # the Keras metrics held as attributes restart with the windows from now
        self._reset_train_trackers()
        held, kept = [kept], None  # one not reused dies on the release thread once the loop made its own

        def make_iterator():
            return training_iterator(train_data, self.strategy, start, self.checkpointing.data_position(), held.pop(),
                                     self.run_dir is not None and (start > 0 or self.config.deterministic),
                                     self.checkpointing.other_examples)

        loop = Loop(self, callbacks, make_iterator, eval_data, self.total, request=(steps, epochs))
        train_logs, eval_logs, step = loop.run()
        with loop.interrupted:  # a signal from here to the summary's end (the loggers' ends) waits for it too
            summary = loop.summary()
            self._kept_iterator = KeptIterator(train_data, step, loop.iterator, self.strategy.num_replicas_in_sync)
            callbacks.on_train_end(self, summary)
        self.frozen_watch.at_fit_end(self)
        return eval_logs or train_logs

    def run_steps(self, num_steps: int, *, loop: bool = False) -> int:
        """`num_steps` more train steps on the last fit() call's data, for benchmarks; returns how many ran. loop=False:
        the compiled loop alone (Orbit's train(n); the data position counts them). loop=True, without a run folder:
        the loop's windows with its host work only (guards, train logs when due; not loggers or your callbacks; a
        guard may stop early), what the doctor times. A later fit() on the same data continues after them."""
        return loop_lib.run_steps(self, self._kept_iterator, num_steps, loop_host_callbacks(self) if loop else None)

    def _reset_train_trackers(self) -> None:
        self.train_window.restart()
        for updater in self.updaters.values():
            updater.grad_norm.reset_state()

    def collect_train_logs(self, step: int, examples: int, seconds: float) -> Dict[str, float]:
        """The train logs of the window that ends at `step` (then its trackers restart): the loss and
        metrics (the default step's), the logs an overridden step returned, examples/s, per optimizer
        lr, grad_norm, loss_scale and skipped_steps (prefixed `name/` when there are several), and the
        memory readings (trainer/memory.py: host RSS now and its peak, each GPU's peak)."""
        logs: Dict[str, Any] = {"step": step, "split": "train", **self.train_window.logs()}
        metric_attributes.warn_replaced_updated(self)  # a metric replaced under the scope, updated elsewhere
        # nan when no step was timed in this window (the first loop, with its compile time, is not timed)
        logs["examples_per_sec"] = examples / seconds if examples > 0 and seconds > 0 else float("nan")
        for name, updater in self.updaters.items():
            logs.update(updater.logs("" if len(self.updaters) == 1 else f"{name}/"))
        logs.update(memory_logs())
        self._reset_train_trackers()
        self.last_train_logs = logs
        return logs

    @user_errors_shown_short
    def evaluate(self, eval_data: Any = None, y=None, *, steps: Optional[int] = None, step: Optional[int] = None,
                 callbacks: Optional[CallbackList] = None, batch_size: Optional[int] = None,
                 sample_weight=None, x=None, verbose: Union[int, str] = "auto", return_dict: bool = True,
                 **keywords) -> Dict[str, float]:
        """Computes the loss and metrics (and an overridden test_step's logs) over the whole eval set, or each of a
        dict name -> set (logged `<name>/<metric>`: evalsets.py); `steps` batches, else eval_steps /
        limit_eval_batches, fast_dev_run's few (trainer/debug.py). With an optimizer's use_ema=True, of the
        averaged weights (see ema.py). Arrays as Keras' evaluate(x=, y=, batch_size=, sample_weight=) (arrays.py);
        Keras' verbose=0 (or 2) shows no progress bar; return_dict=True is what it returns (other_tools.py)."""
        own_callbacks = bool(callbacks) and not isinstance(callbacks, CallbackList)  # the loop's: a CallbackList
        check_keras_keywords(self.evaluate, keywords, steps, verbose, return_dict, callbacks=own_callbacks)
        eval_data = evaluate_inputs(eval_data, y, x=x, batch_size=batch_size, sample_weight=sample_weight,
                                    seed=self.seed)
        asked, steps = steps is not None, steps or debug.eval_limit_of(eval_data, self.config, self.strategy,
                                                                       self._fit_eval_limit)
        metric_attributes.adopt(self)
        evaluating, self._evaluating = self._evaluating, True
        try:
            with ema.averaged_weights(self):
                return evaluate(self, eval_data, steps=steps, step=int(self.step.numpy()) if step is None else step,
                                callbacks=callbacks, show_bar=verbose not in (0, 2), asked=asked)
        finally:
            self._evaluating = evaluating

    @user_errors_shown_short
    def predict(self, data: Any = None, batch_size: Optional[int] = None, *, x=None, steps: Optional[int] = None,
                verbose: Union[int, str] = "auto", callbacks=None, **keywords):
        """The model's outputs on `data` (or Keras' x=: a Dataset of batches, an array, a dict/tuple of arrays, an
        iterable of batches) as NumPy, in inference mode, under the strategy: see trainer/inference.py. With
        an optimizer's use_ema=True, of the averaged weights (as evaluate and export). Keras' `steps`: that many
        batches; its verbose changes nothing (no progress bar)."""
        from trainer.inference import predict

        check_keras_keywords(self.predict, keywords, steps, verbose, callbacks=bool(callbacks))
        data = predict_data(data, x)
        with ema.averaged_weights(self):  # as evaluate, best/, export and python -m trainer.predict see it
            return predict(self, data, batch_size, steps)

    def weights_fingerprint(self) -> str:
        """SHA-256 of the weights of all models but the frozen: equal on every worker, and across bit-identical runs."""
        return saved.fingerprint(m for name, m in self.models.items() if name not in self.frozen)
