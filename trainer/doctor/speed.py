"""Section 4, speed and memory: steps/s and memory of each precision x XLA x batch size, timed as the
recommended command will train: through the Trainer's own loop, window by window (`Trainer.run_steps(n,
loop=True)`: loop.Loop.window, the path fit() takes between events: a call of the compiled train function
of `steps_per_loop` steps, cut at the run's log/eval/checkpoint steps, then the host work after it: the
callbacks' on_loop_end with the divergence and numerics guards, the step read back, the train logs when
`log_every` is due, the save point's check), on the run's input pipeline, in interleaved rounds (A B C,
A B C) so that a burst of load from another process hits every configuration alike and the rounds can be
compared in pairs (decide.py). Not in the time: what fit() does once per call (callbacks' start and end,
making the iterator), what a run writes (the Trainers here have no run folder: no checkpoints, metrics
files or TensorBoard events), the progress bar and evaluation. A configuration's timed call runs about
`call_seconds` of steps (a whole number of windows), sized after its warm-up and re-sized every round
from its last call, so one burst cannot leave it timed with short calls.
Memory (trainer/memory.py's PeakMemory): on a GPU the allocator's peak while a configuration is built
and runs its first steps, minus what was allocated before (the other configurations' memory); on the
CPU the process RSS, sampled over the same span, minus the RSS before it. The RSS high-water mark cannot
be reset inside a process, so that growth is the honest reading: what this configuration added (model,
optimizer state, compiled code, its first batches). A warm-up configuration, built and run before the
measured ones and discarded, pays the one-time costs (the Trainer's and XLA's first use), so the first
measured configuration does not. Memory a discarded Trainer freed is reused by later ones, so on a CPU
readings a few tens of MiB apart are within the measurement's noise (report.py says so).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from trainer import timing
from trainer.inputs import batches_read_per_step
from trainer.doctor.phases import phase_breakdowns, phase_pieces
from trainer.memory import PeakMemory
from trainer.precision import POLICIES

SHORT = {"float32": "float32", "mixed_float16": "mixed_float16", "mixed_bfloat16": "mixed_bfloat16"}
FLOAT16_ON_CPU_WITHOUT_XLA = ("not timed: TensorFlow's float16 kernels on a CPU are ~100x slower than XLA's "
                              "(trainer.jit_compile auto turns XLA on for mixed_float16 on a CPU)")
MOST_STEPS_PER_CALL = 500


@dataclasses.dataclass(frozen=True)
class GridConfig:
    policy: str
    xla: bool
    batch: int

    @property
    def name(self) -> str:
        return f"{self.policy} XLA {'on' if self.xla else 'off'} batch {self.batch}"


def plan_grid(batch: int, quick: bool, on_cpu: bool) -> Tuple[List[GridConfig], List[dict]]:
    """The configurations to time (the given batch and, unless quick, twice it) and the ones left out, why."""
    configs, skipped = [], []
    for size in ([batch] if quick else [batch, 2 * batch]):
        for policy in POLICIES:
            for xla in (False, True):
                config = GridConfig(policy, xla, size)
                if on_cpu and policy == "mixed_float16" and not xla:
                    skipped.append({**dataclasses.asdict(config), "name": config.name,
                                    "reason": FLOAT16_ON_CPU_WITHOUT_XLA})
                else:
                    configs.append(config)
    return configs, skipped


@contextlib.contextmanager
def _trainer_logs_at(level: int):
    """The Trainer's warnings (x8 sizes, float32 outputs appended) repeat per configuration; the model
    table reports them once."""
    logger = logging.getLogger("trainer")
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _finish(trainer) -> None:
    """Reads a weight back: the steps before it have finished when the clock stops."""
    next(iter(trainer.models.values())).trainable_variables[0].numpy()


def steps_per_loop(trainer) -> int:
    """The steps of one window of the trainer's loop (a timed call runs a whole number of them)."""
    return trainer.config.steps_per_loop


def run_as_trained(trainer, steps: int) -> int:
    """`steps` train steps through the Trainer's loop, window by window, with the host work a run pays
    after each window (Trainer.run_steps(loop=True): loop.Loop.window); a timing of the compiled steps
    alone left that work out and overstated XLA off's lead by 13-33% on a CPU. Returns the steps trained:
    fewer when a guard stopped training; none is an error (nothing to time)."""
    trained = trainer.run_steps(steps, loop=True)
    _finish(trainer)
    if not trained:
        raise RuntimeError(f"trained no step of the {steps} asked: a guard of the loop stopped training")
    return trained


def _timed_call(trainer, steps: int) -> Tuple[int, float]:
    """(the steps trained, the seconds they took): a call a guard cut short counts the steps it ran."""
    start = time.perf_counter()
    trained = run_as_trained(trainer, steps)
    return trained, time.perf_counter() - start


def resized(steps: int, seconds: float, call_seconds: float, multiple: int = 1) -> int:
    """The steps of the next call, from the last call's `steps` and `seconds`: about `call_seconds` at
    the rate just measured (re-sized every round, so one burst of load cannot leave a configuration
    timed with calls a tenth of the target for the whole run), a whole number of `multiple` (the loop's
    windows: steps_per_loop)."""
    wanted = timing.resized(steps, seconds, call_seconds, MOST_STEPS_PER_CALL)
    return multiple * max(1, min(MOST_STEPS_PER_CALL // multiple, round(wanted / multiple)))


def size_call(trainer, call_seconds: float) -> int:
    """The number of steps a call of about `call_seconds` runs: calls of growing length are timed until
    one lasts half of it, so the per-call overhead is spread over many steps before the rate is taken."""
    multiple = steps_per_loop(trainer)
    steps = multiple
    while True:
        steps, seconds = _timed_call(trainer, steps)
        if seconds >= call_seconds / 2 or steps >= MOST_STEPS_PER_CALL:
            break
        steps = min(MOST_STEPS_PER_CALL, steps * min(8, max(2, int(call_seconds / 2 / max(seconds, 1e-6)))))
    return resized(steps, seconds, call_seconds, multiple)


def timed_rounds(trainers: Dict[str, object], steps: Dict[str, int], rounds: int, call_seconds: float,
                 timed_call: Callable[[object, int], Tuple[int, float]] = _timed_call,
                 failed: Optional[Dict[str, str]] = None) -> Dict[str, List[Tuple[int, float]]]:
    """(steps, seconds) of each configuration's call in each of `rounds` interleaved rounds (A B C, A B
    C, ...), after one untimed round; each call is re-sized (resized) from the configuration's last one.
    `timed_call(trainer, steps)` returns (the steps it trained, seconds).
    A configuration whose call fails (the loop's numerics guard stops a float16 run that keeps
    overflowing, say) leaves the rounds; its error goes into `failed`."""
    steps, live, failed = dict(steps), dict(trainers), {} if failed is None else failed
    calls: Dict[str, List[Tuple[int, float]]] = {name: [] for name in trainers}
    for round_ in range(rounds + 1):  # round 0, untimed: caches, the first re-size
        for name, trainer in list(live.items()):
            try:
                trained, seconds = timed_call(trainer, steps[name])
            except Exception as e:  # noqa: BLE001 - one configuration's failure is a finding, not the end
                failed[name] = f"{type(e).__name__}: {str(e).strip()[:300]}"
                del live[name]
                continue
            if round_:
                calls[name].append((trained, seconds))
            steps[name] = resized(trained, seconds, call_seconds, steps_per_loop(trainer))
    return calls


def _prepare(config: GridConfig, make_trainer, data_for_batch, call_seconds: float) -> dict:
    """Builds, compiles and runs a configuration's first steps (memory is measured over this), then sizes
    its timed call (size_call)."""
    data = data_for_batch(config.batch)
    with PeakMemory() as memory:
        trainer = make_trainer(config.policy, config.xla)
        start = time.perf_counter()
        trainer.fit(data, steps=1)
        first_call = time.perf_counter() - start
        trainer.run_steps(1, loop=True)
        _finish(trainer)
    steps = size_call(trainer, call_seconds)
    return {"trainer": trainer, "steps_per_call": steps, "first_call_seconds": first_call,
            "memory_mb": memory.delta_mb, "memory_kind": memory.kind, "xla_layout": trainer.plan_xla().reason}


def _warm_up(configs: List[GridConfig], make_trainer, data_for_batch, progress) -> None:
    """Builds and runs the first configuration (and one with XLA, if any is timed), then discards them:
    the one-time costs of the Trainer's and XLA's first use are paid before any configuration's memory is
    read. A failure here is left to the measured configuration to report."""
    warm = configs[:1] + [c for c in configs if c.xla != configs[0].xla][:1]
    for config in warm:
        progress(f"speed: warm-up (not measured): {config.name}")
        try:
            trainer = make_trainer(config.policy, config.xla)
            trainer.fit(data_for_batch(config.batch), steps=1)
            trainer.run_steps(1, loop=True)
            _finish(trainer)
        except Exception:  # noqa: BLE001 - reported by the measured configuration
            pass
        trainer = None
        gc.collect()


def _add_phases(rows: List[dict], prepared: Dict[str, dict], data_for_batch, batch: int,
                progress: Callable[[str], None]) -> None:
    """row["phases"] of each configuration without XLA at the given batch: where its step's time goes
    (phases.py), all timed in the same rounds; a model the pieces cannot time gets why not."""
    eligible = [r for r in rows if r["name"] in prepared and not r["xla"] and r["batch"] == batch]
    if not eligible:
        return
    progress(f"speed: timing the phases of a step of {', '.join(r['name'] for r in eligible)}")
    try:
        pieces = {r["name"]: phase_pieces(prepared[r["name"]]["trainer"], data_for_batch(r["batch"]),
                                          lambda n, t=prepared[r["name"]]["trainer"]: run_as_trained(t, n))
                  for r in eligible}
        for name, breakdown in phase_breakdowns(pieces).items():
            next(r for r in eligible if r["name"] == name)["phases"] = breakdown
    except Exception as e:  # noqa: BLE001 - several models, a custom step: the breakdown is left out, said why
        for r in eligible:
            r["phases_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"


def speed_section(make_trainer: Callable[[str, bool], object], data_for_batch: Callable[[int], object],
                  configs: List[GridConfig], skipped: List[dict], *, rounds: int, call_seconds: float,
                  progress: Callable[[str], None]) -> dict:
    """Measures `configs` (see the module docstring); a configuration that fails to build or run is
    reported with its error and left out of the timing."""
    prepared: Dict[str, dict] = {}
    rows: List[dict] = []
    with _trainer_logs_at(logging.ERROR), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's overflow in a float16 cast: numerics reports it
        if configs:
            _warm_up(configs, make_trainer, data_for_batch, progress)
        for i, config in enumerate(configs, 1):
            progress(f"speed: [{i}/{len(configs)}] building, compiling and sizing {config.name}")
            row = {**dataclasses.asdict(config), "name": config.name}
            try:
                prepared[config.name] = _prepare(config, make_trainer, data_for_batch, call_seconds)
            except Exception as e:  # noqa: BLE001 - one configuration's failure (OOM, XLA) is a finding
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                progress(f"speed: {config.name} failed: {row['error']}")
            rows.append(row)
        progress(f"speed: timing {len(prepared)} configurations, {rounds} interleaved rounds of about "
                 f"{call_seconds:g} s per configuration (re-sized every round)")
        per_loop = next((steps_per_loop(p["trainer"]) for p in prepared.values()), 1)
        failed: Dict[str, str] = {}
        calls = timed_rounds({name: p["trainer"] for name, p in prepared.items()},
                             {name: p["steps_per_call"] for name, p in prepared.items()}, rounds, call_seconds,
                             failed=failed)
    for name, error in failed.items():
        progress(f"speed: {name} failed while timed: {error}")
        next(r for r in rows if r["name"] == name)["error"] = error
        prepared.pop(name)
    for row in rows:
        p = prepared.get(row["name"])
        if p is None:
            continue
        # grad_accum_steps x batches_per_step batches
        per_step = row["batch"] * batches_read_per_step(p["trainer"].config)
        step_seconds = [seconds / steps for steps, seconds in calls[row["name"]]]
        steps_per_sec = 1 / statistics.median(step_seconds)
        row.update({k: v for k, v in p.items() if k != "trainer"}, steps_per_sec=steps_per_sec,
                   examples_per_sec=steps_per_sec * per_step,
                   steps_per_call=[steps for steps, _ in calls[row["name"]]],
                   seconds_per_call=[seconds for _, seconds in calls[row["name"]]],
                   seconds_per_example=[t / per_step for t in step_seconds],
                   spread=max(step_seconds) / min(step_seconds))
    if configs:
        _add_phases(rows, prepared, data_for_batch, configs[0].batch, progress)
    calls.clear()
    prepared.clear()
    gc.collect()  # the Trainers (cycles) die now, their iterators on release threads, not at exit (iterator_release.py)
    return {"rounds": rounds, "call_seconds": call_seconds, "steps_per_loop": per_loop, "configs": rows,
            "skipped": skipped,
            "memory_means": ("device allocator peak minus the memory in use before (MiB)" if rows and any(
                r.get("memory_kind") == "gpu_allocator_peak" for r in rows) else
                "growth of this process's RSS (MiB) while the configuration was built and ran its first steps, "
                "after a discarded warm-up configuration; memory freed by one configuration is reused by the "
                "next, so differences of a few tens of MiB are noise"),
            "how": __doc__.split("\n\n")[0].replace("\n", " ")}
