"""Fair timing on a noisy, shared machine: candidates run in interleaved rounds (A B C, A B C, ...), so
a burst of load from another process hits every candidate alike, and each is judged by its median.
`trainer.jit_compile=measure` and `python -m trainer.doctor` both decide with it."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Mapping


def interleaved_seconds(candidates: Mapping[str, Callable[[], None]], rounds: int = 3,
                        warmup: int = 1) -> Dict[str, List[float]]:
    """Calls each candidate `warmup` times (compiling, filling caches), then `rounds` times in turn;
    returns each candidate's seconds per timed call. A candidate must finish its own work before it
    returns (read a result back, e.g. `.numpy()`), or the time of asynchronous ops is not counted."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: time at least one round")
    for _ in range(warmup):
        for run in candidates.values():
            run()
    seconds: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, run in candidates.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def median_seconds(seconds: Mapping[str, List[float]]) -> Dict[str, float]:
    return {name: statistics.median(values) for name, values in seconds.items()}


def rounds_won(seconds: Mapping[str, List[float]], candidate: str, other: str) -> int:
    """The rounds in which `candidate` was faster than `other`. The two calls of a round are adjacent in
    time, so a burst of load rarely favours the same side in every round: "won all rounds" is a sturdier
    verdict than the medians' order on a shared machine (docs/benchmarks.md)."""
    return sum(a < b for a, b in zip(seconds[candidate], seconds[other]))


def fastest(seconds: Mapping[str, List[float]]) -> str:
    """The candidate with the smallest median time."""
    medians = median_seconds(seconds)
    return min(medians, key=medians.get)
