"""doctor.png: the measured numbers at a glance (matplotlib, from the `bench` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

INSTALL = "pip install 'trainer[bench]' (matplotlib==3.11.2)"


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
        short = {"float32": "f32", "mixed_float16": "f16", "mixed_bfloat16": "bf16"}
        names = [f"{short[r['policy']]}\nXLA {'on' if r['xla'] else 'off'}\nb{r['batch']}" for r in speed]
        colors = {"float32": "tab:gray", "mixed_float16": "tab:orange", "mixed_bfloat16": "tab:green"}
        axes[0][1].bar(names, [r["examples_per_sec"] for r in speed], color=[colors[r["policy"]] for r in speed])
        axes[0][1].set_title("training examples/s (median of interleaved rounds)")
        axes[1][0].bar(names, [r["memory_mb"] for r in speed], color=[colors[r["policy"]] for r in speed])
        cpu = speed[0].get("memory_kind") == "process_rss"
        axes[1][0].set_title("memory MiB: " + ("process RSS growth over build + first steps" if cpu else "device peak"))
        for ax in (axes[0][1], axes[1][0]):
            ax.tick_params(axis="x", labelsize=7)
    f16 = (report.get("numerics") or {}).get("float16")
    if f16:
        ax = axes[1][1]
        curve = f16["underflow_by_scale"]
        ax.semilogx([c["scale"] for c in curve], [c["weight_gradients"] for c in curve], base=2, label="weight gradients")
        ax.semilogx([c["scale"] for c in curve], [c["activation_gradients"] for c in curve], base=2, label="layer-output gradients")
        ax.axvline(f16["loss_scale"], color="tab:red", linestyle="--", label=f"chosen scale {f16['loss_scale']:g}")
        ax.set_xlabel("loss scale")
        ax.set_title("float16: fraction of nonzero gradients flushed to zero")
        ax.legend(fontsize=7)
    fig.suptitle(report["meta"]["command"][:150], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
