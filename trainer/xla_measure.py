"""trainer.jit_compile=measure: the run's first loop times its own train function with XLA on and off and
keeps the faster (also auto's, for a long run on a CPU). A component the loop calls before its first loop
(`measure_first_loop`); the functions it makes and the choice it keeps go through step_functions.py, their owner."""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import List, Optional

import tensorflow as tf

from trainer import step_functions
from trainer.timing import interleaved_seconds, median_seconds, rounds_won

log = logging.getLogger("trainer.core")

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
        choice, verdict = ("on" if self.jit_compile else "off",
                           f"XLA on faster in {self.on_wins:g} of {self.rounds} rounds")
        if 0 < self.on_wins < self.rounds:
            verdict += ", so auto's choice is kept"
        return (f"XLA on {1e3 * self.on_seconds:.2f} ms/step, off {1e3 * self.off_seconds:.2f} "
                f"ms/step (median of {self.rounds} rounds of {self.steps} steps; {verdict}): {choice}")


def why_not_measurable(trainer) -> Optional[str]:
    """Why XLA on and off would not differ (or XLA cannot run) for this trainer; None when they can be timed."""
    if trainer.precision.debug_numerics:
        return "precision.debug_numerics=true checks every op, which XLA cannot compile"
    plan = step_functions.plan_of(trainer, jit_compile=True)
    return None if plan.jit_compile else plan.reason


def _agreed(strategy, figures: List[float]) -> List[float]:
    """The figures averaged over the workers, so every worker keeps the same train function (their
    collectives must match); the same numbers on one worker."""
    if strategy.num_replicas_in_sync == 1:
        return figures
    local = tf.constant(figures, tf.float64)
    mean = tf.function(lambda: strategy.reduce(tf.distribute.ReduceOp.MEAN, strategy.run(lambda: tf.identity(local)),
                                               axis=None))()
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
    # before measuring: auto's choice (the Trainer made with jit_compile=measure or null)
    auto = step_functions.of(trainer).jit_compile
    num_steps, functions, calls = tf.constant(steps, tf.int64), {}, {}
    for name, on in (("on", True), ("off", False)):
        with step_functions.trying(trainer, on):  # trainer.jit_compile reads this side while it is made and traced
            functions[name] = step_functions.make_train_function(trainer, iterator, jit_compile=on)
            calls[name] = functools.partial(_run_and_wait, trainer, functions[name], iterator, num_steps)
            for _ in range(warmup):  # traced here, while make_train_function's settings (Updater.compile_in_xla) hold
                calls[name]()
    seconds = interleaved_seconds(calls, rounds=rounds, warmup=0)
    medians = median_seconds(seconds)
    on_wins = rounds_won(seconds, "on", "off")
    on, off, on_wins = _agreed(trainer.strategy, [medians["on"] / steps, medians["off"] / steps, float(on_wins)])
    measured = XlaMeasurement(on, off, rounds, steps, 2 * (warmup + rounds) * steps, on_wins, bool(auto))
    step_functions.keep(trainer, functions["on" if measured.jit_compile else "off"], measured.jit_compile)
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
        log.warning("XLA: %s, but %s; XLA %s (auto)", why_measure, why,
                    "on" if step_functions.of(trainer).jit_compile else "off")
        return None
    measured = measure_jit(trainer, iterator, steps=steps)
    log.info("XLA: %s: %s (%d train steps)", why_measure, measured.describe(), measured.steps_taken)
    return measured


def measure_first_loop(trainer, iterator, remaining_steps: int) -> Optional[int]:
    """The train steps the first loop of a run that measures (measures_in_run) took, with the choice kept and
    recorded (trainer.xla_choice); None, having done nothing, when this loop is not such a loop (a train
    function exists already, a measurement was restored, or nothing asks to measure) or measuring could not."""
    if (step_functions.has_train_function(trainer) or trainer.xla_measurement is not None
            or not measures_in_run(trainer, remaining_steps)):
        return None
    measured = measure_in_run(trainer, iterator, remaining_steps)
    if measured is None:
        return None
    trainer.xla_choice.measured(measured)
    return measured.steps_taken
