#!/usr/bin/env python
"""Side-by-side training throughput: our Trainer vs Keras `model.fit` vs the hand-written loop (issue #4).

For every cell (workload x precision x XLA x steps_per_loop) three *runners* train the same model on the
same synthetic data with the same global batch and the same optimizer (Adam):

  trainer  trainer.Trainer(...).fit(ds, steps=...), its defaults: Keras' Adam arithmetic in TF's fused
           ResourceApplyAdam kernel (trainer/fused.py), and with XLA the forward/backward compiled and
           the update outside XLA (see trainer/xla_plan.py `plan_xla`)
  fit      model.compile(jit_compile=..., steps_per_execution=K); model.fit(ds, steps_per_epoch=n)
  hand     the custom training loop of the TensorFlow mixed-precision guide, in Keras 3 APIs:
           tf.function(+XLA) step with GradientTape; for float16 a keras LossScaleOptimizer
           (`scale_loss`, gradients of the scaled loss, `apply` unscales). K=1: the guide's
           `for x, y in dataset: step(x, y)`; K>1: K steps in one tf.function over an iterator.

How each runner is measured (identically):
  1. setup: build model/optimizer (timed: `setup_s`).
  2. first call: train K steps (trace + compile + K steps; timed: `first_call_s`).
     time to first step = setup_s + first_call_s; compile_s ~= first_call_s - K * median step time.
  3. once every runner of the cell is built: two warmup calls each (not in the throughput): the first
     absorbs TF's re-instantiation of functions after new traces (0.4-0.8 s), the second, timed, picks
     the number of measured steps n (about --target-seconds per call).
  4. repeats, interleaved A B C, B C A, C A B, ... (rotated, so no runner always follows the same one): each runner trains n more steps in ONE call of its own API
     (one `Trainer.fit`, one `model.fit`, one Python loop over the step function), timed wall-clock
     until a weight is read back. examples/s = n * batch / seconds; the median over repeats is reported.
  5. trainer vs hand/fit: besides the ratio of medians, the ratio of each round's two calls (seconds
     apart), and a one-sided sign test over the rounds: "faster"/"slower" at p < 0.05, else "tie". On a
     shared, noisy machine this tells a real gap from noise (5 repeats: all 5 rounds must agree; 9: 8).
     Over the default matrix's ~54 comparisons a few verdicts at p < 0.05 are expected by chance alone.
  Trace counters are recorded so a retrace inside the measured window would show.

MFU = achieved model FLOP/s / matmul peak of the compute dtype. Model FLOPs are counted analytically
(matmuls and convolutions only; see each workload's `formula`): forward = 2 * MACs; training = forward +
weight gradients (2 * MACs) + input gradients (2 * MACs, except for a first layer fed by the raw input,
whose input gradient is never computed), i.e. 2 * (3 * MACs - MACs_first_layer). The peak is the best
sample of a timed square matmul per dtype (sizes and XLA off/on) measured in the same run. MFU near or
above 100% means the workload's matmuls ran as fast as the standalone one (shapes differ).
For the MLP, its eight training matmuls alone (same shapes and transposes as its step; no bias,
activation, loss or update) are timed too: their best sample is the most a step of that model could
reach with this TF build's kernels (`of_ceiling` = the runner's GFLOP/s over it, same XLA setting).

Memory: on CPU the process RSS is sampled (psutil, every 5 ms) over a runner's setup and first call;
`peak_mem_mb` is the process-wide peak (it includes the runners of the same cell built before) and
`mem_delta_mb` that peak minus the RSS just before the runner's setup (after `malloc_trim`). On GPU
tf.config.experimental.get_memory_info("GPU:0")["peak"] is used instead.

On CPU, mixed_float16 runs only with XLA on and K=1 unless --include-slow (see `plan_cells`); skipped
cells are listed in the output. `--runners ...,trainer_step` adds a diagnostic runner that calls the
Trainer's compiled loop directly, to separate fit()'s per-call cost from its per-step cost.

Data are SYNTHETIC (random tensors, cached in memory, repeated, prefetched; tf.data autotuning off,
see `make_dataset`): the numbers measure the training step, not an input pipeline, and say nothing
about accuracy.

Usage:
  python benchmarks/bench.py                       # the default matrix (about 30 min on a 2-core CPU)
  python benchmarks/bench.py --quick               # tiny shapes and steps: a smoke test (~1 min)
  python benchmarks/bench.py --workloads mlp --precisions float32,mixed_bfloat16 --xla off,on \
      --steps-per-loop 1,10 --steps auto --repeats 3 --out bench_results/
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from tensorflow.python.framework import ops as tf_ops  # noqa: E402  (see ForgetCustomGradients)

# Benchmark the Trainer of the checkout this script lives in, not whichever copy is pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import trainer as trainer_pkg  # noqa: E402
from trainer import Trainer  # noqa: E402
from trainer.layers import BatchNormalization  # noqa: E402
from trainer.memory import PeakMemory  # noqa: E402

RUNNERS = ("trainer", "fit", "hand")  # plus the optional diagnostic "trainer_step"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
COMPUTE_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
SHORT = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}
POOL_BATCHES = 8  # distinct synthetic batches per data set (cycled)
LEARNING_RATE = 1e-3


# ----------------------------------------------------------------------------------------------
# Workloads: model builder, synthetic data, analytic FLOPs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """A model, its batch, its synthetic data and its analytic multiply-accumulate count."""

    name: str
    batch: int
    build: Callable[[], keras.Model]  # builds under the current global dtype policy
    make_data: Callable[[np.random.Generator], Tuple[np.ndarray, np.ndarray]]  # POOL_BATCHES batches
    macs: int  # forward multiply-accumulates per example (matmul/conv only)
    first_layer_macs: int  # MACs of a first layer fed by the raw input: no input gradient
    formula: str
    description: str
    matmul_dims: Optional[Tuple[int, ...]] = None  # an MLP's layer widths: its matmul ceiling is measured

    @property
    def train_flops_per_example(self) -> int:
        return 2 * (3 * self.macs - self.first_layer_macs)


def _softmax_head(x, classes):
    """The guide's rule: the last activation in float32, so the loss is computed in float32."""
    x = keras.layers.Dense(classes, name="dense_logits")(x)
    return keras.layers.Activation("softmax", dtype="float32", name="predictions")(x)


def mlp_workload(units=4096, batch=512, in_dim=784, classes=10) -> Workload:
    """The mixed-precision guide's model: 784-4096-4096-10, softmax in float32."""

    def build():
        inputs = keras.Input((in_dim,), name="digits")
        x = keras.layers.Dense(units, activation="relu", name="dense_1")(inputs)
        x = keras.layers.Dense(units, activation="relu", name="dense_2")(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="mlp")

    def data(rng):
        x = rng.random((POOL_BATCHES, batch, in_dim), dtype=np.float32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    macs = in_dim * units + units * units + units * classes
    return Workload(
        "mlp", batch, build, data, macs, in_dim * units,
        f"MACs = {in_dim}*{units} + {units}*{units} + {units}*{classes}; first layer {in_dim}*{units}",
        f"MLP {in_dim}-{units}-{units}-{classes} (the TF mixed-precision guide's model), batch {batch}",
        (in_dim, units, units, classes),
    )


def resnet_workload(widths=(16, 32, 64), hw=32, batch=128, classes=10) -> Workload:
    """A small CIFAR-style ResNet: 3x3 stem, one basic block per stage (stride 2 after the first),
    1x1 projection shortcuts, BatchNorm (the recipes' fused one, trainer.layers), global average pooling."""

    def build():
        inputs = keras.Input((hw, hw, 3), name="images")

        def conv_bn(x, filters, kernel, stride):
            x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False)(x)
            return BatchNormalization()(x)

        x = keras.layers.ReLU()(conv_bn(inputs, widths[0], 3, 1))
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            y = keras.layers.ReLU()(conv_bn(x, w, 3, stride))
            y = conv_bn(y, w, 3, 1)
            shortcut = x if stride == 1 and x.shape[-1] == w else conv_bn(x, w, 1, stride)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="resnet")

    def data(rng):
        x = rng.standard_normal((POOL_BATCHES, batch, hw, hw, 3), dtype=np.float32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    stem = hw * hw * 9 * 3 * widths[0]
    macs, cin = stem, widths[0]
    for i, w in enumerate(widths):
        s = hw // (2**i)  # output side of this stage
        macs += s * s * 9 * cin * w + s * s * 9 * w * w + (s * s * cin * w if (i or cin != w) else 0)
        cin = w
    macs += widths[-1] * classes
    return Workload(
        "resnet", batch, build, data, macs, stem,
        "MACs = stem hw^2*9*3*w0 + per stage s^2*9*(cin*w + w*w) [+ s^2*cin*w shortcut] + w_last*classes",
        f"ResNet (3 stages x 1 basic block, widths {widths}) on {hw}x{hw}x3, batch {batch}",
    )


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position vector to each token embedding."""

    def build(self, input_shape):
        self.positions = self.add_weight(shape=tuple(input_shape[1:]), initializer="glorot_uniform", name="positions")

    def call(self, x):
        return x + keras.ops.cast(self.positions, x.dtype)


def transformer_workload(seq=64, d=128, heads=4, ff=512, layers=2, vocab=8192, batch=64, classes=10) -> Workload:
    """A small post-LN Transformer encoder classifier over token ids (mean-pooled)."""

    def build():
        inputs = keras.Input((seq,), dtype="int32", name="tokens")
        x = PositionEmbedding()(keras.layers.Embedding(vocab, d)(inputs))
        for _ in range(layers):
            a = keras.layers.MultiHeadAttention(heads, d // heads)(x, x)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, a]))
            f = keras.layers.Dense(ff, activation="gelu")(x)
            f = keras.layers.Dense(d)(f)
            x = keras.layers.LayerNormalization()(keras.layers.Add()([x, f]))
        x = keras.layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, _softmax_head(x, classes), name="transformer")

    def data(rng):
        x = rng.integers(0, vocab, (POOL_BATCHES, batch, seq), dtype=np.int32)
        return x, rng.integers(0, classes, (POOL_BATCHES, batch), dtype=np.int32)

    macs = layers * (4 * seq * d * d + 2 * seq * seq * d + 2 * seq * d * ff) + d * classes
    return Workload(
        "transformer", batch, build, data, macs, 0,
        "MACs = L*(4*T*d^2 [QKVO] + 2*T^2*d [scores, context] + 2*T*d*ff [FFN]) + d*classes; "
        "the embedding is a gather (0 MACs) and needs input gradients downstream",
        f"Transformer encoder: {layers} layers, T={seq}, d={d}, {heads} heads, ff={ff}, vocab={vocab}, batch {batch}",
    )


def workloads(quick: bool) -> Dict[str, Workload]:
    """The issue's workloads; `quick` shrinks every shape so a smoke test runs in seconds."""
    if quick:
        return {
            "mlp": mlp_workload(units=256, batch=64),
            "resnet": resnet_workload(widths=(8, 16, 16), hw=16, batch=32),
            "transformer": transformer_workload(seq=16, d=32, heads=2, ff=64, layers=1, vocab=256, batch=16),
        }
    return {"mlp": mlp_workload(), "resnet": resnet_workload(), "transformer": transformer_workload()}


def make_dataset(arrays) -> tf.data.Dataset:
    """Whole batches from an in-memory pool: cached, repeated, prefetched (no input-pipeline cost).

    tf.data autotuning is off: there is nothing to tune here, and with it on, destroying an iterator
    waits for the autotuner's next wake-up (10 ms after the iterator was made, then doubling periods),
    i.e. up to the iterator's own age. `model.fit` and the hand loop make a new iterator in every timed
    call (the Trainer keeps its own), so their calls took 0-100% longer, at random: calls of 3.0-3.5 s
    measured 5.11 s = (2^9 - 1) x 10 ms."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return tf.data.Dataset.from_tensor_slices(arrays).cache().repeat().prefetch(2).with_options(options)


def make_loss():
    return keras.losses.SparseCategoricalCrossentropy()  # the model outputs float32 probabilities


def make_metrics(names: List[str]):
    table = {"accuracy": lambda: keras.metrics.SparseCategoricalAccuracy(name="accuracy")}
    return [table[n]() for n in names]


# ----------------------------------------------------------------------------------------------
# Runners: one object per (cell, runner); setup() builds, run(n) trains n more steps in one call
# ----------------------------------------------------------------------------------------------


def _sync(model: keras.Model) -> None:
    """Reads a weight back: the call is only finished when its last update is (matters on GPU)."""
    model.trainable_variables[-1].numpy()


class Runner:
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

    def setup(self):
        self.trainer = Trainer(
            model=self.wl.build,
            loss=make_loss(),
            optimizer=lambda: keras.optimizers.Adam(LEARNING_RATE),
            metrics=make_metrics(self.metric_names),
            precision=self.precision,
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


RUNNER_CLASSES = {"trainer": TrainerRunner, "fit": FitRunner, "hand": HandRunner, "trainer_step": TrainerStepRunner}


# ----------------------------------------------------------------------------------------------
# Memory and the matmul peak
# ----------------------------------------------------------------------------------------------


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


def _interleaved_gflops(programs: Dict[tuple, tuple], repeats: int, target_s: float) -> Dict[tuple, List[float]]:
    """GFLOP/s samples of each program, `repeats` rounds interleaved A B C A B C ...

    programs: key -> (a tf.function, its args, FLOPs per call). Each is traced/compiled, then timed once
    to size its samples (about target_s each); a sample ends when its last result is read back.
    """
    reps = {}
    for key, (fn, args, _) in programs.items():
        tf.nest.flatten(fn(*args))[0].numpy()  # trace/compile
        t = time.perf_counter()
        tf.nest.flatten(fn(*args))[0].numpy()
        reps[key] = max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))
    samples = {key: [] for key in programs}
    for _ in range(repeats):
        for key, (fn, args, flops) in programs.items():
            t = time.perf_counter()
            for _ in range(reps[key]):
                out = fn(*args)
            tf.nest.flatten(out)[0].numpy()
            samples[key].append(flops * reps[key] / (time.perf_counter() - t) / 1e9)
    return samples


def _best_per_dtype(dtypes, cells_of) -> Dict[str, dict]:
    """Per dtype: the best sample over its cells (name -> samples), which cell gave it, and medians."""
    result = {}
    for dt in dtypes:
        cells = cells_of(dt)
        best = max(cells, key=lambda c: max(cells[c]))
        result[dt] = {"gflops": max(cells[best]), "best": best,
                      "median_gflops": {c: statistics.median(v) for c, v in cells.items()}, "samples_gflops": cells}
    return result


def measure_matmul_peak(dtypes, sizes, repeats: int, target_s: float) -> Dict[str, dict]:
    """GFLOP/s of an n x n @ n x n matmul per dtype, size and XLA setting; repeats interleaved.

    The peak of a dtype is the best sample over sizes, XLA settings and repeats: what this TF build can
    get out of the hardware at all. Contention only ever slows a sample down, so on a shared machine the
    best sample is the closest to the uncontended peak (workloads use medians: MFU errs low, not high).
    """
    programs = {}
    for dt in dtypes:
        for n in sizes:
            a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2)), dt)
            b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4)), dt)
            for xla in (False, True):
                programs[(dt, n, xla)] = (tf.function(lambda a, b: tf.matmul(a, b), jit_compile=xla), (a, b), 2 * n**3)
    samples = _interleaved_gflops(programs, repeats, target_s)
    return _best_per_dtype(dtypes, lambda dt: {f"n={n},xla={'on' if xla else 'off'}": v
                                               for (d, n, xla), v in samples.items() if d == dt})


def measure_mlp_ceiling(dtypes, wl: Workload, repeats: int, target_s: float) -> Dict[str, dict]:
    """GFLOP/s of the MLP's training matmuls alone, per dtype and XLA setting; repeats interleaved.

    Why: the square-matmul peak is not what oneDNN reaches on the MLP's shapes (batch-row matmuls,
    the transposed operands of the gradients). This is the same eight tf.matmul calls a training step
    makes (3 forward; per layer a weight gradient x^T @ dy, and an input gradient dy @ W^T except for the
    first layer), with nothing else: no bias, activation, loss or update. Best sample, as for the peak.
    """

    def step(x, ws):
        hs = [x]
        for w in ws:
            hs.append(tf.matmul(hs[-1], w))
        dh, outs = hs[-1], []
        for i in reversed(range(len(ws))):
            outs.append(tf.matmul(hs[i], dh, transpose_a=True))  # weight gradient
            if i:
                dh = tf.matmul(dh, ws[i], transpose_b=True)  # input gradient
        return [o[0, 0] for o in outs]

    dims, batch = wl.matmul_dims, wl.batch
    flops = wl.train_flops_per_example * batch  # the same analytic count as the workload's MFU
    programs = {}
    for dt in dtypes:
        x = tf.cast(tf.random.stateless_normal((batch, dims[0]), seed=(5, 6)), dt)
        ws = [tf.cast(tf.random.stateless_normal((a, b), seed=(7, i)) / a**0.5, dt) for i, (a, b) in enumerate(zip(dims, dims[1:]))]
        for xla in (False, True):
            programs[(dt, xla)] = (tf.function(step, jit_compile=xla), (x, ws), flops)
    samples = _interleaved_gflops(programs, repeats, target_s)
    result = _best_per_dtype(dtypes, lambda dt: {f"xla={'on' if xla else 'off'}": v for (d, xla), v in samples.items() if d == dt})
    for r in result.values():
        r["by_xla_gflops"] = {c: max(v) for c, v in r["samples_gflops"].items()}
    return result


# ----------------------------------------------------------------------------------------------
# The matrix
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Cell:
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
                            cell.skipped = "CPU: float16 steps take seconds even with XLA, K>1 cells minutes; --include-slow runs it"
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


def run_cell(cell: Cell, wl: Workload, args, arrays) -> List[dict]:
    """Builds the runners one after another (setup + first call, memory sampled), then warms all of
    them twice (the second pass, timed, sizes the measured calls), then times them interleaved; returns one
    record per runner.

    The warmup comes after *all* builds because TensorFlow re-instantiates a traced function after new
    functions were traced in the process (we measured 0.4-0.8 s on the next call of an already-warm
    runner): warming each runner right after its own build would put that cost in a timed repeat."""
    k, records, runners = cell.k, {}, []
    warm_steps = k * max(1, math.ceil(args.warmup_steps / k))
    for name in args.runners:
        runner = RUNNER_CLASSES[name](wl, cell.precision, cell.xla, k, arrays, args.metrics)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            runner.setup()
            t1 = time.perf_counter()
            runner.run(k)  # trace + compile + K steps: the activation peak is in here too
            t2 = time.perf_counter()
        records[name] = dict(
            runner=name, setup_s=t1 - t0, first_call_s=t2 - t1,
            memory_kind=mem.kind, peak_mem_mb=mem.peak_mb, mem_delta_mb=mem.delta_mb,
            xla_effective=runner.xla_effective(),
        )
        runners.append(runner)
    for runner in runners:  # absorbs the re-instantiation cost (see above): too slow to size the calls by
        runner.run(warm_steps)
    for runner in runners:
        t = time.perf_counter()
        runner.run(warm_steps)
        records[runner.name].update(warmup_step_s=(time.perf_counter() - t) / warm_steps, traces_after_warmup=runner.traces())
    n = choose_steps(args, k, statistics.median(r["warmup_step_s"] for r in records.values()))
    times = {r.name: [] for r in runners}
    for i in range(args.repeats):
        # Interleaved, the order rotated each round (A B C, B C A, C A B, ...): a runner is not always
        # the one after another runner's call (whose iterator teardown or caches could cost it).
        for runner in runners[i % len(runners):] + runners[:i % len(runners)]:
            t = time.perf_counter()
            runner.run(n)
            times[runner.name].append(time.perf_counter() - t)
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


# ----------------------------------------------------------------------------------------------
# Output: table, goals, JSON, PNG
# ----------------------------------------------------------------------------------------------


def _fmt(x, spec, none="-"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def add_ratios_and_mfu(results: List[dict], peak: Dict[str, dict], ceiling: Dict[str, dict]) -> None:
    """vs_hand / vs_fit: this runner's median examples/s over the other runner's in the same cell.
    of_ceiling (MLP): achieved GFLOP/s over its bare matmuls' best with the same XLA setting."""
    by_cell: Dict[tuple, Dict[str, dict]] = {}
    for r in results:
        by_cell.setdefault((r["workload"], r["precision"], r["xla"], r["steps_per_loop"]), {})[r["runner"]] = r
    for cell in by_cell.values():
        for r in cell.values():
            for other in ("hand", "fit"):
                o = cell.get(other)
                r[f"vs_{other}"] = r["examples_per_sec_median"] / o["examples_per_sec_median"] if o else None
                if o:  # round i of both: calls of the same length seconds apart, so slow drifts of the machine cancel
                    paired = [b / a for a, b in zip(r["seconds"], o["seconds"])]
                    r[f"paired_vs_{other}"] = statistics.median(paired)
                    r[f"rounds_faster_vs_{other}"] = sum(x > 1 for x in paired)
                    r[f"verdict_vs_{other}"], r[f"p_vs_{other}"] = sign_test(paired)
            p = peak.get(COMPUTE_DTYPE[r["precision"]])
            r["peak_gflops"] = p["gflops"] if p else None
            r["mfu"] = r["achieved_gflops"] / p["gflops"] if p else None
            c = ceiling.get(COMPUTE_DTYPE[r["precision"]]) if r["workload"] == "mlp" else None
            r["ceiling_gflops"] = c["by_xla_gflops"][f"xla={'on' if r['xla_effective'] else 'off'}"] if c else None
            r["of_ceiling"] = r["achieved_gflops"] / r["ceiling_gflops"] if c else None


def sign_test(ratios: List[float], alpha: float = 0.05) -> tuple:
    """Paired rounds of two runners (speed ratio per round): "faster" or "slower" when a one-sided sign
    test says so at `alpha` (5 rounds: all 5; 9 rounds: 8 of 9), else "tie". Returns (verdict, p)."""
    n = len(ratios)

    def p_at_least(k):
        return sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n

    p_faster, p_slower = p_at_least(sum(x > 1 for x in ratios)), p_at_least(sum(x < 1 for x in ratios))
    if p_faster < alpha:
        return "faster", p_faster
    if p_slower < alpha:
        return "slower", p_slower
    return "tie", min(p_faster, p_slower)


def spread(r: dict) -> float:
    """(max - min) / median of a runner's repeats: how noisy its cell was."""
    e = r["examples_per_sec"]
    return (max(e) - min(e)) / statistics.median(e)


def check_goals(results: List[dict], peak: Dict[str, dict]) -> List[dict]:
    """The issue's performance goals, evaluated on this run's numbers (no thresholds are bent); the notes
    give what bounds each one on this machine (the peaks' ratio, the MLP's bare matmuls)."""
    goals = []
    cells: Dict[tuple, Dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["workload"], r["precision"], r["xla"], r["steps_per_loop"]), {})[r["runner"]] = r
    for key, c in sorted(cells.items(), key=lambda kv: str(kv[0])):
        t = c.get("trainer")
        for other in ("hand", "fit"):
            if t and other in c:
                ratio = t[f"vs_{other}"]
                noise = max(spread(t), spread(c[other]))
                goals.append(dict(
                    goal=f"trainer >= 1.0x {other}", cell=_cell_name(*key), value=ratio, target=1.0,
                    passed=ratio >= 1.0, verdict=t[f"verdict_vs_{other}"],
                    note=f"paired rounds: median {t[f'paired_vs_{other}']:.2f}, faster in {t[f'rounds_faster_vs_{other}']}/{len(t['seconds'])}: "
                         f"{t[f'verdict_vs_{other}']} (sign test p={t[f'p_vs_{other}']:.2f}); repeat spread up to {noise:.0%}",
                ))
    for (wl, p, xla, k), c in cells.items():
        if wl == "mlp" and p == "mixed_bfloat16" and "trainer" in c:
            f32 = cells.get((wl, "float32", xla, k), {}).get("trainer")
            if f32:
                ratio = c["trainer"]["examples_per_sec_median"] / f32["examples_per_sec_median"]
                note = ""
                if "bfloat16" in peak and "float32" in peak:
                    note = f"matmul peak bf16/f32 here: {peak['bfloat16']['gflops'] / peak['float32']['gflops']:.2f}x"
                if c["trainer"].get("ceiling_gflops") and f32.get("ceiling_gflops"):
                    note += f"; the MLP's bare matmuls: {c['trainer']['ceiling_gflops'] / f32['ceiling_gflops']:.2f}x"
                goals.append(dict(goal="mlp: mixed_bfloat16 >= 1.5x float32 (trainer)", cell=_cell_name(wl, p, xla, k),
                                  value=ratio, target=1.5, passed=ratio >= 1.5, note=note))
        if wl == "mlp" and p in ("float32", "mixed_bfloat16") and "trainer" in c and c["trainer"]["mfu"] is not None:
            t = c["trainer"]
            note = f"peak {t['peak_gflops']:.0f} GFLOP/s"
            if t.get("ceiling_gflops"):
                note += (f"; the MLP's bare matmuls reach {t['ceiling_gflops']:.0f} ({t['ceiling_gflops'] / t['peak_gflops']:.0%}"
                         f" of it), the trainer {t['of_ceiling']:.0%} of those")
            goals.append(dict(goal="mlp: trainer >= 80% of matmul peak", cell=_cell_name(wl, p, xla, k),
                              value=t["mfu"], target=0.8, passed=t["mfu"] >= 0.8, note=note))
    return goals


def _cell_name(wl, p, xla, k):
    return f"{wl}/{SHORT[p]}/xla-{'on' if xla else 'off'}/K={k}"


LEGEND = """
ex/s: median examples/s over the interleaved repeats (each repeat: one API call training `steps` steps).
spread: (max - min) / median of those repeats.  xhand, xfit: ex/s over the hand loop's / Keras fit's in
the same cell.  GFLOP/s: analytic model FLOPs (matmul/conv) per second.  MFU: GFLOP/s over the matmul peak
of the compute dtype.  1st step s: setup + first call (trace + compile + K steps).  compile s: first call
minus K x the median step time.  peak MB: process RSS peak over setup + first call (all runners of the
cell built so far are alive);  dMB: its growth over the RSS before setup (GPU: allocator peak).
xla "!" : the runner ran without XLA although it was asked for (Keras does so under tf.distribute).
Goals, trainer vs hand/fit: the ratio of medians decides PASS (>= 1.0); "paired rounds" divides the two
runners' calls of the same round (seconds apart, so the machine's slow drifts cancel), and a sign test
over the rounds says faster/slower only when enough rounds agree (p < 0.05; among many comparisons a few
such verdicts are chance), otherwise "tie"."""


def print_table(results: List[dict], skipped: List[Cell], peak: Dict[str, dict], ceiling: Dict[str, dict],
                goals: List[dict], meta: dict) -> None:
    print()
    print(f"Synthetic data (random tensors cached in memory). {meta['machine']}. "
          f"Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}")
    print("Matmul peak (best sample, GFLOP/s): " + ", ".join(f"{dt} {v['gflops']:.0f} ({v['best']})" for dt, v in peak.items()))
    if ceiling:
        print("MLP's training matmuls alone (best sample, GFLOP/s): " + ", ".join(
            f"{dt} " + " / ".join(f"{g:.0f} ({c})" for c, g in v["by_xla_gflops"].items())
            + f" = {v['gflops'] / peak[dt]['gflops']:.0%} of the peak" for dt, v in ceiling.items()))
    header = (f"{'workload':<11} {'prec':<4} {'xla':<3} {'K':>3} {'runner':<12} {'ex/s':>9} {'spread':>6} "
              f"{'xhand':>6} {'xfit':>6} {'GFLOP/s':>8} {'MFU':>5} {'1st step s':>10} {'compile s':>9} "
              f"{'peak MB':>8} {'dMB':>6} {'steps':>5}")
    print(header)
    print("-" * len(header))
    last = None
    for r in results:
        cell = (r["workload"], r["precision"], r["xla"], r["steps_per_loop"])
        if last is not None and cell[:2] != last[:2]:
            print()
        last = cell
        xla = ("on" if r["xla"] else "off") + ("" if r["xla_effective"] == r["xla"] else "!")
        print(f"{r['workload']:<11} {SHORT[r['precision']]:<4} {xla:<3} {r['steps_per_loop']:>3} {r['runner']:<12} "
              f"{r['examples_per_sec_median']:>9.0f} {spread(r):>6.0%} {_fmt(r['vs_hand'], '6.2f'):>6} "
              f"{_fmt(r['vs_fit'], '6.2f'):>6} {r['achieved_gflops']:>8.1f} {_fmt(r['mfu'] and 100 * r['mfu'], '4.0f'):>4}% "
              f"{r['time_to_first_step_s']:>10.2f} {r['compile_s']:>9.2f} {r['peak_mem_mb']:>8.0f} {r['mem_delta_mb']:>6.0f} {r['steps']:>5}")
    print(LEGEND)
    if skipped:
        print("\nSkipped cells:")
        for c in skipped:
            print(f"  {_cell_name(c.workload, c.precision, c.xla, c.k)}: {c.skipped}")
    print("\nGoals (issue #4):")
    for g in goals:
        mark = "PASS" if g["passed"] else "FAIL"
        print(f"  [{mark}] {g['goal']:<46} {g['cell']:<29} {g['value']:.2f} (target {g['target']}) {g['note']}")
    passed = sum(g["passed"] for g in goals)
    print(f"  {passed}/{len(goals)} passed")
    versus = [g for g in goals if "verdict" in g]
    if versus:
        counts = {v: sum(g["verdict"] == v for g in versus) for v in ("faster", "tie", "slower")}
        print(f"  trainer vs hand/fit, paired rounds and a sign test (p < 0.05): faster in {counts['faster']}, "
              f"tie in {counts['tie']}, slower in {counts['slower']} of {len(versus)} comparisons")


def plot(results: List[dict], path: Path) -> None:
    """Median examples/s (min-max whiskers) and MFU per cell, one column per workload. Without
    matplotlib (the `bench` extra) the figures are still printed and saved; only the picture is skipped."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot: skipped {path.name} (matplotlib is not installed: pip install -e '.[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(dict.fromkeys(r["workload"] for r in results))
    runners = list(dict.fromkeys(r["runner"] for r in results))
    fig, axes = plt.subplots(2, len(wls), figsize=(6 * len(wls), 8), squeeze=False)
    width = 0.8 / max(len(runners), 1)
    for col, wl in enumerate(wls):
        rows = [r for r in results if r["workload"] == wl]
        cells = list(dict.fromkeys((r["precision"], r["xla"], r["steps_per_loop"]) for r in rows))
        labels = [f"{SHORT[p]}\nXLA {'on' if x else 'off'}\nK={k}" for p, x, k in cells]
        for i, name in enumerate(runners):
            med, lo, hi, mfu = [], [], [], []
            for cell in cells:
                r = next((r for r in rows if (r["precision"], r["xla"], r["steps_per_loop"]) == cell and r["runner"] == name), None)
                m = r["examples_per_sec_median"] if r else 0
                med.append(m)
                lo.append(m - min(r["examples_per_sec"]) if r else 0)
                hi.append(max(r["examples_per_sec"]) - m if r else 0)
                mfu.append(100 * (r["mfu"] or 0) if r else 0)
            xs = np.arange(len(cells)) + (i - (len(runners) - 1) / 2) * width
            axes[0, col].bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
            axes[1, col].bar(xs, mfu, width, label=name)
        for row, ylabel in ((0, "examples/s (median, min-max)"), (1, "MFU % of matmul peak")):
            ax = axes[row, col]
            ax.set_xticks(np.arange(len(cells)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set_title(f"{wl} (synthetic data)")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provenance() -> dict:
    """Which Trainer was measured: its package folder and the checkout's commit (dirty if edited)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    info = {"trainer_package": str(Path(trainer_pkg.__file__).parent)}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trainer"], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        info["git_commit"] = commit + ("+dirty trainer/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return f"{name}, {os.cpu_count()} CPUs" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _list(choices=None, cast=str):
    def parse(text):
        items = [cast(x.strip()) for x in text.split(",") if x.strip()]
        bad = [x for x in items if choices and x not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
        return items

    return parse


def _xla(text):
    table = {"off": False, "on": True}
    items = [x.strip() for x in text.split(",") if x.strip()]
    if any(x not in table for x in items):
        raise argparse.ArgumentTypeError("--xla takes off,on")
    return [table[x] for x in items]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=_list(("mlp", "resnet", "transformer")), default=["mlp", "resnet", "transformer"])
    p.add_argument("--precisions", type=_list(PRECISIONS), default=None, help=f"default {','.join(PRECISIONS)}")
    p.add_argument("--xla", type=_xla, default=None, help="off,on (the default)")
    p.add_argument("--steps-per-loop", type=_list(cast=int), default=None, help="K values; default 1,10")
    p.add_argument("--runners", type=_list(RUNNERS + ("trainer_step",)), default=list(RUNNERS),
                   help="trainer,fit,hand; add trainer_step to separate fit()'s per-call overhead")
    p.add_argument("--steps", default="auto", help="measured steps per repeat, or 'auto' (about --target-seconds)")
    p.add_argument("--target-seconds", type=float, default=1.5, help="auto steps: seconds per measured call")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of each warmup call after the first call, not counted in the throughput (rounded up to K)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--metrics", type=_list(("accuracy",)), default=[], help="extra metrics for all runners (e.g. accuracy)")
    p.add_argument("--peak-sizes", type=_list(cast=int), default=[1024, 2048, 4096])
    p.add_argument("--include-slow", action="store_true", help="run the mixed_float16 cells skipped on CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes and steps, and unless given: float32 and "
                   "mixed_bfloat16, XLA off, K=1,2 (a ~1-2 min smoke test; numbers not comparable)")
    p.add_argument("--out", type=Path, default=Path("bench_results"))
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    defaults = dict(precisions=list(PRECISIONS), xla=[False, True], steps_per_loop=[1, 10])
    if args.quick:
        defaults = dict(precisions=["float32", "mixed_bfloat16"], xla=[False], steps_per_loop=[1, 2])
        args.steps, args.repeats, args.warmup_steps, args.min_steps = "2", min(args.repeats, 2), 1, 1
        args.peak_sizes = [256]
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("trainer").setLevel(logging.WARNING)
    # The guide's 10-unit logits layer is not a multiple of 8: the Trainer says so for every bf16 cell.
    logging.getLogger("trainer.precision").setLevel(logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)  # the peak's many small tf.functions trip the retrace warning
    keras.utils.disable_interactive_logging()
    gpu = bool(tf.config.list_physical_devices("GPU"))
    start = time.perf_counter()
    meta = dict(
        issue="#4", data="synthetic: random tensors, cached in memory, repeated, prefetched, tf.data autotuning off", quick=args.quick,
        machine=machine(), tensorflow=tf.__version__, keras=keras.__version__, python=platform.python_version(),
        loadavg_start=[round(x, 2) for x in os.getloadavg()], args={k: str(v) for k, v in vars(args).items()},
        **provenance(),
        flops="training FLOPs/example = 2*(3*MACs - MACs of a first layer fed by the raw input); matmul/conv only",
        measurement="wall-clock of one API call training n steps, after a first call (trace+compile+K steps) and "
                    "a warmup call; repeats interleaved across runners; medians; per-round paired ratios with a sign test",
    )
    wls = workloads(args.quick)
    dtypes = sorted({COMPUTE_DTYPE[p] for p in args.precisions}, key=list(COMPUTE_DTYPE.values()).index)
    print(f"Measuring the matmul peak for {dtypes} (sizes {args.peak_sizes}, XLA off/on)...", flush=True)
    peak = measure_matmul_peak(dtypes, args.peak_sizes, repeats=max(args.repeats, 1), target_s=0.05 if args.quick else 0.3)
    ceiling = {}
    if "mlp" in args.workloads:
        print("Measuring the MLP's matmuls alone (its matmul ceiling)...", flush=True)
        ceiling = measure_mlp_ceiling(dtypes, wls["mlp"], repeats=max(args.repeats, 1),
                                      target_s=0.05 if args.quick else 0.5)
    cells = plan_cells(args, gpu)
    results, skipped = [], [c for c in cells if c.skipped]
    todo = [c for c in cells if not c.skipped]
    for i, cell in enumerate(todo, 1):
        wl = wls[cell.workload]
        print(f"[{i}/{len(todo)}] {_cell_name(cell.workload, cell.precision, cell.xla, cell.k)} "
              f"({time.perf_counter() - start:.0f}s elapsed)", flush=True)
        arrays = wl.make_data(np.random.default_rng(0))
        t_cell = time.perf_counter()
        try:
            with ForgetCustomGradients():
                records = run_cell(cell, wl, args, arrays)
            for r in records:
                r["cell_seconds"] = time.perf_counter() - t_cell  # where the benchmark's own time goes
            results.extend(records)
        except Exception as e:  # noqa: BLE001 - one broken cell must not lose the others; it is reported
            cell.skipped = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            skipped.append(cell)
            print(f"  {cell.skipped}", flush=True)
            traceback.print_exc()
        keras.mixed_precision.set_dtype_policy("float32")
        keras.backend.clear_session()
        gc.collect()
    add_ratios_and_mfu(results, peak, ceiling)
    goals = check_goals(results, peak)
    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["wall_seconds"] = time.perf_counter() - start
    report = dict(
        meta=meta,
        workloads={n: dict(description=w.description, batch=w.batch, macs_per_example=w.macs,
                           train_flops_per_example=w.train_flops_per_example, formula=w.formula)
                   for n, w in wls.items() if n in args.workloads},
        matmul_peak_gflops=peak,
        mlp_matmul_ceiling_gflops=ceiling,
        results=results,
        skipped=[dict(cell=_cell_name(c.workload, c.precision, c.xla, c.k), reason=c.skipped) for c in skipped],
        goals=goals,
    )
    print_table(results, skipped, peak, ceiling, goals, meta)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(report, indent=1, default=float))
    if not args.no_plot and results:
        plot(results, args.out / "bench.png")
    print(f"\nWrote {args.out / 'bench.json'}" + ("" if args.no_plot else f" and {args.out / 'bench.png'}")
          + f" in {meta['wall_seconds']:.0f}s")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
