"""The doctor's verdicts, from timings alone (pure functions: tests inject timings). Two configurations are
compared round by round: the calls of a round were timed next to each other (trainer/timing.py), so a
burst of load from another process hits both and their ratio keeps the signal. A change is recommended
only when its speed-up over what the user runs now is significant on those paired ratios; otherwise the
answer is "no significant difference" and the simpler configuration stays."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import numpy as np

from trainer.timing import sign_test_p

CONFIDENCE = 0.95  # the bootstrap interval's coverage
LEAST_SPEEDUP = 1.05  # a significant win smaller than 5% is not worth a change of configuration
ALPHA = 0.05  # the sign test's level for the whole family of candidates (Bonferroni: ALPHA / candidates each)
BOOTSTRAP_SAMPLES = 4000
SAME, FASTER, SLOWER = "no significant difference", "faster", "slower"


def paired_verdict(candidate: Sequence[float], baseline: Sequence[float], alpha: float = ALPHA) -> dict:
    """Is `candidate` faster than `baseline`? Each is the seconds per example of one call per round, in
    the same order of rounds. The speed-up is the geometric mean of the rounds' ratios (baseline /
    candidate); its interval is a bootstrap over rounds (CONFIDENCE, a fixed seed: the same timings give
    the same verdict). FASTER when the interval lies above 1 and the speed-up reaches LEAST_SPEEDUP,
    SLOWER when it lies below 1 (and below 1 / LEAST_SPEEDUP), else SAME. A bootstrap over a handful of
    rounds is too ready to exclude 1 (4 of 5 rounds won passed it), so FASTER (and SLOWER) also need the
    one-sided sign test below `alpha`: ALPHA divided by the number of candidates when several are compared
    (choose()), so that nine equal configurations rarely yield a false "faster"."""
    pairs = [(c, b) for c, b in zip(candidate, baseline) if c > 0 and b > 0]
    if not pairs:
        return {"verdict": SAME, "speedup": 1.0, "interval": [1.0, 1.0], "rounds": 0, "wins": 0, "sign_test_p": 1.0,
                "range": [1.0, 1.0]}
    logs = np.log([b / c for c, b in pairs])
    rng = np.random.default_rng(0)
    means = logs[rng.integers(0, len(logs), size=(BOOTSTRAP_SAMPLES, len(logs)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    low, high = (float(math.exp(q)) for q in np.quantile(means, [tail, 1 - tail]))
    speedup = float(math.exp(logs.mean()))
    wins, losses = int((logs > 0).sum()), int((logs < 0).sum())
    if low > 1 and speedup >= LEAST_SPEEDUP and sign_test_p(wins, len(pairs)) < alpha:
        verdict = FASTER
    elif high < 1 and speedup <= 1 / LEAST_SPEEDUP and sign_test_p(losses, len(pairs)) < alpha:
        verdict = SLOWER
    else:
        verdict = SAME
    return {"verdict": verdict, "speedup": speedup, "interval": [low, high], "rounds": len(pairs), "wins": wins,
            "sign_test_p": sign_test_p(wins, len(pairs)),
            "range": [float(math.exp(logs.min())), float(math.exp(logs.max()))]}  # the rounds' speed-ups


def excludes_gain(verdict: dict) -> bool:
    """The speed-up's interval lies below LEAST_SPEEDUP: no gain worth a change (a measured "no gain"). An
    interval that is not FASTER and reaches LEAST_SPEEDUP is inconclusive: too wide to tell. Caveat: a
    bootstrap percentile interval from 9-10 rounds covers less than its nominal 95% (too narrow), and "no
    gain" has no sign-test guard as FASTER has; requiring every row auto could choose to exclude the gain
    (report.unsettled) makes a false "no gain" rarer, not impossible."""
    return verdict["interval"][1] < LEAST_SPEEDUP


def outcome(verdict: dict) -> str:
    """paired_verdict's answer in words, with "no difference" split into a measured no gain and an
    inconclusive interval (excludes_gain)."""
    if verdict["verdict"] in (FASTER, SLOWER):
        return verdict["verdict"]
    if excludes_gain(verdict):
        return f"no gain (the interval lies below {LEAST_SPEEDUP:g}x)"
    return (f"inconclusive (not measured faster, and its interval does not rule out a gain of {LEAST_SPEEDUP:g}x or "
            "more)")


def wins_needed(rounds: int, alpha: float = ALPHA) -> int:
    """The fewest rounds of `rounds` a candidate must win for the sign test to pass below `alpha` (more
    than `rounds` when none can: 4 rounds never pass 0.05). With 9 rounds: 8 (p = 0.020; 7 gives 0.090)."""
    return next((k for k in range(rounds + 1) if sign_test_p(k, rounds) < alpha), rounds + 1)


def complexity(row: dict, batch: int) -> tuple:
    """What a configuration changes from a float32, XLA off run of the given batch: fewer is simpler."""
    return (row["policy"] != "float32") + bool(row["xla"]) + (row["batch"] != batch), row["batch"]


def choose(rows: List[dict], baseline: dict, batch: int) -> dict:
    """The configuration to recommend among `rows` (each with "name", "policy", "xla", "batch" and
    "seconds_per_example": one time per round), against `baseline` (what the user runs now).

    Contenders are the baseline, the rows significantly faster than it, and the rows simpler than it and
    not significantly slower. Among them, those no other contender beats significantly are the top group
    (so a simpler configuration is never chosen over a winner that beats it); the simplest of the top
    group is chosen, the fastest of equally simple ones. Returns {"choice", "verdict" (of the choice
    against the baseline), "versus" (every row's verdict against the baseline), "top" (the top group's
    names), "alpha" (the sign test's level of each comparison)}. Every comparison uses the sign test at
    ALPHA / (number of rows compared), Bonferroni's correction: with 9 candidates and 12 rounds a winner
    must win 11 of them."""
    alpha = ALPHA / max(1, len(rows) - 1)
    versus = {r["name"]: paired_verdict(r["seconds_per_example"], baseline["seconds_per_example"], alpha)
              for r in rows if r is not baseline}
    versus[baseline["name"]] = paired_verdict(baseline["seconds_per_example"], baseline["seconds_per_example"])
    base_complexity = complexity(baseline, batch)
    contenders = [baseline] + [
        r for r in rows if r is not baseline and (versus[r["name"]]["verdict"] == FASTER or (
            versus[r["name"]]["verdict"] == SAME and complexity(r, batch) < base_complexity))]
    top = [r for r in contenders if not any(
        other is not r
        and paired_verdict(other["seconds_per_example"], r["seconds_per_example"], alpha)["verdict"] == FASTER
        for other in contenders)]
    top = top or [baseline]
    choice = min(top, key=lambda r: (complexity(r, batch), -versus[r["name"]]["speedup"]))
    return {"choice": choice, "verdict": versus[choice["name"]], "versus": versus, "top": [r["name"] for r in top],
            "alpha": alpha}


def baseline_row(rows: List[dict], policy: str, xla: bool, batch: int) -> Optional[dict]:
    """The row of what the user runs now: their policy, XLA setting and batch (the closest measured
    one when that exact configuration was not timed: float32 at their batch first)."""
    for match in (lambda r: (r["policy"], bool(r["xla"]), r["batch"]) == (policy, xla, batch),
                  lambda r: (r["policy"], r["batch"]) == (policy, batch),
                  lambda r: (r["policy"], bool(r["xla"]), r["batch"]) == ("float32", xla, batch),
                  lambda r: r["policy"] == "float32", lambda r: True):
        found = [r for r in rows if match(r)]
        if found:
            return found[0]
    return None

