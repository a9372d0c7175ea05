"""The step functions: the only place that wraps anything in `tf.function` or XLA, as Keras'
`make_train_function` is, and their one owner. The step (step.py) stays plain Python that any subclass can
override. The train function runs `strategy.run(step)` `num_steps` times inside one tf.function (num_steps is
a tensor: no retrace for a shorter last loop).

A Trainer holds one `StepFunctions`; the functions below are the only code that changes it: which train and
eval functions exist, the XLA choice they were compiled with (`Trainer.jit_compile`) and how each updater's
update is traced (`Updater.compile_in_xla`, from the XLA plan). The decisions themselves are xla_plan.py's;
measuring the choice (trainer.jit_compile=measure) is xla_measure.py's, which keeps its result here (`keep`).
A layer of the Trainer's models changed in place after its functions were traced (fuse_elementwise,
recompute: model_edits.py) makes them traced again before the next step; so does a change of what the train
step read in Python (`trainable`, `grad_multipliers`: trace_inputs.py), checked before every loop.

Traces are counted per function: a function made anew (after `reset`: freezing layers, a scaled schedule, a
changed layer) traced once is no retrace; TensorFlow tracing the same function again (batches of another
shape, variables created inside the step) is, and the run's summary warns about it (callbacks/progress.py),
as it does about functions made anew many times in one call (a reset in every loop). The summary counts what
happened since the last summary (`since_summary`), so a retrace in a standalone evaluate() is reported too.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf

from trainer import metric_attributes, model_edits, trace_inputs, trace_side_effects
from trainer.accumulation import check_accumulation, runs_own_accumulate_step
from trainer.errors import UserError
from trainer.loss_convention import is_replica_share, per_replica_mean
from trainer.step_logs import StepLogsError, check_logs  # noqa: F401  (StepLogsError: its home before)
from trainer.step import Step
from trainer.tracking import Window
from trainer.tracing import (framework_code, keras_random_explained, warn_random_state_outside_checkpoint,
                             warn_unused_optimizers)
from trainer.xla_plan import XlaPlan, plan_xla, wrap_xla

log = logging.getLogger("trainer.core")


@dataclasses.dataclass
class StepFunctions:
    """Which step functions a Trainer has and how they were compiled. `jit_compile`: the XLA choice (made at
    construction, or measured); `train`/`eval`: the traced functions (None until first needed, and after
    `reset`); `traces`: how many times each kind was traced (a Python side effect of tracing); `retraces`: the
    traces of a function traced before (see the module's docstring); `edits_seen`: model_edits.count() when
    the functions that exist were checked against the models' changes; `made`: the functions made anew by the
    loops (not xla_measure's pair); `seen`: what the train function read in Python, as its last trace ended;
    `marks`: the counts the last summary was made at."""

    jit_compile: bool
    train: Optional[Callable] = None
    eval: Optional[Callable] = None
    traces: Dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0})
    retraces: Dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0})
    edits_seen: int = dataclasses.field(default_factory=model_edits.count)
    made: Dict[str, int] = dataclasses.field(default_factory=lambda: {"train": 0, "eval": 0})
    seen: Optional[trace_inputs.Seen] = None
    marks: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)


def of(trainer) -> StepFunctions:
    """The trainer's step functions (read them here; change them through this module's functions)."""
    return trainer._step_functions


def plan_of(trainer, jit_compile: Optional[bool] = None) -> XlaPlan:
    """How the train step is (or would be, with `jit_compile`) compiled, and why: see xla_plan.plan_xla."""
    sizes = [v.shape.num_elements() for m in trainer.models.values() for v in m.trainable_variables]
    return plan_xla(trainer.config, jit_compile=of(trainer).jit_compile if jit_compile is None else jit_compile,
                    on_cpu=trainer._on_cpu(), replicas=trainer.strategy.num_replicas_in_sync,
                    custom_step=(type(trainer).train_step is not Step.train_step
                                 and trainer.config.grad_accum_steps == 1),
                    mean_variable_size=sum(sizes) / len(sizes) if sizes else 0.0)


def reset(trainer) -> None:
    """Drops the traced functions: the next loop (and evaluation) traces again."""
    functions = of(trainer)
    functions.train = functions.eval = None


def choose(trainer, jit_compile: bool) -> None:
    """Compiles with XLA on or off from now on (a restored measurement): the functions traced otherwise go."""
    if of(trainer).jit_compile != jit_compile:
        of(trainer).jit_compile = jit_compile
        reset(trainer)


@contextlib.contextmanager
def trying(trainer, jit_compile: Optional[bool]):
    """While measuring one side: `trainer.jit_compile` (so an overridden Trainer.plan_xla too) reads
    `jit_compile` (None: the choice); the choice is back afterwards."""
    functions = of(trainer)
    chosen = functions.jit_compile
    functions.jit_compile = chosen if jit_compile is None else jit_compile
    try:
        yield
    finally:
        functions.jit_compile = chosen


def keep(trainer, train_function: Callable, jit_compile: bool) -> None:
    """Keeps `train_function`, made by make_train_function(..., jit_compile) and traced, as the train function
    (what measuring chose); the eval function is compiled as the choice says. What the train step read in
    Python (`seen`) was recorded as its trace ended (make_train_function)."""
    functions = of(trainer)
    functions.jit_compile, functions.train, functions.eval = jit_compile, train_function, None
    functions.edits_seen = model_edits.count()  # traced just now, with the models as they are
    _select_skips(trainer, trainer.plan_xla().whole_step)  # as the kept function was traced with


def _select_skips(trainer, whole_step: bool) -> None:
    """With the whole step in XLA a non-finite update is undone by a select and the update is Keras' ops
    (update.py); read at trace time."""
    for updater in trainer.updaters.values():
        updater.compile_in_xla(whole_step)


def _fused_kernels_chosen(trainer) -> bool:
    return any(updater.fused for updater in trainer.updaters.values())


def has_train_function(trainer) -> bool:
    return of(trainer).train is not None


def _trace_again_if_models_changed(trainer) -> None:
    """A layer of the trainer's models changed in place since its functions were traced (model_edits.py): the
    train function goes, so the next steps run the changed layers (a traced function keeps the ones it traced)."""
    functions, now = of(trainer), model_edits.count()
    if functions.edits_seen == now:
        return
    changed = model_edits.changed_since(trainer.models.values(), functions.edits_seen)
    functions.edits_seen = now
    if changed and functions.train is not None:
        log.info("%s changed layers of the Trainer's models after its train step was traced (%s): it is traced "
                 "again, so the next steps use the changed layers", " and ".join(changed),
                 "; ".join(", ".join(repr(n) for n in names) for names in changed.values()))
        # The eval function stays: fused kernels and recomputation act only where a gradient tape records
        # (fused_elementwise.py, recompute.py), so an evaluation computes as it was traced to.
        functions.train = None


def _trace_again_if_inputs_changed(trainer) -> None:
    """Which variables are trainable, or grad_multipliers, changed since the train function was made (a callback
    unfroze layers without reset_step_functions()): it goes, or the change would be silently ignored."""
    functions = of(trainer)
    if functions.train is None or functions.seen is None:
        return
    changed = trace_inputs.changes(functions.seen, trainer.grad_multipliers)
    if changed:
        log.info("The train step is traced again: %s since it was traced (read at trace time)", changed)
        functions.train = None  # the eval step reads neither


class UnbuiltVariableError(UserError, RuntimeError):
    """Variables that became trainable after the Trainer built its optimizers (and accumulators) for the
    trainable ones: no optimizer slots exist for them, so no step could update them."""


def _refuse_variables_not_built_for(trainer) -> None:
    """Before a train function is traced: every variable it would update has its optimizer slots (and
    gradient accumulator); else Keras fails inside the trace with 'Unknown variable ... recreate a new optimizer
    instance' (or a KeyError), which hides the cause: layers frozen in the builder, unfrozen later."""
    missing = []
    for updater in trainer.updaters.values():
        optimizer = updater.optimizer
        known = getattr(optimizer, "_trainable_variables_indices", None)  # Keras': what build(variables) was given
        if optimizer.built and known is not None:
            missing += [v.path for v in updater.variables() if optimizer._var_key(v) not in known]
    if trainer.config.grad_accum_steps > 1 and trainer._accumulators is not None and len(trainer.models) == 1:
        missing += [v.path for v in trainer.model.trainable_variables if v.path not in trainer._accumulators]
    if missing:
        missing = list(dict.fromkeys(missing))
        raise UnbuiltVariableError(
            f"{len(missing)} variables are trainable now but were frozen when the Trainer built its optimizers "
            f"({trace_inputs.named(missing)}): the optimizers have no slots for them, so they cannot train. "
            "Usual cause: layers frozen (trainable = False) in the model's builder, unfrozen later by a callback. "
            "Fix: build the model with every layer that will ever train trainable, and freeze it in a callback's "
            "on_train_begin (it runs after the optimizers are built), then unfreeze it when you like; "
            "a model that never trains goes in Trainer(frozen=...). Raised before the next step, so the weights "
            "(and any checkpoint) are as the last step left them.")


def since_summary(trainer) -> Dict[str, Dict[str, int]]:
    """traces, retraces and functions made anew since the last summary (a fit() call's, with a standalone
    evaluate() before it); the next summary counts from now."""
    functions = of(trainer)
    now = {"traces": dict(functions.traces), "retraces": dict(functions.retraces), "made": dict(functions.made)}
    marks, functions.marks = functions.marks, now
    return {what: {k: v - marks.get(what, {}).get(k, 0) for k, v in counts.items()} for what, counts in now.items()}


def run_train(trainer, iterator, num_steps: int) -> None:
    """`num_steps` train steps on `iterator` (a distributed training iterator), tracing the train function first
    when there is none."""
    _trace_again_if_models_changed(trainer)
    _trace_again_if_inputs_changed(trainer)
    functions = of(trainer)
    if functions.train is None:  # first loop, or reset by a callback
        functions.train = make_train_function(trainer, iterator)
        functions.made["train"] += 1
    with trace_side_effects.tensors_explained(trainer, "train_step"):
        functions.train(iterator, tf.constant(num_steps, tf.int64))


def run_eval(trainer, iterator, max_batches: int) -> int:
    """Up to `max_batches` eval batches from `iterator`; how many there were (fewer at the end)."""
    _trace_again_if_models_changed(trainer)
    functions = of(trainer)
    if functions.eval is None:
        functions.eval = make_eval_function(trainer, iterator)
        functions.made["eval"] += 1
    with trace_side_effects.tensors_explained(trainer, "test_step"):
        return int(functions.eval(iterator, tf.constant(max_batches, tf.int64)))


def step_input(iterator, batches_per_step: int, several: bool = False):
    """What one train step is given: the next batch, or a tuple of the next K=trainer.batches_per_step batches
    (each a fresh one from the iterator, read in order: resume skips K per step) when K > 1 or the step's class
    says `takes_several_batches = True` (`several`), which gets a tuple also when K=1, a 1-tuple, so its
    `for batch in batches:` reads the same with any K."""
    if batches_per_step == 1 and not several:
        return next(iterator)
    return tuple(next(iterator) for _ in range(batches_per_step))


def _log_names(trainer, step: Callable, iterator, what: str, batches: int = 1, several: bool = False) -> List[str]:
    """The names of the logs an overridden step returns, from one throwaway trace (the trackers that
    average them must exist before the real trace)."""
    probe = tf.function(lambda it: trainer.strategy.run(step, args=(step_input(it, batches, several),)))
    with keras_random_explained(), trace_side_effects.tensors_explained(trainer, what), \
            trace_side_effects.watched(trainer, what, in_graph=False):
        out = probe.get_concrete_function(iterator).structured_outputs  # an overridden step is traced here first
    if out is None or (isinstance(out, dict) and not out):
        return []
    check_logs(out, what, lambda v: trainer.strategy.experimental_local_results(v)[0])
    return list(out)


def logged_step(trainer, step: Callable, iterator, window: Window, what: str, batches: int = 1,
                several: bool = False) -> Callable:
    """`step`, with the dict of logs it returns added to the window's Mean trackers, weighted by the batch's
    size (so they average over examples, on any number of replicas: each replica adds to its own copy, read as
    their sum; a replica's empty last eval batch adds nothing). With several `batches` per step, by the
    first one's size. `several`: see step_input. A log that is a metric's `result()` (a Trainer metric's, or one
    the Trainer's attributes hold) is not averaged: the window reports the metric's value at its end."""
    names, replicas = _log_names(trainer, step, iterator, what, batches, several), trainer.strategy.num_replicas_in_sync
    trackers = window.step_logs
    if not names:
        return step
    with trainer.strategy.scope():
        for name in names:
            if name not in trackers:
                trackers[name] = keras.metrics.Mean(name=name)
    metrics = [*window.adopted.values(), *trainer.train_metrics.values(), *trainer.eval_metrics.values()]

    def run(data):
        examples = tf.cast(tf.shape(tf.nest.flatten(data)[0])[0], tf.float32)
        with metric_attributes.recording_results(metrics) as metric_of:
            logs = step(data)
            from_metrics = {name: metric_of(value) for name, value in logs.items()}
        for name, value in logs.items():
            if from_metrics[name] is not None:
                window.from_metrics[name] = from_metrics[name]
                continue
            window.from_metrics.pop(name, None)
            value = value * replicas if is_replica_share(value) else value  # compute_loss's: the batch mean
            value = tf.where(examples > 0, tf.cast(value, tf.float32), 0.0)  # reduce_mean([]) is NaN
            trackers[name].update_state(value, sample_weight=examples)

    return run


def _trace_counter(trainer, kind: str) -> Callable[[], None]:
    """What one new function calls at each of its traces: each counts in `traces`, each after its first in
    `retraces` too (TensorFlow traced this same function again)."""
    functions, traced = of(trainer), []

    @framework_code
    def count() -> None:
        functions.traces[kind] += 1
        if traced:
            functions.retraces[kind] += 1
        traced.append(kind)

    return count


def make_train_function(trainer, iterator, jit_compile: Optional[bool] = None) -> Callable:
    """strategy.run(step) × num_steps inside one tf.function; XLA as plan_xla says (with the trainer's
    choice, or `jit_compile`). `iterator`: the distributed training iterator (an overridden step is traced on
    it once to learn its logs)."""
    _refuse_variables_not_built_for(trainer)
    metric_attributes.adopt(trainer)  # metrics the Trainer's attributes hold: before anything is traced
    accum, batches = trainer.config.grad_accum_steps, trainer.config.batches_per_step
    trainer._wrap_own_compute_loss()  # t.compute_loss = f: as a class's (loss_convention.py)
    overridden = type(trainer).train_step is not Step.train_step
    several = overridden and bool(getattr(type(trainer), "takes_several_batches", False))  # a tuple also when K=1
    check_accumulation(trainer, trainer.config, cli=trainer.from_cli)  # fit() said it; run_steps, lr_find: here
    with trying(trainer, jit_compile):
        plan = trainer.plan_xla()  # a subclass may override it
    for warning in plan.warnings:
        log.warning(warning)
    _select_skips(trainer, plan.whole_step)
    replicas = trainer.strategy.num_replicas_in_sync
    compute_gradients, accumulate_step = trainer.compute_gradients, trainer.accumulate_step
    step = trainer.train_step
    if overridden and accum == 1:
        step = per_replica_mean(step, replicas)  # a Keras Loss object's value: the replica's batch mean
        step = logged_step(trainer, step, iterator, trainer.train_window, "train_step", batches, several)
    if plan.whole_step:
        log.info("XLA: the whole train step (forward, backward, update) is compiled (%s)%s", plan.reason,
                 "; the update is Keras' ops, which XLA fuses" if _fused_kernels_chosen(trainer) else "")
        step = wrap_xla(step, replicas)
    elif plan.jit_compile and accum > 1 and not runs_own_accumulate_step(trainer):  # a class's or the instance's
        log.info("XLA: the overridden accumulate_step runs as written, outside XLA")
    elif plan.jit_compile:
        log.info("XLA: forward and backward are compiled; all-reduce and the update run outside XLA (%s)", plan.reason)
        compute_gradients = wrap_xla(trainer.compute_gradients, replicas)

        def step(data):
            loss, grads = compute_gradients(data)
            trainer.apply_gradients(grads, loss)

        def accumulate_step(data):
            _, grads = compute_gradients(data)
            trainer._accumulate(grads)

    def one_update(iterator):
        if accum == 1:
            trainer.strategy.run(step, args=(step_input(iterator, batches, several),))
        else:
            for _ in tf.range(accum):
                trainer.strategy.run(accumulate_step, args=(next(iterator),))
            trainer.strategy.run(trainer.apply_accumulated)
        trainer.step.assign_add(1)

    count_trace = _trace_counter(trainer, "train")

    def train_loop(iterator, num_steps):
        count_trace()  # Python side effect: runs once per trace
        # Python side effects of the step (self.calls += 1), a tensor of a trace read, an iterator made in the step
        with trace_side_effects.watched(trainer, "train_step"):
            for _ in tf.range(num_steps):
                one_update(iterator)
        warn_unused_optimizers(trainer)  # the step is traced by now: every update it makes has set in_step
        warn_random_state_outside_checkpoint(trainer)  # trainer.deterministic: randomness a resume cannot repeat
        # What the step read, as it is when the trace ends: a step that sets `trainable` itself (a Keras 2 GAN's
        # d.trainable = True ... False) leaves it so, and the check before the next loop compares with that.
        of(trainer).seen = trace_inputs.Seen.now(trainer.models.values(), trainer.grad_multipliers)

    return tf.function(train_loop)


def make_eval_function(trainer, iterator) -> Callable:
    """Up to `max_batches` eval batches per call; returns how many there were (fewer at the end)."""
    metric_attributes.adopt(trainer)  # metrics the Trainer's attributes hold: before anything is traced
    trainer._wrap_own_compute_loss()
    step = trainer.test_step
    if type(trainer).test_step is not Step.test_step:
        step = per_replica_mean(step, trainer.strategy.num_replicas_in_sync)
        step = logged_step(trainer, step, iterator, trainer.eval_window, "test_step")
    if of(trainer).jit_compile:
        step = wrap_xla(step, trainer.strategy.num_replicas_in_sync)
    count_trace = _trace_counter(trainer, "eval")

    def eval_loop(iterator, max_batches):
        count_trace()
        n = tf.constant(0, tf.int64)
        with trace_side_effects.watched(trainer, "test_step"):
            while n < max_batches:
                batch = iterator.get_next_as_optional()
                if not batch.has_value():
                    break
                trainer.strategy.run(step, args=(batch.get_value(),))
                n += 1
        return n

    return tf.function(eval_loop)
