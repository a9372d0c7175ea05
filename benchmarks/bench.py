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
  4. repeats, interleaved A B C, B C A, C A B, ... (rotated, so no runner always follows the same one):
     each runner trains n more steps in ONE call of its own API (one `Trainer.fit`, one `model.fit`, one
     Python loop over the step function), timed wall-clock until a weight is read back.
     examples/s = n * batch / seconds; the median over repeats is reported.
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

On CPU, mixed_float16 runs only with XLA on and K=1 unless --include-slow (see `runners.plan_cells`);
skipped cells are listed in the output. `--runners ...,trainer_step` adds a diagnostic runner that calls
the Trainer's compiled loop directly, to separate fit()'s per-call cost from its per-step cost;
`trainer_noskip` adds the Trainer with precision.skip_nonfinite=false (updates do not wait for the check that
every gradient is finite), to measure what that check costs.

Data are SYNTHETIC (random tensors, cached in memory, repeated, prefetched; tf.data autotuning off,
see `workloads.make_dataset`): the numbers measure the training step, not an input pipeline, and say
nothing about accuracy.

Usage:
  python benchmarks/bench.py                       # the default matrix (about 30 min on a 2-core CPU)
  python benchmarks/bench.py --quick               # tiny shapes and steps: a smoke test (~1 min)
  python benchmarks/bench.py --workloads mlp --precisions float32,mixed_bfloat16 --xla off,on \
      --steps-per-loop 1,10 --steps auto --repeats 3 --out bench_results/
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

# Benchmark the Trainer of the checkout this script lives in, not whichever copy is pip-installed; its
# parts are the package benchmarks/ (workloads, runners, peak, report).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.peak import measure_matmul_peak, measure_mlp_ceiling  # noqa: E402
from benchmarks.report import add_ratios_and_mfu, cell_name, check_goals, machine, plot, print_table, provenance  # noqa: E402
from benchmarks.runners import RUNNERS, ForgetCustomGradients, plan_cells, run_cell  # noqa: E402
from benchmarks.workloads import COMPUTE_DTYPE, PRECISIONS, workloads  # noqa: E402


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
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", type=_list(("mlp", "resnet", "transformer")),
                   default=["mlp", "resnet", "transformer"])
    p.add_argument("--precisions", type=_list(PRECISIONS), default=None, help=f"default {','.join(PRECISIONS)}")
    p.add_argument("--xla", type=_xla, default=None, help="off,on (the default)")
    p.add_argument("--steps-per-loop", type=_list(cast=int), default=None, help="K values; default 1,10")
    p.add_argument("--runners", type=_list(RUNNERS + ("trainer_step", "trainer_noskip")), default=list(RUNNERS),
                   help="trainer,fit,hand; add trainer_step to separate fit()'s per-call overhead, trainer_noskip "
                        "to measure the non-finite check (precision.skip_nonfinite=false)")
    p.add_argument("--steps", default="auto", help="measured steps per repeat, or 'auto' (about --target-seconds)")
    p.add_argument("--target-seconds", type=float, default=1.5, help="auto steps: seconds per measured call")
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=1, help="steps of each warmup call after the first call, "
                   "not counted in the throughput (rounded up to K)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--metrics", type=_list(("accuracy",)), default=[],
                   help="extra metrics for all runners (e.g. accuracy)")
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


def _meta(args) -> dict:
    return dict(
        issue="#4", data="synthetic: random tensors, cached in memory, repeated, prefetched, tf.data autotuning off",
        quick=args.quick,
        machine=machine(), tensorflow=tf.__version__, keras=keras.__version__, python=platform.python_version(),
        loadavg_start=[round(x, 2) for x in os.getloadavg()], args={k: str(v) for k, v in vars(args).items()},
        **provenance(),
        flops="training FLOPs/example = 2*(3*MACs - MACs of a first layer fed by the raw input); matmul/conv only",
        measurement="wall-clock of one API call training n steps, after a first call (trace+compile+K steps) and "
                    "a warmup call; repeats interleaved across runners; medians; per-round paired ratios with a "
                    "sign test",
    )


def _references(args, wls) -> tuple:
    """The matmul peak of each compute dtype, and the MLP's matmul ceiling when the MLP runs."""
    dtypes = sorted({COMPUTE_DTYPE[p] for p in args.precisions}, key=list(COMPUTE_DTYPE.values()).index)
    print(f"Measuring the matmul peak for {dtypes} (sizes {args.peak_sizes}, XLA off/on)...", flush=True)
    peak = measure_matmul_peak(dtypes, args.peak_sizes, repeats=max(args.repeats, 1),
                               target_s=0.05 if args.quick else 0.3)
    ceiling = {}
    if "mlp" in args.workloads:
        print("Measuring the MLP's matmuls alone (its matmul ceiling)...", flush=True)
        ceiling = measure_mlp_ceiling(dtypes, wls["mlp"], repeats=max(args.repeats, 1),
                                      target_s=0.05 if args.quick else 0.5)
    return peak, ceiling


def _run_cells(args, wls, start: float) -> tuple:
    """Every planned cell in turn; a cell that fails is reported among the skipped ones."""
    cells = plan_cells(args, bool(tf.config.list_physical_devices("GPU")))
    results, skipped = [], [c for c in cells if c.skipped]
    todo = [c for c in cells if not c.skipped]
    for i, cell in enumerate(todo, 1):
        wl = wls[cell.workload]
        print(f"[{i}/{len(todo)}] {cell_name(cell.workload, cell.precision, cell.xla, cell.k)} "
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
    return results, skipped


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("trainer").setLevel(logging.WARNING)
    # The guide's 10-unit logits layer is not a multiple of 8: the Trainer says so for every bf16 cell.
    logging.getLogger("trainer.precision").setLevel(logging.ERROR)
    tf.get_logger().setLevel(logging.ERROR)  # the peak's many small tf.functions trip the retrace warning
    keras.utils.disable_interactive_logging()
    start = time.perf_counter()
    meta = _meta(args)
    wls = workloads(args.quick)
    peak, ceiling = _references(args, wls)
    results, skipped = _run_cells(args, wls, start)
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
        skipped=[dict(cell=cell_name(c.workload, c.precision, c.xla, c.k), reason=c.skipped) for c in skipped],
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
