"""Compiling the step: where XLA goes (pure decisions, with their reasons), and the train/eval functions.

The only place that wraps anything in `tf.function` or XLA, as Keras' `make_train_function` is: the
step (step.py) stays plain Python that any subclass can override. The train function runs
`strategy.run(step)` `num_steps` times inside one tf.function (num_steps is a tensor: no retrace for a
shorter last loop).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from trainer import precision as precision_lib
from trainer.config import PrecisionConfig, TrainerConfig
from trainer.loss_convention import is_replica_share, per_replica_mean
from trainer.precision import PrecisionError
from trainer.step import Step
from trainer.timing import interleaved_seconds, median_seconds, rounds_won
from trainer.tracing import keras_random_explained, warn_random_state_outside_checkpoint, warn_unused_optimizers

log = logging.getLogger("trainer.core")


def decide_jit_compile(config: TrainerConfig, precision: PrecisionConfig, *, on_cpu: bool, replicas: int) -> bool:
    """trainer.jit_compile, with None (auto) resolved for this hardware; logs the reason. With "measure",
    auto's answer until the first loop measures (and for a run too short to measure)."""
    if config.jit_compile == "measure":
        if not precision.debug_numerics:
            log.info("XLA: trainer.jit_compile=measure: the first loop times train steps with XLA on and off "
                     "and keeps the faster")
        config = dataclasses.replace(config, jit_compile=None)
    if precision.debug_numerics:  # its checks (DebugNumericSummaryV2) are ops XLA cannot compile
        if config.jit_compile:
            raise PrecisionError("precision.debug_numerics=true cannot run inside XLA: add trainer.jit_compile=false")
        if config.jit_compile is None:
            log.info("XLA: off (precision.debug_numerics=true checks every op, which XLA cannot compile)")
        return False
    if config.jit_compile is not None:
        if config.jit_compile and on_cpu and precision.policy == "mixed_bfloat16":
            precision_lib.advise_xla_bfloat16_on_cpu()
        return bool(config.jit_compile)
    if precision.policy == "mixed_float16" and on_cpu:
        log.info("XLA: on (trainer.jit_compile=null means auto): TensorFlow's float16 kernels are very slow "
                 "on CPUs, XLA's are not. trainer.jit_compile=false turns it off.")
        return True
    if (precision.policy == "mixed_bfloat16" and on_cpu and replicas == 1
            and precision_lib.xla_bfloat16_is_faster_here()):  # measured on one replica of a 2-core CPU
        log.info(
            "XLA: on (trainer.jit_compile=null means auto): on an Intel CPU with AVX-512 BF16 and no AMX, "
            "TensorFlow's own bfloat16 matmuls are slow and XLA's are not (benchmarks/bench.py, trainer with XLA "
            "over without: MLP 1.43-1.48x, ResNet 1.17-1.28x, Transformer 1.40-1.45x). "
            "trainer.jit_compile=false turns it off."
        )
        return True
    return False


@dataclasses.dataclass(frozen=True)
class XlaPlan:
    """How the train step is compiled. `whole_step`: XLA compiles forward, backward and the update (a
    non-finite update is undone by a select); otherwise, with `jit_compile`, XLA compiles forward and
    backward and the all-reduce and update run outside it. `reason` says why, `warnings` what was ignored."""

    jit_compile: bool
    whole_step: bool
    reason: str
    warnings: Tuple[str, ...] = ()


def plan_xla(config: TrainerConfig, *, jit_compile: bool, on_cpu: bool, replicas: int, custom_step: bool,
             mean_variable_size: float) -> XlaPlan:
    """Decides the layout from the settings alone (no state). Auto, measured on a 2-core CPU
    (`python benchmarks/bench_step.py --only xla_layout`): inside XLA the step of the small ResNet and
    Transformer is 2-13% faster (no op-by-op updates of dozens of small variables); outside it the
    MLP's (20M parameters in 6 variables) is 4-10% faster (TF's fused kernels run multi-threaded,
    XLA:CPU's loops do not keep up)."""
    one_cluster = replicas == 1 and config.grad_accum_steps == 1  # the all-reduce's merge_call cannot join one
    if not jit_compile:
        return XlaPlan(False, False, "XLA off")
    warnings = []
    if config.xla_whole_step and not one_cluster:
        warnings.append("trainer.xla_whole_step=true is ignored with several replicas or grad_accum_steps > 1")
    if custom_step:
        if not one_cluster:
            return XlaPlan(False, False, "an overridden train_step with several replicas runs without XLA",
                           tuple(warnings + ["XLA: an overridden train_step with several replicas runs without XLA"]))
        if config.xla_whole_step is False:
            warnings.append("trainer.xla_whole_step=false is ignored for an overridden train_step (it cannot be split)")
        return XlaPlan(True, True, "overridden train_step", tuple(warnings))
    if config.xla_whole_step is not None:
        whole = bool(config.xla_whole_step) and one_cluster
        why = "trainer.xla_whole_step" if whole else (
            "trainer.xla_whole_step=false" if config.xla_whole_step is False else "several replicas or gradient accumulation")
        return XlaPlan(True, whole, why, tuple(warnings))
    if not one_cluster:
        return XlaPlan(True, False, "several replicas or gradient accumulation", tuple(warnings))
    if on_cpu and mean_variable_size >= 1_000_000:
        return XlaPlan(True, False, f"auto: on a CPU, variables averaging {mean_variable_size:,.0f} parameters update "
                       "faster with TF's fused kernels; trainer.xla_whole_step=true compiles the update too", tuple(warnings))
    return XlaPlan(True, True, "trainer.xla_whole_step", tuple(warnings))


def wrap_xla(fn: Callable, replicas: int) -> Callable:
    """`fn` compiled with XLA. With several replicas, one compiled function per replica: an XLA
    cluster lives on one device, and each replica's trace must capture its own variables."""
    if replicas == 1:
        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    compiled = {}

    def per_replica(*args):
        replica = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
        if replica not in compiled:
            compiled[replica] = tf.function(fn, jit_compile=True, reduce_retracing=True)
        return compiled[replica](*args)

    return per_replica


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
    with keras_random_explained():  # an overridden step is traced here first
        out = probe.get_concrete_function(iterator).structured_outputs
    if out is None or (isinstance(out, dict) and not out):
        return []
    local = lambda v: trainer.strategy.experimental_local_results(v)[0]  # noqa: E731
    scalar = lambda v: getattr(local(v), "shape", None) is not None and local(v).shape.rank == 0  # noqa: E731
    if not isinstance(out, dict) or any(not isinstance(k, str) or not scalar(v) for k, v in out.items()):
        raise TypeError(f"{what} must return None or a dict of scalar tensors (name -> value), got {out!r}")
    return list(out)


def logged_step(trainer, step: Callable, iterator, trackers: Dict[str, keras.metrics.Metric], what: str,
                batches: int = 1, several: bool = False) -> Callable:
    """`step`, with the dict of logs it returns added to Mean trackers, weighted by the batch's size (so
    they average over examples, on any number of replicas: each replica adds to its own copy, read as
    their sum; a replica's empty last eval batch adds nothing). With several `batches` per step, by the
    first one's size. `several`: see step_input."""
    names, replicas = _log_names(trainer, step, iterator, what, batches, several), trainer.strategy.num_replicas_in_sync
    if not names:
        return step
    with trainer.strategy.scope():
        for name in names:
            if name not in trackers:
                trackers[name] = keras.metrics.Mean(name=name)

    def run(data):
        examples = tf.cast(tf.shape(tf.nest.flatten(data)[0])[0], tf.float32)
        for name, value in step(data).items():
            value = value * replicas if is_replica_share(value) else value  # compute_loss's: the batch mean
            value = tf.where(examples > 0, tf.cast(value, tf.float32), 0.0)  # reduce_mean([]) is NaN
            trackers[name].update_state(value, sample_weight=examples)

    return run


def make_train_function(trainer, iterator) -> Callable:
    """strategy.run(step) × num_steps inside one tf.function; XLA as plan_xla says. `iterator`: the
    distributed training iterator (an overridden step is traced on it once to learn its logs)."""
    accum, batches = trainer.config.grad_accum_steps, trainer.config.batches_per_step
    trainer._wrap_own_compute_loss()  # t.compute_loss = f: as a class's (loss_convention.py)
    overridden = type(trainer).train_step is not Step.train_step
    several = overridden and bool(getattr(type(trainer), "takes_several_batches", False))  # a tuple also when K=1
    if overridden and accum > 1:
        log.warning("The overridden train_step is not used with grad_accum_steps > 1 (accumulate_step and "
                    "apply_accumulated are)")
    plan = trainer.plan_xla()
    for warning in plan.warnings:
        log.warning(warning)
    for updater in trainer.updaters.values():
        updater.skip_by_select = plan.whole_step
    replicas = trainer.strategy.num_replicas_in_sync
    compute_gradients, accumulate_step = trainer.compute_gradients, trainer.accumulate_step
    step = trainer.train_step
    if overridden and accum == 1:
        step = per_replica_mean(step, replicas)  # a Keras Loss object's value: the replica's batch mean
        step = logged_step(trainer, step, iterator, trainer.train_log_trackers, "train_step", batches, several)
    if plan.whole_step:
        log.info("XLA: the whole train step (forward, backward, update) is compiled (%s)", plan.reason)
        step = wrap_xla(step, replicas)
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

    def train_loop(iterator, num_steps):
        trainer.traces["train"] += 1  # Python side effect: runs once per trace
        for _ in tf.range(num_steps):
            one_update(iterator)
        warn_unused_optimizers(trainer)  # the step is traced by now: every update it makes has set in_step
        warn_random_state_outside_checkpoint(trainer)  # trainer.deterministic: randomness a resume cannot repeat

    return tf.function(train_loop)


def make_eval_function(trainer, iterator) -> Callable:
    """Up to `max_batches` eval batches per call; returns how many there were (fewer at the end)."""
    trainer._wrap_own_compute_loss()
    step = trainer.test_step
    if type(trainer).test_step is not Step.test_step:
        step = per_replica_mean(step, trainer.strategy.num_replicas_in_sync)
        step = logged_step(trainer, step, iterator, trainer.eval_log_trackers, "test_step")
    if trainer.jit_compile:
        step = wrap_xla(step, trainer.strategy.num_replicas_in_sync)

    def eval_loop(iterator, max_batches):
        trainer.traces["eval"] += 1
        n = tf.constant(0, tf.int64)
        while n < max_batches:
            batch = iterator.get_next_as_optional()
            if not batch.has_value():
                break
            trainer.strategy.run(step, args=(batch.get_value(),))
            n += 1
        return n

    return tf.function(eval_loop)


# ---------------------------------------------------------------------------------------------
# trainer.jit_compile=measure: the run's first loop times its own train function both ways
# ---------------------------------------------------------------------------------------------

MEASURE_STEPS, MEASURE_ROUNDS, MEASURE_WARMUP = 5, 3, 1  # steps per timed call, timed calls and warm-up calls each way
# Auto measures on a CPU from this run length: measuring cost 340-480 steps' worth of time when auto was right
# and saved 17-90% of every step when it was wrong (benchmarks/bench_jit_measure.py, docs/benchmarks.md).
AUTO_MEASURE_STEPS = 10_000


@dataclasses.dataclass(frozen=True)
class XlaMeasurement:
    """What measuring found: the median seconds per train step with XLA on and off (each after its
    compile and warm-up), over `rounds` interleaved rounds of `steps` steps; `on_wins`: the rounds in which
    XLA on was the faster; `auto`: trainer.jit_compile=null's choice; `steps_taken`: the real train steps
    run while measuring (warm-up included).

    `jit_compile` leaves auto's choice only when every round says the other is faster: the two calls of a
    round are adjacent in time, so a burst of load from another process rarely favours the same side in
    all of them, while one median of a few rounds on a shared machine can (see docs/benchmarks.md)."""

    on_seconds: float
    off_seconds: float
    rounds: int
    steps: int
    steps_taken: int
    on_wins: float  # a mean over workers with several: all of them must agree
    auto: bool

    @property
    def jit_compile(self) -> bool:
        if self.on_wins >= self.rounds:
            return True
        return False if self.on_wins <= 0 else self.auto

    def describe(self) -> str:
        choice, verdict = "on" if self.jit_compile else "off", f"XLA on faster in {self.on_wins:g} of {self.rounds} rounds"
        if 0 < self.on_wins < self.rounds:
            verdict += ", so auto's choice is kept"
        return (f"XLA on {1e3 * self.on_seconds:.2f} ms/step, off {1e3 * self.off_seconds:.2f} "
                f"ms/step (median of {self.rounds} rounds of {self.steps} steps; {verdict}): {choice}")


def why_not_measurable(trainer) -> Optional[str]:
    """Why XLA on and off would not differ (or XLA cannot run) for this trainer; None when they can be timed."""
    if trainer.precision.debug_numerics:
        return "precision.debug_numerics=true checks every op, which XLA cannot compile"
    chosen, trainer.jit_compile = trainer.jit_compile, True
    try:
        plan = trainer.plan_xla()
    finally:
        trainer.jit_compile = chosen
    return None if plan.jit_compile else plan.reason


def _agreed(strategy, figures: List[float]) -> List[float]:
    """The figures averaged over the workers, so every worker keeps the same train function (their
    collectives must match); the same numbers on one worker."""
    if strategy.num_replicas_in_sync == 1:
        return figures
    local = tf.constant(figures, tf.float64)
    mean = tf.function(lambda: strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(lambda: tf.identity(local)), axis=None))()
    return [float(v) for v in mean.numpy()]


def _run_and_wait(trainer, train_function, iterator, num_steps) -> None:
    train_function(iterator, num_steps)
    trainer.step.numpy()  # reading the counter waits for the steps: their time is counted


def measure_jit(trainer, iterator, *, steps: int = MEASURE_STEPS, rounds: int = MEASURE_ROUNDS,
                warmup: int = MEASURE_WARMUP) -> XlaMeasurement:
    """Times the trainer's own train function with XLA on and off on `iterator` (a distributed training
    iterator), in interleaved rounds (trainer/timing.py), and keeps the faster (XlaMeasurement.jit_compile)
    as the trainer's train function and `trainer.jit_compile`; the trainer's `jit_compile` on entry is
    taken as auto's choice. Every step is a real train step: `trainer.step` advances by
    `steps_taken`, the iterator by as many steps' batches. ValueError when XLA cannot run here
    (`why_not_measurable`)."""
    why = why_not_measurable(trainer)
    if why:
        raise ValueError(f"nothing to measure: {why}")
    auto = trainer.jit_compile  # before measuring: auto's choice (the Trainer made with jit_compile=measure or null)
    num_steps, functions, calls = tf.constant(steps, tf.int64), {}, {}
    for name, on in (("on", True), ("off", False)):
        trainer.jit_compile = on
        functions[name] = make_train_function(trainer, iterator)
        calls[name] = functools.partial(_run_and_wait, trainer, functions[name], iterator, num_steps)
        for _ in range(warmup):  # traced here, while make_train_function's settings (skip_by_select) hold
            calls[name]()
    seconds = interleaved_seconds(calls, rounds=rounds, warmup=0)
    medians = median_seconds(seconds)
    on_wins = rounds_won(seconds, "on", "off")
    on, off, on_wins = _agreed(trainer.strategy, [medians["on"] / steps, medians["off"] / steps, float(on_wins)])
    measured = XlaMeasurement(on, off, rounds, steps, 2 * (warmup + rounds) * steps, on_wins, bool(auto))
    trainer.jit_compile = measured.jit_compile
    trainer._train_function = functions["on" if measured.jit_compile else "off"]
    for updater in trainer.updaters.values():  # as the kept function was traced with
        updater.skip_by_select = trainer.plan_xla().whole_step
    trainer._eval_function = None  # compiled as the choice says
    return measured


def measures_in_run(trainer, remaining_steps: int) -> bool:
    """trainer.jit_compile=measure; or auto (null) for a run of AUTO_MEASURE_STEPS steps or more on a CPU,
    where auto's float32 and bfloat16 answers are guesses by CPU model (mixed_float16's XLA is ~100x faster
    there: not worth 20 slow steps). Not auto under trainer.deterministic: a choice made by timing could
    differ between two runs, and so would their weights."""
    setting, precision = trainer.config.jit_compile, trainer.precision
    return setting == "measure" or (setting is None and remaining_steps >= AUTO_MEASURE_STEPS and trainer._on_cpu()
                                    and precision.policy != "mixed_float16" and not precision.debug_numerics
                                    and not trainer.config.deterministic)


def profiled_while_measuring(trainer, steps_taken: int) -> Optional[str]:
    """Why not to measure: trainer.profile_steps=[N, M] with N among the steps measuring would take. Its
    one loop cannot stop at step N-1, and a trace of both compiles and 40 steps is not the one asked for;
    the profile is kept as asked and the measuring is left out."""
    profiled, start = trainer.config.profile_steps, int(trainer.step.numpy())
    if not profiled or trainer.run_dir is None or not start < profiled[0] <= start + steps_taken:
        return None
    first, last = profiled
    return (f"trainer.profile_steps=[{first}, {last}] starts within the {steps_taken} steps measuring takes "
            f"(steps {start + 1}..{start + steps_taken}), and the trace must hold exactly steps {first}..{last}: not "
            f"measured. Fix: profile steps after {start + steps_taken} (e.g. trainer.profile_steps="
            f"[{start + steps_taken + 1},{start + steps_taken + 1 + last - first}]) to measure and trace the choice")


def measure_in_run(trainer, iterator, remaining_steps: int) -> Optional[XlaMeasurement]:
    """The first loop of a run that measures (measures_in_run): measure_jit with calls short enough to fit
    the run (None, keeping auto's choice, when it cannot measure or is too short)."""
    why_measure = ("trainer.jit_compile=measure" if trainer.config.jit_compile == "measure" else
                   f"trainer.jit_compile=null (auto) measures runs of {AUTO_MEASURE_STEPS:,}+ steps on a CPU")
    calls = 2 * (MEASURE_WARMUP + MEASURE_ROUNDS)
    steps = min(MEASURE_STEPS, remaining_steps // calls)
    why = why_not_measurable(trainer) or (None if steps >= 1 else
                                          f"the run has {remaining_steps} steps left, fewer than the {calls} it takes")
    why = why or profiled_while_measuring(trainer, calls * steps)
    if why:
        log.warning("XLA: %s, but %s; XLA %s (auto)", why_measure, why, "on" if trainer.jit_compile else "off")
        return None
    measured = measure_jit(trainer, iterator, steps=steps)
    log.info("XLA: %s: %s (%d train steps)", why_measure, measured.describe(), measured.steps_taken)
    return measured
