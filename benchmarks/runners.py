"""bench.py's runners and its matrix: one runner object per (cell, runner) trains the same workload its
own way (the Trainer, Keras `fit`, the guide's hand-written loop); `run_cell` builds, warms and times
the runners of one cell in interleaved rounds (trainer/timing.py)."""
from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import List, Optional

import keras
import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # see ForgetCustomGradients

from benchmarks.workloads import LEARNING_RATE, Workload, make_dataset, make_loss, make_metrics
from trainer import PrecisionConfig, Trainer
from trainer.memory import PeakMemory
from trainer.timing import interleaved_seconds, seconds_of

RUNNERS = ("trainer", "fit", "hand")  # plus the optional diagnostics "trainer_step" and "trainer_noskip"


def _sync(model: keras.Model) -> None:
    """Reads a weight back: the call is only finished when its last update is (matters on GPU)."""
    model.trainable_variables[-1].numpy()


class Runner:
    """One way of training a cell's workload: setup() builds it, run(n) trains n more steps in ONE call of
    its own API and returns once a weight is read back."""

    name = "?"

    def __init__(self, wl: Workload, precision: str, xla: bool, k: int, arrays, metrics: List[str]):
        self.wl, self.precision, self.xla, self.k = wl, precision, xla, k
        self.ds = make_dataset(arrays)  # its own Dataset object over the same tensors
        self.metric_names = metrics
        self.model: Optional[keras.Model] = None

    def setup(self) -> None:
        raise NotImplementedError

    def run(self, steps: int) -> None:
        raise NotImplementedError

    def traces(self) -> Optional[int]:
        return None

    def xla_effective(self) -> bool:
        return self.xla

    def _build_model(self) -> keras.Model:
        keras.mixed_precision.set_dtype_policy(self.precision)
        keras.utils.set_random_seed(0)  # the Trainer seeds 0 too: same initial weights everywhere
        return self.wl.build()


class TrainerRunner(Runner):
    """Our Trainer; each run(n) is one `fit` call that trains to the current step + n."""

    name = "trainer"
    skip_nonfinite = True  # the Trainer's default

    def setup(self):
        self.trainer = Trainer(
            model=self.wl.build,
            loss=make_loss(),
            optimizer=lambda: keras.optimizers.Adam(LEARNING_RATE),
            metrics=make_metrics(self.metric_names),
            precision=PrecisionConfig(policy=self.precision, skip_nonfinite=self.skip_nonfinite),
            run_dir=None,
            seed=0,
            jit_compile=self.xla,
            steps_per_loop=self.k,
            log_every=10**9,  # one log at the end of each fit call (it reads the metrics back)
            checkpoint_every=0,  # else loops are cut at multiples of 500 steps
            eval_every=0,
            progress_bar=False,
            tensorboard=False,
        )
        self.model = self.trainer.model

    def run(self, steps):
        # fit(steps=N) trains up to global step N, so ask for the current step + n.
        self.trainer.fit(self.ds, steps=int(self.trainer.step.numpy()) + steps)
        self.model = self.trainer.model  # build() may wrap it; same variables
        _sync(self.model)

    def traces(self):
        return self.trainer.traces["train"]


class FitRunner(Runner):
    """Keras `model.fit`; each run(n) is one fit call of one epoch of n steps."""

    name = "fit"

    def setup(self):
        self.model = self._build_model()
        self.model.compile(
            optimizer=keras.optimizers.Adam(LEARNING_RATE),  # Keras wraps it in a LossScaleOptimizer for float16
            loss=make_loss(),
            metrics=make_metrics(self.metric_names),
            jit_compile=self.xla,
            steps_per_execution=self.k,
        )

    def run(self, steps):
        self.model.fit(self.ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
        _sync(self.model)

    def traces(self):
        """Keras' train_function is a Python function closing over its tf.functions: count those."""
        fn = getattr(self.model, "train_function", None)
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        counts = [c.experimental_get_tracing_count() for c in cells if hasattr(c, "experimental_get_tracing_count")]
        return sum(counts) if counts else None

    def xla_effective(self):
        return bool(self.model.jit_compile)  # Keras may turn it off (e.g. under a tf.distribute strategy)


class HandRunner(Runner):
    """The mixed-precision guide's custom training loop, written with Keras 3 APIs."""

    name = "hand"

    def setup(self):
        self.model = model = self._build_model()
        opt = keras.optimizers.Adam(LEARNING_RATE)
        if self.precision == "mixed_float16":
            opt = keras.mixed_precision.LossScaleOptimizer(opt)
        opt.build(model.trainable_variables)
        self.optimizer = opt
        loss_fn = make_loss()
        metrics = make_metrics(self.metric_names)
        float16 = self.precision == "mixed_float16"

        def train_step(x, y):
            with tf.GradientTape() as tape:
                predictions = model(x, training=True)
                loss = loss_fn(y, predictions)
                scaled_loss = opt.scale_loss(loss) if float16 else loss
            grads = tape.gradient(scaled_loss, model.trainable_variables)
            opt.apply(grads, model.trainable_variables)  # the LossScaleOptimizer unscales here
            for m in metrics:
                m.update_state(y, predictions)
            return loss

        self.step = tf.function(train_step, jit_compile=self.xla)

        def loop(iterator):
            for _ in tf.range(self.k):
                x, y = next(iterator)
                self.step(x, y)

        self.loop = tf.function(loop)

    def run(self, steps):
        if self.k == 1:  # the guide's loop, one step per Python iteration
            for x, y in self.ds.take(steps):
                self.step(x, y)
        else:
            iterator = iter(self.ds)
            for _ in range(steps // self.k):
                self.loop(iterator)
        _sync(self.model)

    def traces(self):
        fn = self.step if self.k == 1 else self.loop
        return fn.experimental_get_tracing_count()


class TrainerStepRunner(TrainerRunner):
    """Diagnostic, not in the default set: the Trainer's compiled loop alone (`Trainer.run_steps`, on the
    iterator the first fit() left), i.e. the Trainer's per-step cost without fit()'s per-call work
    (iterator creation, metric reads and resets, end-of-fit summary). `trainer` minus `trainer_step` is
    fit()'s overhead."""

    name = "trainer_step"

    def run(self, steps):
        t = self.trainer
        if not t.traces["train"]:  # first call: fit builds, traces and compiles
            super().run(steps)
            return
        for _ in range(steps // self.k):
            t.run_steps(self.k)
        _sync(t.model)


class TrainerNoSkipRunner(TrainerRunner):
    """Diagnostic, not in the default set: the Trainer with precision.skip_nonfinite=false. By default each
    update waits until every gradient is known finite (a non-finite step is skipped, not applied); fit and the
    hand loop start a variable's update as soon as its own gradient is ready. `trainer` over `trainer_noskip`
    is what that check costs in a cell."""

    name = "trainer_noskip"
    skip_nonfinite = False


RUNNER_CLASSES = {"trainer": TrainerRunner, "fit": FitRunner, "hand": HandRunner, "trainer_step": TrainerStepRunner,
                  "trainer_noskip": TrainerNoSkipRunner}


class ForgetCustomGradients:
    """Frees what each cell traced once the cell is done.

    Keras' optimizer.apply all-reduces the gradients through the replica context even under the default
    strategy, and that all_reduce is a tf.custom_gradient: tracing it registers a gradient function in
    TensorFlow's global gradient registry whose closure keeps the whole traced FuncGraph, and with it
    the captured model and optimizer variables, alive forever (~250 MB per fit/hand runner of the MLP).
    The cell's runners are gone when this runs, so nothing can ask for those gradients again.
    """

    def __enter__(self):
        self.registry = getattr(getattr(tf_ops, "_gradient_registry", None), "_registry", None)
        self.before = set(self.registry) if isinstance(self.registry, dict) else set()
        return self

    def __exit__(self, *exc):
        if isinstance(self.registry, dict):
            for name in set(self.registry) - self.before:
                if name.startswith("CustomGradient-"):
                    del self.registry[name]
        return False


@dataclasses.dataclass
class Cell:
    """One cell of the matrix: a workload in a precision, XLA off or on, K steps per loop."""

    workload: str
    precision: str
    xla: bool
    k: int
    skipped: Optional[str] = None  # why the cell was not run


def plan_cells(args, gpu: bool) -> List[Cell]:
    """Every requested combination; on CPU, mixed_float16 cells known to be impractically slow are
    skipped (with the reason) unless --include-slow. Measured on the 2-core dev machine: with XLA off,
    TF 2.21's oneDNN float16 path needs 5.4 s for one forward pass of a 784-1024-1024 MLP at batch 64
    (0.017 s with TF_ENABLE_ONEDNN_OPTS=0), and the guide's MLP did not finish 7 steps in 10 minutes;
    with XLA on, a float16 MLP step takes ~3 s, so a K=10 cell alone would take minutes."""
    cells = []
    for wl in args.workloads:
        for p in args.precisions:
            for xla in args.xla:
                for k in args.steps_per_loop:
                    cell = Cell(wl, p, xla, k)
                    if p == "mixed_float16" and not gpu and not args.include_slow:
                        if not xla:
                            cell.skipped = ("CPU, XLA off: TF's oneDNN float16 kernels take seconds per small "
                                            "forward pass (see plan_cells); --include-slow runs it")
                        elif k > 1:
                            cell.skipped = ("CPU: float16 steps take seconds even with XLA, K>1 cells minutes; "
                                            "--include-slow runs it")
                    cells.append(cell)
    return cells


def choose_steps(args, k: int, seconds_per_step: float) -> int:
    """Measured steps per repeat: --steps N, or 'auto': about --target-seconds per call; a multiple of K."""
    if args.steps != "auto":
        n = int(args.steps)
    else:
        n = int(round(args.target_seconds / max(seconds_per_step, 1e-6)))
    n = max(n, args.min_steps, 1)
    return int(math.ceil(n / k) * k)


def _build(cell: Cell, wl: Workload, args, arrays) -> tuple:
    """Each runner's setup and first call (trace + compile + K steps: the activation peak is in there
    too), one runner after another, memory sampled over both; the runners and their records."""
    records, runners = {}, []
    for name in args.runners:
        runner = RUNNER_CLASSES[name](wl, cell.precision, cell.xla, cell.k, arrays, args.metrics)
        with PeakMemory() as mem:
            setup_s = seconds_of(runner.setup)
            first_call_s = seconds_of(functools.partial(runner.run, cell.k))
        records[name] = dict(
            runner=name, setup_s=setup_s, first_call_s=first_call_s,
            memory_kind=mem.kind, peak_mem_mb=mem.peak_mb, mem_delta_mb=mem.delta_mb,
            xla_effective=runner.xla_effective(),
        )
        runners.append(runner)
    return runners, records


def run_cell(cell: Cell, wl: Workload, args, arrays) -> List[dict]:
    """Builds the runners one after another (setup + first call, memory sampled), then warms all of
    them twice (the second pass, timed, sizes the measured calls), then times them interleaved; returns one
    record per runner.

    The warmup comes after *all* builds because TensorFlow re-instantiates a traced function after new
    functions were traced in the process (we measured 0.4-0.8 s on the next call of an already-warm
    runner): warming each runner right after its own build would put that cost in a timed repeat."""
    k = cell.k
    runners, records = _build(cell, wl, args, arrays)
    warm_steps = k * max(1, math.ceil(args.warmup_steps / k))
    for runner in runners:  # absorbs the re-instantiation cost (see above): too slow to size the calls by
        runner.run(warm_steps)
    for runner in runners:
        records[runner.name].update(warmup_step_s=seconds_of(functools.partial(runner.run, warm_steps)) / warm_steps,
                                    traces_after_warmup=runner.traces())
    n = choose_steps(args, k, statistics.median(r["warmup_step_s"] for r in records.values()))
    # Interleaved, the order rotated each round (A B C, B C A, C A B, ...): a runner is not always the one
    # after another runner's call (whose iterator teardown or caches could cost it).
    times = interleaved_seconds({r.name: functools.partial(r.run, n) for r in runners}, rounds=args.repeats,
                                warmup=0, rotate=True)
    out = []
    flops_per_step = wl.train_flops_per_example * wl.batch
    for runner in runners:
        rec = records[runner.name]
        eps = [n * wl.batch / s for s in times[runner.name]]
        step_s = statistics.median(times[runner.name]) / n
        rec.update(
            workload=cell.workload, precision=cell.precision, xla=cell.xla, steps_per_loop=k,
            batch=wl.batch, steps=n, repeats=args.repeats, seconds=times[runner.name],
            examples_per_sec=eps, examples_per_sec_median=statistics.median(eps),
            step_time_s=step_s, time_to_first_step_s=rec["setup_s"] + rec["first_call_s"],
            compile_s=max(0.0, rec["first_call_s"] - k * step_s),
            traces_end=runner.traces(), train_flops_per_step=flops_per_step,
            achieved_gflops=flops_per_step * statistics.median(eps) / wl.batch / 1e9,
        )
        out.append(rec)
    del runners
    return out
