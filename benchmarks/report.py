"""bench.py's report: each runner's ratios, MFU and the sign test's verdicts, the issue's goals, the table
on stdout, the plot, and where and on what the numbers were measured."""
from __future__ import annotations

import math
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List

import numpy as np
import tensorflow as tf

import trainer as trainer_pkg
from benchmarks.workloads import COMPUTE_DTYPE, SHORT
from trainer.timing import sign_test_p

if TYPE_CHECKING:  # Cell as a type only: at run time the report needs nothing of the runners
    from benchmarks.runners import Cell


def _fmt(x, spec, none="-"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def add_ratios_and_mfu(results: List[dict], peak: Dict[str, dict], ceiling: Dict[str, dict]) -> None:
    """vs_hand / vs_fit: this runner's median examples/s over the other runner's in the same cell.
    of_ceiling (MLP): achieved GFLOP/s over its bare matmuls' best with the same XLA setting."""
    by_cell: Dict[tuple, Dict[str, dict]] = {}
    for r in results:
        by_cell.setdefault((r["workload"], r["precision"], r["xla"], r["steps_per_loop"]), {})[r["runner"]] = r
    for cell in by_cell.values():
        for r in cell.values():
            for other in ("hand", "fit"):
                o = cell.get(other)
                r[f"vs_{other}"] = r["examples_per_sec_median"] / o["examples_per_sec_median"] if o else None
                if o:  # round i of both: calls of the same length seconds apart, so slow drifts of the machine cancel
                    paired = [b / a for a, b in zip(r["seconds"], o["seconds"])]
                    r[f"paired_vs_{other}"] = statistics.median(paired)
                    r[f"rounds_faster_vs_{other}"] = sum(x > 1 for x in paired)
                    r[f"verdict_vs_{other}"], r[f"p_vs_{other}"] = sign_test(paired)
            p = peak.get(COMPUTE_DTYPE[r["precision"]])
            r["peak_gflops"] = p["gflops"] if p else None
            r["mfu"] = r["achieved_gflops"] / p["gflops"] if p else None
            c = ceiling.get(COMPUTE_DTYPE[r["precision"]]) if r["workload"] == "mlp" else None
            r["ceiling_gflops"] = c["by_xla_gflops"][f"xla={'on' if r['xla_effective'] else 'off'}"] if c else None
            r["of_ceiling"] = r["achieved_gflops"] / r["ceiling_gflops"] if c else None


def sign_test(ratios: List[float], alpha: float = 0.05) -> tuple:
    """Paired rounds of two runners (speed ratio per round): "faster" or "slower" when a one-sided sign
    test says so at `alpha` (5 rounds: all 5; 9 rounds: 8 of 9), else "tie". Returns (verdict, p)."""
    n = len(ratios)
    p_faster, p_slower = sign_test_p(sum(x > 1 for x in ratios), n), sign_test_p(sum(x < 1 for x in ratios), n)
    if p_faster < alpha:
        return "faster", p_faster
    if p_slower < alpha:
        return "slower", p_slower
    return "tie", min(p_faster, p_slower)


def spread(r: dict) -> float:
    """(max - min) / median of a runner's repeats: how noisy its cell was."""
    e = r["examples_per_sec"]
    return (max(e) - min(e)) / statistics.median(e)


def check_goals(results: List[dict], peak: Dict[str, dict]) -> List[dict]:
    """The issue's performance goals, evaluated on this run's numbers (no thresholds are bent); the notes
    give what bounds each one on this machine (the peaks' ratio, the MLP's bare matmuls)."""
    goals = []
    cells: Dict[tuple, Dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["workload"], r["precision"], r["xla"], r["steps_per_loop"]), {})[r["runner"]] = r
    for key, c in sorted(cells.items(), key=lambda kv: str(kv[0])):
        t = c.get("trainer")
        for other in ("hand", "fit"):
            if t and other in c:
                ratio = t[f"vs_{other}"]
                noise = max(spread(t), spread(c[other]))
                goals.append(dict(
                    goal=f"trainer >= 1.0x {other}", cell=cell_name(*key), value=ratio, target=1.0,
                    passed=ratio >= 1.0, verdict=t[f"verdict_vs_{other}"],
                    note=f"paired rounds: median {t[f'paired_vs_{other}']:.2f}, "
                         f"faster in {t[f'rounds_faster_vs_{other}']}/{len(t['seconds'])}: "
                         f"{t[f'verdict_vs_{other}']} (sign test p={t[f'p_vs_{other}']:.2f}); "
                         f"repeat spread up to {noise:.0%}",
                ))
    for (wl, p, xla, k), c in cells.items():
        if wl == "mlp" and p == "mixed_bfloat16" and "trainer" in c:
            f32 = cells.get((wl, "float32", xla, k), {}).get("trainer")
            if f32:
                ratio = c["trainer"]["examples_per_sec_median"] / f32["examples_per_sec_median"]
                note = ""
                if "bfloat16" in peak and "float32" in peak:
                    note = f"matmul peak bf16/f32 here: {peak['bfloat16']['gflops'] / peak['float32']['gflops']:.2f}x"
                if c["trainer"].get("ceiling_gflops") and f32.get("ceiling_gflops"):
                    note += f"; the MLP's bare matmuls: {c['trainer']['ceiling_gflops'] / f32['ceiling_gflops']:.2f}x"
                goals.append(dict(goal="mlp: mixed_bfloat16 >= 1.5x float32 (trainer)", cell=cell_name(wl, p, xla, k),
                                  value=ratio, target=1.5, passed=ratio >= 1.5, note=note))
        if wl == "mlp" and p in ("float32", "mixed_bfloat16") and "trainer" in c and c["trainer"]["mfu"] is not None:
            t = c["trainer"]
            note = f"peak {t['peak_gflops']:.0f} GFLOP/s"
            if t.get("ceiling_gflops"):
                note += (f"; the MLP's bare matmuls reach {t['ceiling_gflops']:.0f} "
                         f"({t['ceiling_gflops'] / t['peak_gflops']:.0%}"
                         f" of it), the trainer {t['of_ceiling']:.0%} of those")
            goals.append(dict(goal="mlp: trainer >= 80% of matmul peak", cell=cell_name(wl, p, xla, k),
                              value=t["mfu"], target=0.8, passed=t["mfu"] >= 0.8, note=note))
    return goals


def cell_name(wl, p, xla, k):
    return f"{wl}/{SHORT[p]}/xla-{'on' if xla else 'off'}/K={k}"


LEGEND = """
ex/s: median examples/s over the interleaved repeats (each repeat: one API call training `steps` steps).
spread: (max - min) / median of those repeats.  xhand, xfit: ex/s over the hand loop's / Keras fit's in
the same cell.  GFLOP/s: analytic model FLOPs (matmul/conv) per second.  MFU: GFLOP/s over the matmul peak
of the compute dtype.  1st step s: setup + first call (trace + compile + K steps).  compile s: first call
minus K x the median step time.  peak MB: process RSS peak over setup + first call (all runners of the
cell built so far are alive);  dMB: its growth over the RSS before setup (GPU: allocator peak).
xla "!" : the runner ran without XLA although it was asked for (Keras does so under tf.distribute).
Goals, trainer vs hand/fit: the ratio of medians decides PASS (>= 1.0); "paired rounds" divides the two
runners' calls of the same round (seconds apart, so the machine's slow drifts cancel), and a sign test
over the rounds says faster/slower only when enough rounds agree (p < 0.05; among many comparisons a few
such verdicts are chance), otherwise "tie"."""


def print_table(results: List[dict], skipped: List[Cell], peak: Dict[str, dict], ceiling: Dict[str, dict],
                goals: List[dict], meta: dict) -> None:
    print()
    print(f"Synthetic data (random tensors cached in memory). {meta['machine']}. "
          f"Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}")
    print("Matmul peak (best sample, GFLOP/s): "
          + ", ".join(f"{dt} {v['gflops']:.0f} ({v['best']})" for dt, v in peak.items()))
    if ceiling:
        print("MLP's training matmuls alone (best sample, GFLOP/s): " + ", ".join(
            f"{dt} " + " / ".join(f"{g:.0f} ({c})" for c, g in v["by_xla_gflops"].items())
            + f" = {v['gflops'] / peak[dt]['gflops']:.0%} of the peak" for dt, v in ceiling.items()))
    header = (f"{'workload':<11} {'prec':<4} {'xla':<3} {'K':>3} {'runner':<14} {'ex/s':>9} {'spread':>6} "
              f"{'xhand':>6} {'xfit':>6} {'GFLOP/s':>8} {'MFU':>5} {'1st step s':>10} {'compile s':>9} "
              f"{'peak MB':>8} {'dMB':>6} {'steps':>5}")
    print(header)
    print("-" * len(header))
    last = None
    for r in results:
        cell = (r["workload"], r["precision"], r["xla"], r["steps_per_loop"])
        if last is not None and cell[:2] != last[:2]:
            print()
        last = cell
        xla = ("on" if r["xla"] else "off") + ("" if r["xla_effective"] == r["xla"] else "!")
        print(f"{r['workload']:<11} {SHORT[r['precision']]:<4} {xla:<3} {r['steps_per_loop']:>3} {r['runner']:<14} "
              f"{r['examples_per_sec_median']:>9.0f} {spread(r):>6.0%} {_fmt(r['vs_hand'], '6.2f'):>6} "
              f"{_fmt(r['vs_fit'], '6.2f'):>6} {r['achieved_gflops']:>8.1f} "
              f"{_fmt(r['mfu'] and 100 * r['mfu'], '4.0f'):>4}% "
              f"{r['time_to_first_step_s']:>10.2f} {r['compile_s']:>9.2f} {r['peak_mem_mb']:>8.0f} "
              f"{r['mem_delta_mb']:>6.0f} {r['steps']:>5}")
    print(LEGEND)
    if skipped:
        print("\nSkipped cells:")
        for c in skipped:
            print(f"  {cell_name(c.workload, c.precision, c.xla, c.k)}: {c.skipped}")
    print("\nGoals (issue #4):")
    for g in goals:
        mark = "PASS" if g["passed"] else "FAIL"
        print(f"  [{mark}] {g['goal']:<46} {g['cell']:<29} {g['value']:.2f} (target {g['target']}) {g['note']}")
    passed = sum(g["passed"] for g in goals)
    print(f"  {passed}/{len(goals)} passed")
    versus = [g for g in goals if "verdict" in g]
    if versus:
        counts = {v: sum(g["verdict"] == v for g in versus) for v in ("faster", "tie", "slower")}
        print(f"  trainer vs hand/fit, paired rounds and a sign test (p < 0.05): faster in {counts['faster']}, "
              f"tie in {counts['tie']}, slower in {counts['slower']} of {len(versus)} comparisons")


def plot(results: List[dict], path: Path) -> None:
    """Median examples/s (min-max whiskers) and MFU per cell, one column per workload. Without
    matplotlib (the `bench` extra) the figures are still printed and saved; only the picture is skipped."""
    try:
        import matplotlib
    except ImportError:
        print(f"plot: skipped {path.name} (matplotlib is not installed: pip install -e '.[bench]')")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = list(dict.fromkeys(r["workload"] for r in results))
    runners = list(dict.fromkeys(r["runner"] for r in results))
    fig, axes = plt.subplots(2, len(wls), figsize=(6 * len(wls), 8), squeeze=False)
    width = 0.8 / max(len(runners), 1)
    for col, wl in enumerate(wls):
        rows = [r for r in results if r["workload"] == wl]
        cells = list(dict.fromkeys((r["precision"], r["xla"], r["steps_per_loop"]) for r in rows))
        labels = [f"{SHORT[p]}\nXLA {'on' if x else 'off'}\nK={k}" for p, x, k in cells]
        for i, name in enumerate(runners):
            med, lo, hi, mfu = [], [], [], []
            for cell in cells:
                r = next((r for r in rows if (r["precision"], r["xla"], r["steps_per_loop"]) == cell
                          and r["runner"] == name), None)
                m = r["examples_per_sec_median"] if r else 0
                med.append(m)
                lo.append(m - min(r["examples_per_sec"]) if r else 0)
                hi.append(max(r["examples_per_sec"]) - m if r else 0)
                mfu.append(100 * (r["mfu"] or 0) if r else 0)
            xs = np.arange(len(cells)) + (i - (len(runners) - 1) / 2) * width
            axes[0, col].bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
            axes[1, col].bar(xs, mfu, width, label=name)
        for row, ylabel in ((0, "examples/s (median, min-max)"), (1, "MFU % of matmul peak")):
            ax = axes[row, col]
            ax.set_xticks(np.arange(len(cells)))
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        axes[0, col].set_title(f"{wl} (synthetic data)")
        axes[0, col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def provenance() -> dict:
    """Which Trainer was measured: its package folder and the checkout's commit (dirty if edited)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    info = {"trainer_package": str(Path(trainer_pkg.__file__).parent)}

    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--", "trainer")
        info["git_commit"] = commit + ("+dirty trainer/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return f"{name}, {os.cpu_count()} CPUs" + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU")

