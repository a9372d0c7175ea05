"""Section 5 and the outputs: the recommendation (the fastest configuration that is numerically safe, as
the command line that trains with it, and what to change in the model when something blocks a faster
one), the text report, doctor.json and doctor.png."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path
from typing import List, Optional, Sequence

from trainer.doctor.decide import CONFIDENCE, FASTER, LEAST_SPEEDUP, SAME, baseline_row, choose, excludes_gain

# Memory readings closer than this are noise: on a CPU, RSS growth depends on what earlier configurations
# freed (reused by later ones); a GPU allocator's peak is exact to its block size.
MEMORY_NOISE_MB = {"gpu_allocator_peak": 4.0}
RSS_MEMORY_NOISE_MB, RSS_MEMORY_NOISE_FRACTION = 32.0, 0.2
REPLACED_KEYS = ("precision", "precision.policy", "trainer.jit_compile", "data.batch_size", "precision.initial_scale")
DEFAULT_INITIAL_SCALE = 2.0**15
NOISY_SPREAD = 1.5  # slowest / fastest call of a configuration above which its speed is called uncertain


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
                       "(a multiple of 8: Tensor Core tiles)")
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


def _comparison(decision: dict, best: dict, baseline: dict) -> str:
    """The paired verdict of the recommendation against the current configuration; when they are the
    same, of the fastest other configuration (what came closest to a change)."""
    if best is not baseline:
        return _verdict_note(decision["verdict"], best["name"], baseline["name"])
    others = {n: v for n, v in decision["versus"].items() if n != baseline["name"]}
    if not others:
        return ""
    closest = max(others, key=lambda n: others[n]["speedup"])
    return "closest: " + _verdict_note(others[closest], closest, baseline["name"])


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
    if best is baseline:
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
    noisiest = max(best.get("spread", 1.0), baseline.get("spread", 1.0))
    if noisiest > NOISY_SPREAD:
        notes.append(f"the machine was noisy (a configuration's slowest call took {noisiest:.1f}x its fastest): "
                     "the interval is wide; rerun when the machine is quieter for a sharper answer")
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
            "verdict": verdict["verdict"] if best is not baseline else SAME,
            "speedup": verdict["speedup"], "interval": verdict["interval"], "rounds_won": verdict["wins"],
            "rounds": verdict["rounds"], "sign_test_p": verdict["sign_test_p"],
            "comparison": _comparison(decision, best, baseline),
            "versus_baseline": decision["versus"], "load_average": _load_average(),
            "gain_unsettled": unsettled(decision["versus"], safe_rows, baseline),
            "spread": {"recommended": best.get("spread"), "baseline": baseline.get("spread")},
            "memory_saving_mb": memory, "memory_difference_measurable": memory_measurable,
            "memory_mb": {"recommended": best.get("memory_mb"), "baseline": baseline.get("memory_mb"),
                          "means": (report.get("speed") or {}).get("memory_means")},
            "command": _command(program, kept, best, scale), "current_command": _command(program, kept, current, scale),
            "policy": best["policy"], "xla": bool(best["xla"]), "batch": best["batch"], "current_policy": policy,
            "current": current,
            "blocked": blocked,
            "model_changes": model_changes(report), "notes": notes,
            "rule": f"against what you run now ({baseline['name']}), per interleaved round: a configuration whose "
                    f"precision passed the numerics checks is faster if the {CONFIDENCE:.0%} bootstrap interval of "
                    f"its speed-up lies above 1, the speed-up is {LEAST_SPEEDUP:g}x or more and the sign test on "
                    "the rounds won passes at 0.05 / the number of candidates (Bonferroni); of those (and of "
                    "simpler ones not significantly slower), the ones no other beats significantly are as fast, "
                    "and the simplest of them is recommended"}


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> List[str]:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]


def _g(x, spec=".3g") -> str:
    return "-" if x is None else ("inf" if isinstance(x, float) and math.isinf(x) else format(x, spec))


def _hardware_lines(hw: dict) -> List[str]:
    lines = ["1. HARDWARE",
             f"  device: {hw['kind']} ({hw['cpu'] if hw['kind'] == 'CPU' else ', '.join(hw['gpus']) or hw['kind']}), "
             f"{hw['replicas']} replica(s) ({hw['strategy']})", f"  {hw['support']}"]
    if hw.get("absent"):
        lines.append(f"  {hw['absent']}")
    if hw.get("matmul"):
        lines.append(f"  matmul throughput ({hw['what']}; {hw['rounds']} rounds):")
        lines += _table(["dtype", "XLA", "n", "GFLOP/s", "vs float32", "spread"],
                        [[r["dtype"], "on" if r["xla"] else "off", r["side"], _g(r["gflops"], ".1f"),
                          f"{r['vs_float32']:.2f}x", f"{r['spread']:.2f}x"] for r in hw["matmul"]])
    return lines


def _model_lines(model: dict) -> List[str]:
    lines = [f"2. MODEL under {model['policy']} (the candidate policy)"]
    lines += _table(["layer", "class", "compute", "variables", "output", "kept in float32 because", "not x8 -> fix"],
                    [[r["name"], r["class"], r["compute_dtype"], r["variable_dtype"], r["output_dtype"],
                      r["float32_reason"] or "-", "; ".join(r["not_multiple_of_8"]) or "-"] for r in model["layers"]])
    lines.append(f"  outputs: {', '.join(model['outputs_dtype'])}"
                 + ("" if model["outputs_float32"] else f" ({model['outputs_note']})"))
    if model.get("batch_fix"):
        lines.append(f"  per-replica batch {model['batch_fix']['per_replica_batch']} is not a multiple of 8 "
                     f"(-> {model['batch_fix']['fix']})")
    return lines


def _numerics_lines(num: dict) -> List[str]:
    f16, bf16 = num["float16"], num["bfloat16"]
    lines = [f"3. NUMERICS ({num['batches']} real batch(es), float32 reference, loss {num['reference_loss']:.4g})"]
    lines += _table(["layer", "class", "max |activation|", "float16 headroom", "max |gradient|",
                     "float16 run computes in"],
                    [[r["layer"], r["class"], _g(r["max_activation"]), f"{_g(r['headroom'])}x", _g(r["max_gradient"]),
                      r["float16_compute"]] for r in num["layers"]])
    u = f16["underflow"]
    lines += [
        f"  float16: values below its smallest subnormal 2^-24 = {num['float16_smallest_subnormal']:.3g} flush to "
        f"zero; max {num['float16_max']:g}",
        f"  underflow (fraction of nonzero gradient values): weights {u['weight_gradients']['unscaled']:.2%} unscaled, "
        f"{u['weight_gradients']['at_scale']:.2%} at scale {f16['loss_scale']:g}; layer outputs "
        f"{u['activation_gradients']['unscaled']:.2%} unscaled, {u['activation_gradients']['at_scale']:.2%} at "
        f"scale {f16['loss_scale']:g}",
    ]
    if f16.get("scale_fits", True):
        lines.append(f"  loss scale that keeps both in range: {f16['loss_scale']:g} (largest gradient "
                     f"{_g(f16['largest_gradient'])} x scale x {num['limits']['headroom_of_chosen_scale']:g} "
                     f"<= {num['float16_max']:g})")
    else:
        lines.append(f"  loss scale: no scale keeps the largest gradient ({_g(f16['largest_gradient'])}) in range: "
                     f"float16 would overflow (underflow above is at scale 1)")
    e = f16["error_vs_float32"]
    lines.append("  mixed_float16 run of the first batch at that scale: " + (
        f"loss error {e['loss']:.2g}, gradient error {e['gradients']:.2g} (relative to float32)" if e["finite"]
        else "inf/NaN"))
    if f16["float32_layers_override"]:
        lines.append(f"  would overflow float16: {', '.join(f16['overflowing_layers'])} -> "
                     f"{shlex.quote(f16['float32_layers_override'])}")
    lines.append(f"  mixed_float16: {'safe' if f16['safe'] else 'NOT safe: ' + '; '.join(f16['blockers'])}")
    e = bf16["error_vs_float32"]
    lines.append("  mixed_bfloat16 run of the first batch: " + (
        f"loss error {e['loss']:.2g}, gradient error {e['gradients']:.2g} (largest part: "
        f"{e['worst_variable']['path']}, {e['worst_variable']['share_of_error']:.0%} of it)"
        if e["finite"] else "inf/NaN"))
    lines.append(f"  mixed_bfloat16: {'safe' if bf16['safe'] else 'NOT safe: ' + '; '.join(bf16['blockers'])} "
                 f"(limits: loss {num['limits']['loss']}, gradients {num['limits']['gradients']})")
    return lines


def _phase_lines(rows: List[dict]) -> List[str]:
    """Where a step's time goes, per timed configuration: why a matmul speed-up shrinks in the step."""
    timed = [r for r in rows if r.get("phases")]
    if not timed:
        return []
    names = list(timed[0]["phases"]["seconds"])
    lines = ["  where a step's time goes (ms per step, share of the step; XLA off, the given batch):"]
    lines += _table(["configuration", "step", *names],
                    [[r["name"], f"{r['phases']['step_seconds'] * 1e3:.2f}",
                      *(f"{r['phases']['seconds'][n] * 1e3:.2f} ({r['phases']['share'][n]:.0%})" for n in names)]
                     for r in timed])
    lines.append(f"  ({timed[0]['phases']['how']}). A faster matmul shortens only the matmuls inside forward and "
                 "backward; the update, elementwise work, the loop and input keep their time.")
    lines += [f"  {r['name']}: phases not timed ({r['phases_error']})" for r in rows if r.get("phases_error")]
    return lines


def _speed_lines(speed: dict) -> List[str]:
    lines = [f"4. SPEED AND MEMORY ({speed['rounds']} interleaved rounds, calls of ~{speed.get('call_seconds', 0.2):g} "
             f"s re-sized every round, through the loop's windows of {speed.get('steps_per_loop', 1)} step(s) as the "
             f"run trains; memory: {speed['memory_means']})"]
    rows = []
    for r in speed["configs"]:
        if "error" in r:
            rows.append([r["name"], "-", "-", "-", "-", "-", r["error"]])
        else:
            rows.append([r["name"], _g(r["steps_per_sec"], ".1f"), _g(r["examples_per_sec"], ".0f"),
                         f"{r['spread']:.2f}x", _g(r["memory_mb"], ".0f"), _g(r["first_call_seconds"], ".1f"),
                         r["xla_layout"]])
    lines += _table(["configuration", "steps/s", "examples/s", "spread", "memory MiB", "first call s", "XLA layout"],
                    rows)
    lines.append("  spread: slowest / fastest per-step time over the rounds (the machine's noise; "
                 "rounds are compared in pairs)")
    lines += _phase_lines(speed["configs"])
    lines += [f"  {s['name']}: {s['reason']}" for s in speed["skipped"]]
    return lines


def _recommendation_lines(rec: Optional[dict]) -> List[str]:
    if rec is None:
        return ["5. RECOMMENDATION: none (no configuration was measured)"]
    mem = rec["memory_mb"]
    if rec["memory_saving_mb"] is None:
        saving = "memory not measured"
    elif rec["config"] == rec["baseline"]:
        saving = f"memory {mem['baseline']:.0f} MiB ({mem['means']})"
    elif not rec.get("memory_difference_measurable", True):
        saving = (f"memory: no difference beyond the measurement's noise ({mem['recommended']:.0f} vs "
                  f"{mem['baseline']:.0f} MiB: {mem['means']})")
    else:
        saving = (f"memory {abs(rec['memory_saving_mb']):.0f} MiB {'less' if rec['memory_saving_mb'] >= 0 else 'more'} "
                  f"({mem['recommended']:.0f} vs {mem['baseline']:.0f} MiB: {mem['means']})")
    low, high = rec.get("interval", [rec["speedup"], rec["speedup"]])
    now = "what you run now" if rec.get("current", {}).get("timed", True) else "the closest timed to what you run now"
    head = (f"{rec['config']}: {rec['speedup']:.2f}x the examples/s of {rec['baseline']} ({now}; 95% "
            f"interval {low:.2f}-{high:.2f}x, {rec.get('verdict', SAME)})")
    wide = [u["name"] for u in rec.get("gain_unsettled", [])]
    if not rec.get("changed", True) and not rec.get("withdrawn_config"):
        head = (f"{rec['config']} ({now}): keep it; no significant difference: no safe configuration "
                "was significantly faster" + (f" (inconclusive for {', '.join(wide)}: an interval too wide to "
                                              "tell a gain from none)" if wide else ""))
    if rec.get("unverified"):
        head = f"candidate, not yet verified: {head}; run with --verify N before switching"
    if rec.get("withdrawn_config"):
        head = (f"{rec['config']} (what you run now): keep it; the timed grid's {rec['withdrawn_config']} "
                f"({rec['speedup']:.2f}x, interval {low:.2f}-{high:.2f}x) was not confirmed by --verify"
                + (" (inconclusive: --verify's interval is too wide to tell a gain from none)"
                   if rec["withdrawn_config"] in wide else ""))
    load = rec.get("load_average")
    spread = rec.get("spread") or {}
    noise = (f"  machine: load average {'/'.join(f'{x:g}' for x in load) if load else 'unknown'} (1/5/15 min); "
             f"spread of the rounds {_g(spread.get('recommended'), '.2f')}x (recommended), "
             f"{_g(spread.get('baseline'), '.2f')}x (current)")
    lines = ["5. RECOMMENDATION", f"  {head}; {saving}", noise, f"  {rec.get('comparison', '')}".rstrip(),
             f"  train with:  {rec['command']}"]
    if (rec.get("verify") or {}).get("skipped"):  # --verify was asked for, and had nothing to train
        lines.append("  --verify: nothing to compare: the recommendation is what you run now")
    lines += [f"  note: {n}" for n in rec["notes"]]
    lines += [f"  {policy} blocked: {'; '.join(reasons)}" for policy, reasons in rec["blocked"].items()]
    lines += [f"  change: {c}" for c in rec["model_changes"]]
    lines.append(f"  rule: {rec['rule']}")
    return lines


def render_text(report: dict) -> str:
    command = report["meta"].get("command")
    lines = ["python -m trainer.doctor report" + (f" ({command})" if command else ""), ""]
    for key, render in (("hardware", _hardware_lines), ("model", _model_lines), ("numerics", _numerics_lines),
                        ("speed", _speed_lines)):
        if report.get(key):
            lines += render(report[key]) + [""]
        elif report.get(f"{key}_skipped"):
            lines += [f"{key.upper()}: {report[f'{key}_skipped']}", ""]
    if report.get("speed"):
        lines += _recommendation_lines(report.get("recommendation")) + [""]
    lines.append(f"wall time: {report['meta']['wall_seconds']:.0f} s")
    return "\n".join(lines)


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
