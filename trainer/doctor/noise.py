"""How noisy the machine was, and what it means for the grid's answer. A configuration's spread (its slowest
per-step time over its fastest, across the rounds) measures the machine's noise. The rounds are compared in
pairs (decide.py), which cancels a burst of load that hits both calls of a round, not the noise within one.
On a noisy machine, a candidate that passed the tests only narrowly (won the fewest rounds that pass, yet not
every round, or with an interval reaching below the gain a change needs) is a lead to verify, not a finding:
six identical `--quick` runs on a shared 2-core machine named such a "faster" configuration twice (9 of 10
rounds, another one each time, one of them mixed_float16 on the CPU) and none four times. A clear win (every round, an
interval well above the gain a change needs) stays a candidate; the tests themselves are unchanged."""
from __future__ import annotations

from typing import Optional

from trainer.doctor.decide import FASTER, LEAST_SPEEDUP, excludes_gain, wins_needed

NOISY_SPREAD = 1.5  # slowest / fastest call of a configuration above which the machine is called noisy


def narrow_pass(verdict: dict, alpha: float) -> Optional[str]:
    """Why a FASTER verdict passed only narrowly (in words), or None when it passed clearly."""
    reasons = []
    # a sweep of every round is never narrow by count, also when only a sweep passes (6 rows, 10 rounds)
    if verdict["wins"] < verdict["rounds"] and verdict["wins"] <= wins_needed(verdict["rounds"], alpha):
        reasons.append(f"it won {verdict['wins']} of {verdict['rounds']} rounds, the fewest that pass")
    if verdict["interval"][0] < LEAST_SPEEDUP:
        reasons.append(f"its interval reaches down to {verdict['interval'][0]:.2f}x, below the {LEAST_SPEEDUP:g}x "
                       "a change needs")
    return " and ".join(reasons) or None


def lead(verdict: dict, alpha: float, spread: float) -> Optional[str]:
    """Why the grid's FASTER `verdict` is only a lead to verify (the machine was noisy, and it passed
    narrowly), or None: not faster, a quiet machine, or a clear pass."""
    if verdict["verdict"] != FASTER or spread <= NOISY_SPREAD:
        return None
    return narrow_pass(verdict, alpha)


def noise_note(spread: float, name: Optional[str], baseline: str, verdict: Optional[dict],
               is_lead: Optional[str], by_verify: bool = False, grid_disagrees: bool = False) -> Optional[str]:
    """The report's note on a noisy machine (None on a quiet one): how noisy (the spread, and the range of the
    paired speed-ups of `name`, the recommendation or the closest to it, over `baseline`) and what that
    means for this answer: a lead, a gain that held, a no gain that held, or an interval too wide to tell.
    `by_verify`: the spread and `verdict` are --verify's rounds (verify.py), which replace the grid's: the
    next step it names is then a larger --verify N, not --verify itself. `grid_disagrees`: --verify found
    `name` faster where the grid did not, so a gain is one measurement's, not one that held."""
    if spread <= NOISY_SPREAD:
        return None
    rounds = "--verify's rounds" if by_verify else "rounds"
    how = f"the machine was noisy: a configuration's per-step time varied up to {spread:.1f}x between {rounds}"
    if name is None or verdict is None:
        return how
    low, high = verdict["interval"]
    first, last = verdict.get("range") or (verdict["speedup"], verdict["speedup"])
    paired = f"paired by round, {name} ran at {first:.2f}-{last:.2f}x {baseline}"
    if is_lead:
        return (f"{how}; {paired}, and passed only narrowly ({is_lead}): a lead, not a finding by itself; "
                "--verify N settles it, training both through fit()")
    if verdict["verdict"] == FASTER and grid_disagrees:
        return (f"{how}; {paired} and won {verdict['wins']} of {verdict['rounds']} rounds: measured faster by "
                "--verify only (the grid did not find it faster): rerun the doctor, on a quieter machine if you can")
    if verdict["verdict"] == FASTER:
        return (f"{how}; {paired} and won {verdict['wins']} of {verdict['rounds']} rounds: its gain held through the "
                f"noise (95% interval {low:.2f}-{high:.2f}x)")
    if excludes_gain(verdict):
        return (f"{how}; {paired}, and its 95% interval, {low:.2f}-{high:.2f}x, still rules out a gain of "
                f"{LEAST_SPEEDUP:g}x or more: the answer holds")
    fix = ("with a larger --verify N: longer rounds average more of the noise out" if by_verify
           else "with --verify N, which trains it against what you run now through fit()")
    return (f"{how}; {paired}: not measured faster, yet its 95% interval, {low:.2f}-{high:.2f}x, does not rule out "
            f"a gain of {LEAST_SPEEDUP:g}x or more: too noisy to tell; rerun when the machine is quieter, or {fix}")
