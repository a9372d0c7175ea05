"""What bench.py's MFU is measured against: the matmul peak per dtype, and the MLP's training matmuls
alone (its ceiling), each timed in interleaved rounds (trainer/timing.py) in the same run as the cells."""
from __future__ import annotations

import statistics
from typing import Dict, List

import tensorflow as tf

from benchmarks.workloads import Workload
from trainer.timing import interleaved_seconds, seconds_of


def _repeated(fn, args, reps: int):
    """`reps` calls of fn(*args), finished when the last one's first result is read back."""
    def call():
        for _ in range(reps):
            out = fn(*args)
        tf.nest.flatten(out)[0].numpy()

    return call


def _interleaved_gflops(programs: Dict[tuple, tuple], repeats: int, target_s: float) -> Dict[tuple, List[float]]:
    """GFLOP/s samples of each program, `repeats` rounds interleaved A B C A B C ...

    programs: key -> (a tf.function, its args, FLOPs per call). Each is traced/compiled, then timed once
    to size its samples (about target_s each); a sample ends when its last result is read back.
    """
    reps = {}
    for key, (fn, args, _) in programs.items():
        _repeated(fn, args, 1)()  # trace/compile
        reps[key] = max(1, int(target_s / max(seconds_of(_repeated(fn, args, 1)), 1e-6)))
    seconds = interleaved_seconds({key: _repeated(fn, args, reps[key]) for key, (fn, args, _) in programs.items()},
                                  rounds=repeats, warmup=0)
    return {key: [flops * reps[key] / s / 1e9 for s in seconds[key]] for key, (_, _, flops) in programs.items()}


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
        ws = [tf.cast(tf.random.stateless_normal((a, b), seed=(7, i)) / a**0.5, dt)
              for i, (a, b) in enumerate(zip(dims, dims[1:]))]
        for xla in (False, True):
            programs[(dt, xla)] = (tf.function(step, jit_compile=xla), (x, ws), flops)
    samples = _interleaved_gflops(programs, repeats, target_s)
    result = _best_per_dtype(dtypes, lambda dt: {f"xla={'on' if xla else 'off'}": v
                                                 for (d, xla), v in samples.items() if d == dt})
    for r in result.values():
        r["by_xla_gflops"] = {c: max(v) for c, v in r["samples_gflops"].items()}
    return result
