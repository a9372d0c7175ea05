"""Section 1, the hardware: which device, its float16/bfloat16 support in words (precision.hardware_report),
and measured square-matmul throughput per dtype with XLA off and on, so "bfloat16 is 0.57x float32 here"
is a number. Timed in interleaved rounds (trainer/timing.py), as the speed grid is."""
from __future__ import annotations

import platform
from typing import Callable, Dict, Tuple

import tensorflow as tf

from trainer.precision import cpu_bfloat16_kernels, cpu_flags, cpu_model, device_kind, dt_half_line_here, \
    dt_half_line_note, hardware_report
from trainer.quiet import no_retracing_warnings
from trainer.timing import interleaved_seconds, median_seconds, seconds_of

MATMUL_DTYPES = ("float32", "bfloat16", "float16")
# One matmul side for every dtype, chosen so that a float32 call takes at least 10 ms (well above Python's
# and TF's per-call cost); a dtype whose call at that side takes longer than SLOWEST_CALL (float16
# without XLA on a CPU: ~100x slower) is timed at a smaller side, which the report gives.
SHORTEST_CALL, SLOWEST_CALL = 0.01, 0.3
LARGEST_SIDE = 4096


def device_section(strategy: tf.distribute.Strategy, policy: str) -> dict:
    """What the steps run on, in words; says plainly when there is no GPU or TPU."""
    gpus = tf.config.list_physical_devices("GPU")
    kind = device_kind(strategy)
    section = {
        "kind": kind,
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "cpu": cpu_model() or platform.processor() or "unknown",
        "cpu_bfloat16_kernels": cpu_bfloat16_kernels(cpu_flags()) or "none",
        "gpus": [tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus],
        "support": hardware_report(policy, strategy),
    }
    if kind == "CPU":
        section["absent"] = ("no GPU or TPU found: every number below is this CPU's; float16 Tensor Cores and "
                             "device memory readings do not apply")
    return section


def _matmul_call(dtype: str, side: int, xla: bool) -> Callable[[], None]:
    a = tf.cast(tf.random.stateless_normal((side, side), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((side, side), seed=(3, 4)), dtype)
    matmul = tf.function(lambda a, b: tf.matmul(a, b)[0, 0], jit_compile=xla)

    def call():
        matmul(a, b).numpy()  # reads the result back: the call has finished when timed

    return call


def _float32_side() -> int:
    side = 128
    while side < LARGEST_SIDE:
        call = _matmul_call("float32", side, False)
        call()
        if seconds_of(call) >= SHORTEST_CALL:
            break
        side *= 2
    return side


def _sized_call(dtype: str, xla: bool, side: int) -> Tuple[Callable[[], None], int]:
    """The matmul call of `dtype` at `side`, or at a smaller side if one call takes over SLOWEST_CALL."""
    while True:
        call = _matmul_call(dtype, side, xla)
        call()  # trace / compile
        if side <= 128 or seconds_of(call) <= SLOWEST_CALL:
            return call, side
        side //= 2


def measure_matmul(rounds: int, progress: Callable[[str], None]) -> dict:
    """GFLOP/s of an n x n @ n x n matmul per dtype and XLA setting (n per dtype: see _sized_call), the
    median over `rounds` interleaved rounds, and each dtype's ratio to float32 at the same XLA setting."""
    with no_retracing_warnings():  # one trace per dtype, side and XLA setting is the point here
        return _measure_matmul(rounds, progress)


def _measure_matmul(rounds: int, progress: Callable[[str], None]) -> dict:
    calls: Dict[str, Callable[[], None]] = {}
    sides: Dict[str, int] = {}
    side = _float32_side()
    # TensorFlow's error-level line at the first float16 op on such a CPU reads like a failure: said before it
    dt_half = "" if tf.config.list_physical_devices("GPU") else dt_half_line_note(dt_half_line_here()).rstrip(". ")
    for dtype in MATMUL_DTYPES:
        for xla in (False, True):
            key = f"{dtype} XLA {'on' if xla else 'off'}"
            note = f" ({dt_half})" if dt_half and key == "float16 XLA off" else ""
            progress(f"hardware: sizing the {key} matmul{note}")
            calls[key], sides[key] = _sized_call(dtype, xla, side)
    progress(f"hardware: timing {len(calls)} matmuls, {rounds} interleaved rounds")
    samples = interleaved_seconds(calls, rounds=rounds, warmup=0)
    rows = []
    for key, seconds in median_seconds(samples).items():
        dtype, _, xla = key.split()
        rows.append({"dtype": dtype, "xla": xla == "on", "side": sides[key], "seconds": seconds,
                     "gflops": 2 * sides[key] ** 3 / seconds / 1e9, "spread": max(samples[key]) / min(samples[key])})
    by_key = {(r["dtype"], r["xla"]): r for r in rows}
    for r in rows:
        r["vs_float32"] = r["gflops"] / by_key[("float32", r["xla"])]["gflops"]
    return {"rounds": rounds, "what": "square matmul n x n @ n x n, 2n^3 FLOP per call, median of interleaved "
                                      "rounds; n: a float32 call takes >= 10 ms, smaller for a dtype slower than 0.3 s "
                                      "per call", "matmul": rows}


def hardware_section(strategy: tf.distribute.Strategy, policy: str, rounds: int,
                     progress: Callable[[str], None]) -> dict:
    return {**device_section(strategy, policy), **measure_matmul(rounds, progress)}
