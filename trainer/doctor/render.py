"""The text report (doctor.txt, and what the doctor prints): one block per section of the report dict."""
from __future__ import annotations

import math
import shlex
from typing import List, Optional, Sequence

from trainer.doctor.decide import LEAST_SPEEDUP, SAME


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


def _phase_cell(phases: dict, name: str) -> str:
    """A phase's ms and share of the step; a difference of two timed pieces below their noise says so."""
    if name in phases.get("below_noise", ()):
        return f"< noise (±{phases['noise_seconds'][name] * 1e3:.2f} ms)"
    return f"{phases['seconds'][name] * 1e3:.2f} ({phases['share'][name]:.0%})"


def _phase_lines(rows: List[dict]) -> List[str]:
    """Where a step's time goes, per timed configuration: why a matmul speed-up shrinks in the step."""
    timed = [r for r in rows if r.get("phases")]
    if not timed:
        return []
    names = list(timed[0]["phases"]["seconds"])
    lines = ["  where a step's time goes (ms per step, share of the step; XLA off, the given batch):"]
    lines += _table(["configuration", "step", *names],
                    [[r["name"], f"{r['phases']['step_seconds'] * 1e3:.2f}",
                      *(_phase_cell(r["phases"], n) for n in names)] for r in timed])
    lines.append(f"  ({timed[0]['phases']['how']}; \"< noise (±x ms)\": a difference of two timed pieces smaller "
                 "than their spread over the rounds, not a time). A faster matmul shortens only the matmuls inside "
                 "forward and backward; the update, elementwise work, the loop and input keep their time.")
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
    if rec.get("all_slower") and not rec.get("changed", True) and not rec.get("withdrawn_config"):
        head = f"{rec['config']} ({now}): keep it: every alternative measured slower"
    elif not rec.get("changed", True) and not rec.get("withdrawn_config"):
        head = (f"{rec['config']} ({now}): keep it; no significant difference: no safe configuration "
                "was significantly faster" + (f" (inconclusive for {', '.join(wide)}: their intervals do not rule "
                                              f"out a gain of {LEAST_SPEEDUP:g}x or more)" if wide else ""))
    is_lead = rec.get("lead") and rec.get("unverified")  # a narrow pass on a noisy machine (noise.py)
    if is_lead:
        head = (f"lead to verify, not called faster: {rec['config']}: {rec['speedup']:.2f}x the examples/s of "
                f"{rec['baseline']} ({now}; 95% interval {low:.2f}-{high:.2f}x), a narrow pass on a noisy machine "
                "(see the note); keep what you run now until --verify N confirms it")
    elif rec.get("unverified"):
        head = f"candidate, not yet verified: {head}; run with --verify N before switching"
    if rec.get("withdrawn_config"):
        head = (f"{rec['config']} (what you run now): keep it; the timed grid's {rec['withdrawn_config']} "
                f"({rec['speedup']:.2f}x, interval {low:.2f}-{high:.2f}x) was not confirmed by --verify"
                + (f" (inconclusive: --verify's interval does not rule out a gain of {LEAST_SPEEDUP:g}x or more)"
                   if rec["withdrawn_config"] in wide else ""))
    load = rec.get("load_average")
    spread = rec.get("spread") or {}
    noise = f"  machine: load average {'/'.join(f'{x:g}' for x in load) if load else 'unknown'} (1/5/15 min); "
    if spread.get("by") == "--verify":  # what --verify trained replaced the grid's spread (verify.py)
        noise += (f"spread of --verify's rounds {_g(spread.get('config_spread'), '.2f')}x ({spread.get('config')}), "
                  f"{_g(spread.get('baseline'), '.2f')}x (current)")
    else:
        noise += (f"spread of the rounds {_g(spread.get('recommended'), '.2f')}x (recommended), "
                  f"{_g(spread.get('baseline'), '.2f')}x (current)")
    lines = ["5. RECOMMENDATION", f"  {head}; {saving}", noise, f"  {rec.get('comparison', '')}".rstrip(),
             f"  train with:  {rec['current_command'] if is_lead else rec['command']}"]
    if is_lead:
        lines.append(f"  the lead:    {rec['command']}")
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
    auto = report["meta"].get("auto")
    if auto:  # what you run now is what auto resolves to here: the baseline of every comparison
        xla = "" if auto.get("jit_compile") is None else f" with trainer.jit_compile={str(auto['jit_compile']).lower()}"
        lines[1:1] = [f"precision=auto resolves to {auto['policy']}{xla} on this machine for this model "
                      f"({auto['why']}); the report compares every configuration against it, as what you run now"]
    for key, render in (("hardware", _hardware_lines), ("model", _model_lines), ("numerics", _numerics_lines),
                        ("speed", _speed_lines)):
        if report.get(key):
            lines += render(report[key]) + [""]
        elif report.get(f"{key}_skipped"):
            lines += [f"{key.upper()}: {report[f'{key}_skipped']}", ""]
    if report.get("speed"):
        lines += _recommendation_lines(report.get("recommendation")) + [""]
    lines.append(_wall_time_line(report["meta"]))
    return "\n".join(lines)


def _wall_time_line(meta) -> str:
    """The measuring's time, and the command's since its process started where the command recorded it (a report
    from Python has none): loading TensorFlow and the data count in what the user waited."""
    measured = f"wall time: {meta['wall_seconds']:.0f} s measuring"
    if meta.get("command_seconds") is None:
        return measured
    return (f"{measured}; {meta['command_seconds']:.0f} s since the command started (loading TensorFlow, the config "
            "and the data too; writing the plot and exiting follow)")
