"""doctor.png: the measured numbers at a glance (matplotlib, from the `bench` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

INSTALL = "pip install 'trainer[bench]' (matplotlib==3.11.2)"


SHORT = {"float32": "f32", "mixed_float16": "f16", "mixed_bfloat16": "bf16"}
COLORS = {"float32": "tab:gray", "mixed_float16": "tab:orange", "mixed_bfloat16": "tab:green"}


def _speed_panel(ax, rows: list, names: list, rec: dict) -> None:
    """Median examples/s per configuration (bars), every round's examples/s (dots: the spread), the
    current configuration hatched and the recommended one outlined in red, with a legend."""
    from matplotlib.patches import Patch

    bars = ax.bar(names, [r["examples_per_sec"] for r in rows], color=[COLORS[r["policy"]] for r in rows])
    for i, r in enumerate(rows):
        per_round = [1 / s for s in r.get("seconds_per_example", []) if s > 0]
        ax.plot([i] * len(per_round), per_round, "k.", markersize=4, label="each round" if i == 0 else None)
        if r["name"] == rec.get("baseline"):
            bars[i].set_hatch("//")
        if r["name"] == rec.get("config"):
            bars[i].set_edgecolor("red")
            bars[i].set_linewidth(2.5)
    handles = [Patch(color=COLORS[p], label=p) for p in COLORS if any(r["policy"] == p for r in rows)]
    handles += [Patch(facecolor="white", edgecolor="red", linewidth=2.5,
                      label="lead to verify" if rec.get("lead") and rec.get("unverified")
                      else f"recommended ({rec.get('verdict', '-')})"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="what you run now")]
    dots = ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles + dots, fontsize=7, loc="lower right")
    ax.set_title("training examples/s: median (bar) and each interleaved round (dots)")


def plot_report(report: dict, path: Path) -> Optional[str]:
    """Writes doctor.png; returns None, or the line saying why not (matplotlib missing: how to install)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"doctor.png not written: matplotlib is not installed; {INSTALL}"
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    hw = report.get("hardware") or {}
    if hw.get("matmul"):
        ax = axes[0][0]
        rows = hw["matmul"]
        ax.bar([f"{r['dtype']}\nXLA {'on' if r['xla'] else 'off'}" for r in rows], [r["gflops"] for r in rows],
               color=["tab:blue" if r["xla"] else "tab:gray" for r in rows])
        ax.set_title(f"matmul GFLOP/s on this {hw['kind']}")
    speed = [r for r in (report.get("speed") or {}).get("configs", []) if "examples_per_sec" in r]
    if speed:
        names = [f"{SHORT[r['policy']]}\nXLA {'on' if r['xla'] else 'off'}\nb{r['batch']}" for r in speed]
        _speed_panel(axes[0][1], speed, names, report.get("recommendation") or {})
        axes[1][0].bar(names, [r["memory_mb"] for r in speed], color=[COLORS[r["policy"]] for r in speed])
        cpu = speed[0].get("memory_kind") == "process_rss"
        axes[1][0].set_title("memory MiB: " + ("process RSS growth over build + first steps" if cpu else "device peak"))
        for ax in (axes[0][1], axes[1][0]):
            ax.tick_params(axis="x", labelsize=7)
    f16 = (report.get("numerics") or {}).get("float16")
    if f16:
        ax = axes[1][1]
        curve = f16["underflow_by_scale"]
        ax.semilogx([c["scale"] for c in curve], [c["weight_gradients"] for c in curve], base=2,
                    label="weight gradients")
        ax.semilogx([c["scale"] for c in curve], [c["activation_gradients"] for c in curve], base=2,
                    label="layer-output gradients")
        ax.axvline(f16["loss_scale"], color="tab:red", linestyle="--", label=f"chosen scale {f16['loss_scale']:g}")
        ax.set_xlabel("loss scale")
        ax.set_title("float16: fraction of nonzero gradients flushed to zero")
        ax.legend(fontsize=7)
    fig.suptitle(report["meta"]["command"][:150], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
