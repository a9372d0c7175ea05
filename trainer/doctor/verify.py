"""`python -m trainer.doctor --verify [N]`: the recommendation checked the way it will be used. The
recommended configuration and the current one each train N more steps with the Trainer's fit() (its
loop, callbacks and the run's input pipeline), in interleaved rounds of N / rounds steps; the paired
verdict (decide.paired_verdict) on those rounds confirms the recommendation or withdraws it. When the grid
keeps what you run now but left a configuration unsettled (an interval reaching the gain a change needs),
--verify trains the one whose interval reaches highest instead, so a no gain can be settled (a true 1.03x is
never "faster" and, on the grid's short calls, rarely "no gain")."""
from __future__ import annotations

import gc
from typing import Callable, Dict, List

from trainer.doctor.decide import FASTER, LEAST_SPEEDUP, SLOWER, excludes_gain, outcome, paired_verdict, wins_needed
from trainer.doctor.noise import noise_note
from trainer.doctor.report import evidence
from trainer.timing import interleaved_seconds

# 9 rounds: a change is confirmed when it wins 8 or 9 of them (sign test p < 0.05) and its interval lies
# above 1. With 5 rounds only 5 of 5 passed, so one round lost to a burst of load withdrew a real gain.
VERIFY_ROUNDS = 9
# Why a change the grid found is only a candidate until --verify confirms it (diagnose adds it as a note).
UNVERIFIED = ("not verified: the grid times each configuration through the loop's per-window path (the compiled "
              "steps and the host work after each window: guards, the step read back, train logs), but not what "
              "a run does once or writes (fit()'s start and end, checkpoints, metrics files, the progress bar, "
              "evaluation). Run with --verify N: it trains both through fit() and confirms or withdraws this")


def mark_unverified(rec: dict) -> dict:
    """A changed recommendation without --verify: a candidate, said so (and --set-auto does not store it)."""
    if not rec.get("changed"):
        return rec
    return {**rec, "unverified": True, "notes": [UNVERIFIED, *rec["notes"]]}


def verify_outcome(rec: dict, recommended: List[float], current: List[float]) -> dict:
    """`rec` with its "verify" entry: the measured speed-up of the recommended configuration over the
    current one from the rounds' seconds per example. A change claimed faster that is not measured
    significantly faster, or a simpler one measured slower, is withdrawn: the command becomes the
    current configuration's, and a note says why."""
    verdict = paired_verdict(recommended, current)
    low, high = verdict["interval"]
    withdrawn = (rec["verdict"] == FASTER and verdict["verdict"] != FASTER) or verdict["verdict"] == SLOWER
    trained = rec["config"]
    rec = {**rec, "verify": {**verdict, "recommended_seconds_per_example": list(recommended),
                             "current_seconds_per_example": list(current), "withdrawn": withdrawn,
                             "spread": _spread(recommended, current)}}
    rec = _noise_measured_by_verify(rec, trained, verdict, recommended, current, recommendation_trained=not withdrawn)
    said = (f"--verify: {rec['config']} trained at {verdict['speedup']:.2f}x {rec['baseline']} (95% interval "
            f"{low:.2f}-{high:.2f}x, won {verdict['wins']} of {verdict['rounds']} rounds): {outcome(verdict)}")
    if withdrawn:
        # what --verify measured replaces the grid's figures for it: an interval too wide to tell is unsettled
        others = [u for u in rec.get("gain_unsettled", []) if u["name"] != rec["config"]]
        rec.update(config=rec["baseline"], command=rec["current_command"], policy=rec["current_policy"], changed=False,
                   xla=bool(rec.get("current", {}).get("xla")),
                   batch=rec.get("current", {}).get("batch", rec.get("batch")),
                   withdrawn_config=rec["config"], verdict="withdrawn by --verify",
                   gain_unsettled=others + ([] if excludes_gain(verdict)
                                            else [evidence(rec["config"], verdict, "--verify")]))
        said += ("; the recommendation is withdrawn: keep what you run now (confirming needs "
                 f"{confirms(verdict['rounds'])})")
    else:
        said += "; the recommendation stands"
    rec["notes"] = [said, *rec["notes"]]
    return rec


def _spread(*timings: List[float]) -> float:
    """The largest slowest-over-fastest round among `timings` (noise.NOISY_SPREAD tells a noisy machine)."""
    return max((max(t) / min(t) for t in timings if t and min(t) > 0), default=1.0)


def _noise_measured_by_verify(rec: dict, name: str, verdict: dict, trained: List[float], current: List[float],
                              recommendation_trained: bool) -> dict:
    """`rec` with --verify's noise in place of the grid's (report.recommend's "spread" and noise note): once
    --verify trained `name` against what you run now, its rounds' spread and its verdict are the measurement,
    so the report's note, doctor.json and --set-auto's advice say one thing (the grid's note advised --verify
    N for an answer --verify has settled). `recommendation_trained`: the recommendation is `name` (else what
    you run now)."""
    spread = {"recommended": _spread(trained if recommendation_trained else current), "baseline": _spread(current),
              "largest": _spread(trained, current), "by": "--verify", "config": name, "config_spread": _spread(trained)}
    note = noise_note(spread["largest"], name, rec["baseline"], verdict, None, by_verify=True,
                      grid_disagrees=not recommendation_trained)
    grid_note = rec.get("noise_note")
    notes = [n for n in rec["notes"] if n != grid_note]
    return {**rec, "spread": spread, "noise_note": note, "notes": notes + ([note] if note else [])}


def settle_outcome(rec: dict, name: str, candidate: List[float], current: List[float]) -> dict:
    """`rec` (what you run now is kept) with --verify's measure of `name`, a configuration the grid left
    unsettled: what --verify measured replaces the grid's figures for it in "gain_unsettled" (a no gain
    settles it, so --set-auto can store the answer). The recommendation stays what you run now: a change is
    only what the grid found faster and --verify confirmed."""
    verdict = paired_verdict(candidate, current)
    low, high = verdict["interval"]
    others = [u for u in rec.get("gain_unsettled", []) if u["name"] != name]
    rec = {**rec, "gain_unsettled": others + ([] if excludes_gain(verdict) else [evidence(name, verdict, "--verify")]),
           "verify": {**verdict, "config": name, "recommended_seconds_per_example": list(candidate),
                      "current_seconds_per_example": list(current), "withdrawn": False,
                      "spread": _spread(candidate, current)}}
    rec = _noise_measured_by_verify(rec, name, verdict, candidate, current, recommendation_trained=False)
    said = (f"--verify: {name}, the configuration whose interval reached highest, trained at {verdict['speedup']:.2f}x "
            f"{rec['baseline']} (95% interval {low:.2f}-{high:.2f}x, won {verdict['wins']} of {verdict['rounds']} "
            f"rounds): {outcome(verdict)}")
    if excludes_gain(verdict):
        said += "; settled: keep what you run now"
    elif verdict["verdict"] == FASTER:
        said += ("; the grid did not find it faster, so it is not recommended on this one measurement: rerun the "
                 "doctor to see whether it holds")
    else:
        said += "; still unsettled: a larger --verify N (longer rounds) narrows the interval"
    rec["notes"] = [said, *rec["notes"]]
    return rec


def confirms(rounds: int = VERIFY_ROUNDS) -> str:
    """What --verify needs to confirm a change, in words (paired_verdict's FASTER over `rounds` rounds)."""
    return (f"at least {wins_needed(rounds)} of {rounds} rounds won, the 95% interval of the speed-up above 1 "
            f"and a speed-up of {LEAST_SPEEDUP:g}x or more")


def _next_round(trainer, data, per_round: int) -> Callable[[], None]:
    """A call that trains the next `per_round` steps: fit(steps=...) counts the run's steps, so round r
    of a trainer asks for 1 (its untimed first step) + r * per_round."""
    rounds = [0]

    def call() -> None:
        rounds[0] += 1
        trainer.fit(data, steps=1 + rounds[0] * per_round)
    return call


def _train_pair(make_trainer: Callable[[str, bool], object], data_for_batch: Callable[[int], object],
                configs: Dict[str, dict], steps: int, progress: Callable[[str], None]) -> Dict[str, List[float]]:
    """Seconds per example of each of `configs` (key -> grid row) over VERIFY_ROUNDS interleaved rounds of
    training through fit(), `steps` steps each in all."""
    from trainer.inputs import batches_read_per_step  # loads TensorFlow: not when the CLI only parses arguments

    # rounds at least as long as the grid's calls: shorter ones would weigh the per-call costs more
    per_round = max(1, steps // VERIFY_ROUNDS, *(max(r.get("steps_per_call") or [1]) for r in configs.values()))
    trainers: Dict[str, object] = {}
    for key, row in configs.items():
        progress(f"verify: building {row['name']} ({key}) and training its first step")
        trainers[key] = (make_trainer(row["policy"], row["xla"]), data_for_batch(row["batch"]))
        trainers[key][0].fit(trainers[key][1], steps=1)  # compiles: not timed
    progress(f"verify: {VERIFY_ROUNDS} interleaved rounds of {per_round} steps each, through Trainer.fit")
    seconds = interleaved_seconds({key: _next_round(trainer, data, per_round)
                                   for key, (trainer, data) in trainers.items()}, rounds=VERIFY_ROUNDS, warmup=0)
    for key, (trainer, _) in trainers.items():
        examples = per_round * configs[key]["batch"] * batches_read_per_step(trainer.config)
        seconds[key] = [s / examples for s in seconds[key]]
    trainers.clear()
    gc.collect()
    return seconds


def verify(make_trainer: Callable[[str, bool], object], data_for_batch: Callable[[int], object], rec: dict,
           rows: List[dict], steps: int, progress: Callable[[str], None]) -> dict:
    """Trains the recommended and the current configuration `steps` steps each (interleaved rounds) and
    returns verify_outcome's answer. With nothing changed, trains the unsettled configuration whose interval
    reaches highest against the current one (settle_outcome); with nothing unsettled either, says so and
    trains nothing."""
    by_name = {r["name"]: r for r in rows}
    # what the user runs now, also when the grid timed only a configuration close to it (decide.baseline_row)
    current = rec.get("current") or by_name[rec["baseline"]]
    current = by_name.get(current["name"], current)
    if rec.get("changed"):
        seconds = _train_pair(make_trainer, data_for_batch, {"recommended": by_name[rec["config"]],
                                                             "current": current}, steps, progress)
        return verify_outcome(rec, seconds["recommended"], seconds["current"])
    wide = [u for u in rec.get("gain_unsettled", []) if u["name"] in by_name]
    if not wide:
        return {**rec, "verify": {"skipped": "the recommendation is what you run now: nothing to compare"}}
    widest = max(wide, key=lambda u: u["interval"][1])["name"]
    seconds = _train_pair(make_trainer, data_for_batch, {"unsettled": by_name[widest], "current": current}, steps,
                          progress)
    return settle_outcome(rec, widest, seconds["unsettled"], seconds["current"])
