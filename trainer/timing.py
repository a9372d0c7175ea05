"""Fair timing on a noisy, shared machine: candidates run in interleaved rounds (A B C, A B C, ...), so
a burst of load from another process hits every candidate alike, and each is judged by its median.
`trainer.jit_compile=measure`, `python -m trainer.doctor`, `precision=auto`'s probe, `trainer.convert`'s
inference check and the scripts in benchmarks/ that time in-process (bench_recipes.py reads the CLI
runs' own throughput lines) take their timings from here: one home for how this project times."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Dict, Hashable, List, Mapping


def seconds_of(call: Callable[[], object]) -> float:
    """Wall-clock seconds of one call. It must finish its own work before it returns (read a result back,
    e.g. `.numpy()`), or the time of asynchronous ops is not counted."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def interleaved_seconds(candidates: Mapping[Hashable, Callable[[], object]], rounds: int = 3,
                        warmup: int = 1, rotate: bool = False) -> Dict[Hashable, List[float]]:
    """Calls each candidate `warmup` times (compiling, filling caches), then `rounds` times in turn;
    returns each candidate's seconds per timed call (see seconds_of: a candidate finishes its own work).
    `rotate`: round i starts with the i-th candidate (A B C, B C A, C A B, ...), so no candidate always
    follows the same one (whose teardown or cache use could cost it)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: time at least one round")
    for _ in range(warmup):
        for run in candidates.values():
            run()
    seconds: Dict[Hashable, List[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for i in range(rounds):
        shift = i % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            seconds[name].append(seconds_of(candidates[name]))
    return seconds


def repeats_lasting(timed: Callable[[int], float], seconds: float, most: int) -> int:
    """The repeat count n for which `timed(n)` (the seconds of n repeats in one call) lasts about
    `seconds`, at most `most`: calls of growing n (x2 to x8) are timed until one lasts half of it, so the
    per-call cost is spread over many repeats before the rate is taken."""
    n = 1
    while True:
        took = timed(n)
        if took >= seconds / 2 or n >= most:
            return resized(n, took, seconds, most)
        n = min(most, n * min(8, max(2, int(seconds / 2 / max(took, 1e-6)))))


def resized(n: int, took: float, seconds: float, most: int) -> int:
    """The repeat count that lasts about `seconds` at the rate of the last call (`n` repeats took
    `took` seconds), from 1 to `most`."""
    return max(1, min(most, round(n * seconds / max(took, 1e-6))))


def median_seconds(seconds: Mapping[Hashable, List[float]]) -> Dict[Hashable, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def rounds_won(seconds: Mapping[Hashable, List[float]], candidate: Hashable, other: Hashable) -> int:
    """The rounds in which `candidate` was faster than `other`. The two calls of a round are adjacent in
    time, so a burst of load rarely favours the same side in every round: "won all rounds" is a sturdier
    verdict than the medians' order on a shared machine (docs/benchmarks.md)."""
    return sum(a < b for a, b in zip(seconds[candidate], seconds[other]))


def fastest(seconds: Mapping[Hashable, List[float]]) -> Hashable:
    """The candidate with the smallest median time."""
    medians = median_seconds(seconds)
    return min(medians, key=medians.get)


def sign_test_p(wins: int, rounds: int) -> float:
    """One-sided sign test: the chance of `wins` or more rounds won out of `rounds` if neither side were
    faster (each round a fair coin). Five of five rounds: 1/32 = 0.031."""
    return sum(math.comb(rounds, k) for k in range(wins, rounds + 1)) / 2.0**rounds
