"""Section 5: the recommendation (the fastest configuration that is numerically safe, as the command line
that trains with it, and what to change in the model when something blocks a faster one), and doctor.json
(render.py writes the text report, plot.py doctor.png)."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import List, Optional, Sequence

from trainer.doctor.decide import CONFIDENCE, FASTER, LEAST_SPEEDUP, SAME, SLOWER, baseline_row, choose, excludes_gain
from trainer.doctor.noise import lead, noise_note

# Memory readings closer than this are noise: on a CPU, RSS growth depends on what earlier configurations
# freed (reused by later ones); a GPU allocator's peak is exact to its block size.
MEMORY_NOISE_MB = {"gpu_allocator_peak": 4.0}
RSS_MEMORY_NOISE_MB, RSS_MEMORY_NOISE_FRACTION = 32.0, 0.2
REPLACED_KEYS = ("precision", "precision.policy", "trainer.jit_compile", "data.batch_size", "precision.initial_scale")
DEFAULT_INITIAL_SCALE = 2.0**15


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _safety(report: dict) -> dict:
    numerics = report.get("numerics")
    if not numerics:
        return {"float32": (True, []), "mixed_float16": (False, ["numerics were not measured"]),
                "mixed_bfloat16": (False, ["numerics were not measured"])}
    return {"float32": (True, []), "mixed_float16": (numerics["float16"]["safe"], numerics["float16"]["blockers"]),
            "mixed_bfloat16": (numerics["bfloat16"]["safe"], numerics["bfloat16"]["blockers"])}


def _softmax_changes(layers: List[dict]) -> List[str]:
    """One line per class of layers that compute a softmax in reduced precision: Softmax layers (often
    inside attention, out of the user's reach) are kept in float32 by the override; others by dtype."""
    by_class = {}
    for row in layers:
        if row.get("advice"):
            by_class.setdefault(row["class"], []).append(row["name"])
    lines = []
    for cls, names in by_class.items():
        fix = (f"add {shlex.quote(f'precision.float32_layers=[{cls}]')}" if cls == "Softmax"
               else "give these layers dtype='float32'")
        lines.append(f"{', '.join(names)} ({cls}): softmax in reduced precision; {fix}")
    return lines


def model_changes(report: dict) -> List[str]:
    """What to change in the model or config to unblock reduced precision or run it faster."""
    changes = []
    model = report.get("model") or {}
    for fix in model.get("multiple_of_8_fixes", []):
        changes.append(f"{fix['layer']} ({fix['class']}): {fix['attribute']}={fix['value']} -> {fix['fix']} "
                       f"(a multiple of 8: Tensor Core tiles{'; ' + fix['note'] if fix.get('note') else ''})")
    if model.get("batch_fix"):
        b = model["batch_fix"]
        changes.append(f"per-replica batch {b['per_replica_batch']} -> {b['fix']} (a multiple of 8)")
    changes += _softmax_changes(model.get("layers", []))
    if model and not model.get("outputs_float32", True):
        changes.append(model["outputs_note"])
    override = ((report.get("numerics") or {}).get("float16") or {}).get("float32_layers_override")
    if override:
        changes.append(f"overflowing layers in float32 for mixed_float16: add {shlex.quote(override)} "
                       "(it keeps every layer of those classes in float32)")
    return changes


def memory_noise_mb(kind: Optional[str], baseline_mb: float) -> float:
    return MEMORY_NOISE_MB.get(kind, max(RSS_MEMORY_NOISE_MB, RSS_MEMORY_NOISE_FRACTION * abs(baseline_mb)))


def _load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # not on every platform
        return None


def _verdict_note(verdict: dict, rec_name: str, baseline_name: str) -> str:
    low, high = verdict["interval"]
    return (f"{rec_name} vs {baseline_name}: {verdict['speedup']:.2f}x (95% interval {low:.2f}-{high:.2f}x), "
            f"won {verdict['wins']} of {verdict['rounds']} rounds (sign test p={verdict['sign_test_p']:.3f})")


def _shown(decision: dict, best: dict, baseline: dict) -> tuple:
    """(name, verdict against the baseline) of the recommendation; when it is the baseline itself, of the
    fastest other configuration (what came closest to a change); (None, None) when there is none."""
    if best is not baseline:
        return best["name"], decision["verdict"]
    others = {n: v for n, v in decision["versus"].items() if n != baseline["name"]}
    if not others:
        return None, None
    closest = max(others, key=lambda n: others[n]["speedup"])
    return closest, others[closest]


def evidence(name: str, verdict: dict, by: str) -> dict:
    """What was measured of a configuration against the baseline, as --set-auto reports it."""
    return {"name": name, "by": by, **{k: verdict.get(k) for k in ("speedup", "interval", "wins", "rounds", "range")}}


def unsettled(versus: dict, rows: List[dict], baseline: dict) -> List[dict]:
    """The configurations at the baseline's batch (what precision=auto could choose) that were not measured
    faster but whose interval does not exclude a gain either (decide.excludes_gain): too wide to tell."""
    return [evidence(r["name"], versus[r["name"]], "the grid") for r in rows
            if r is not baseline and r["name"] in versus and r["batch"] == baseline["batch"]
            and versus[r["name"]]["verdict"] != FASTER and not excludes_gain(versus[r["name"]])]


def _command(program: str, kept: List[str], row: dict, scale: Optional[float]) -> str:
    """The command line that trains `row`'s configuration with the user's other overrides."""
    chosen = [f"precision={row['policy']}", f"trainer.jit_compile={'true' if row['xla'] else 'false'}",
              f"data.batch_size={row['batch']}"]
    if row["policy"] == "mixed_float16" and scale and scale != DEFAULT_INITIAL_SCALE:
        chosen.append(f"precision.initial_scale={scale:g}")
    return " ".join([program, *map(shlex.quote, kept + chosen)])


def recommend(report: dict, overrides: Sequence[str], baseline_xla: bool, batch: int,
              program: str = "python -m trainer", policy: str = "float32") -> Optional[dict]:
    """The configuration to train with (decide.choose), against what the user runs now: `policy` with
    `baseline_xla` at `batch`. Only configurations whose precision passed the numerics checks compete."""
    rows = [r for r in (report.get("speed") or {}).get("configs", []) if "examples_per_sec" in r]
    if not rows:
        return None
    for r in rows:  # a report without per-round times (older doctor.json): its median as one round
        r.setdefault("seconds_per_example", [1 / r["examples_per_sec"]])
    safety = _safety(report)
    baseline = baseline_row(rows, policy, baseline_xla, batch)
    current = {"name": f"{policy} XLA {'on' if baseline_xla else 'off'} batch {batch}", "policy": policy,
               "xla": baseline_xla, "batch": batch}
    current["timed"] = baseline["name"] == current["name"]
    safe_rows = [r for r in rows if safety[r["policy"]][0] or r is baseline]
    decision = choose(safe_rows, baseline, batch)
    best, verdict = decision["choice"], decision["verdict"]
    notes = [] if current["timed"] else [
        f"what you run now ({current['name']}) was not timed (not in the grid, or it failed): the comparison is "
        f"against the closest timed configuration, {baseline['name']}; --verify trains your own configuration"]
    alternatives = [v for n, v in decision["versus"].items() if n != baseline["name"]]
    all_slower = best is baseline and bool(alternatives) and all(v["verdict"] == SLOWER for v in alternatives)
    if all_slower:
        notes.append(f"every alternative measured slower than what you run now ({baseline['name']}): keep it")
    elif best is baseline:
        notes.append(f"no significant difference: no safe configuration was significantly faster than what you run "
                     f"now ({baseline['name']}): keep it")
    elif verdict["verdict"] != FASTER:
        notes.append(f"no significant difference in speed: {best['name']} is simpler than {baseline['name']} "
                     "and not significantly slower")
    others = [n for n in decision["top"] if n != best["name"]]
    if others:
        notes.append(f"as fast within the noise: {', '.join(others)} (the simplest of them is chosen)")
    kept = [o for o in overrides if _key(o) not in REPLACED_KEYS]
    scale = ((report.get("numerics") or {}).get("float16") or {}).get("loss_scale")
    if best["policy"] == "mixed_float16" and scale and scale != DEFAULT_INITIAL_SCALE:
        notes.append(f"dynamic loss scaling starts at the measured safe scale {scale:g} instead of 2^15")
    shown, shown_verdict = _shown(decision, best, baseline)
    wide = unsettled(decision["versus"], safe_rows, baseline)
    # the noise note speaks of the recommendation, else of the widest interval that cannot tell, else the closest
    told = shown if best is not baseline or not wide else max(wide, key=lambda u: u["interval"][1])["name"]
    noisiest = max(best.get("spread", 1.0), baseline.get("spread", 1.0),
                   *([] if told is None else [next(r for r in rows if r["name"] == told).get("spread", 1.0)]))
    is_lead = lead(verdict, decision["alpha"], noisiest) if best is not baseline else None
    note = noise_note(noisiest, told, baseline["name"], None if told is None else decision["versus"][told], is_lead)
    notes += [note] if note else []
    comparison = "" if shown is None else _verdict_note(shown_verdict, shown, baseline["name"])
    comparison = f"closest: {comparison}" if comparison and best is baseline else comparison
    if best["batch"] != batch:
        notes.append(f"data.batch_size={best['batch']} is {best['batch'] / batch:g}x the given batch: it changes the "
                     "optimization (fewer updates per epoch); raise optimizer.lr about as much (linear scaling rule) "
                     "and check the accuracy")
    memory = None  # MiB the recommended configuration saves (negative: costs) over the baseline
    memory_measurable = False  # the difference is beyond the measurement's noise
    if baseline.get("memory_mb") is not None and best.get("memory_mb") is not None:
        memory = baseline["memory_mb"] - best["memory_mb"]
        memory_measurable = abs(memory) > memory_noise_mb(baseline.get("memory_kind"), baseline["memory_mb"])
    blocked = {p: reasons for p, (ok, reasons) in safety.items() if not ok}
    return {"config": best["name"], "baseline": baseline["name"], "changed": best is not baseline,
            "verdict": verdict["verdict"] if best is not baseline else SAME, "all_slower": all_slower,
            "speedup": verdict["speedup"], "interval": verdict["interval"], "rounds_won": verdict["wins"],
            "rounds": verdict["rounds"], "sign_test_p": verdict["sign_test_p"],
            "comparison": comparison, "lead": is_lead,
            "versus_baseline": decision["versus"], "load_average": _load_average(),
            "gain_unsettled": wide,
            "spread": {"recommended": best.get("spread"), "baseline": baseline.get("spread"), "largest": noisiest,
                       "by": "the grid"}, "noise_note": note,  # --verify's replace both (verify.py)
            "memory_saving_mb": memory, "memory_difference_measurable": memory_measurable,
            "memory_mb": {"recommended": best.get("memory_mb"), "baseline": baseline.get("memory_mb"),
                          "means": (report.get("speed") or {}).get("memory_means")},
            "command": _command(program, kept, best, scale), "current_command": _command(program, kept, current, scale),
            "policy": best["policy"], "xla": bool(best["xla"]), "batch": best["batch"], "current_policy": policy,
            "current": current, "blocked": blocked,
            "model_changes": model_changes(report), "notes": notes,
            "rule": f"against what you run now ({baseline['name']}), per interleaved round: a configuration whose "
                    f"precision passed the numerics checks is faster if the {CONFIDENCE:.0%} bootstrap interval of "
                    f"its speed-up lies above 1, the speed-up is {LEAST_SPEEDUP:g}x or more and the sign test on "
                    "the rounds won passes at 0.05 / the number of candidates (Bonferroni); of those (and of "
                    "simpler ones not significantly slower), the ones no other beats significantly are as fast, "
                    "and the simplest of them is recommended"}


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(report: dict, path: Path) -> None:
    """Strict JSON: infinities as the strings "inf"/"-inf"."""
    path.write_text(json.dumps(_finite(report), indent=1, default=str))
