"""Recipes through the CLI, float32 against mixed_bfloat16 (and optionally this checkout against another),
in paired interleaved rounds: what a user running `python -m trainer recipe=... precision=...` gets.

Each round runs every (checkout, precision) once, in an order that rotates between rounds, and reads the
run's own "Throughput: N examples/s" line (the median of its log windows, so start-up and compilation are
not counted). The ratio bf16/f32 is taken within a round, then summarised over rounds (median, min, max),
because the machine is shared and noisy.

    python benchmarks/bench_recipes.py --recipes resnet,transformer --rounds 3
    python benchmarks/bench_recipes.py --recipes resnet --baseline /path/to/other/checkout   # before/after

Each checkout runs with PYTHONPATH set to it. Its configs come from `trainer/conf` there: a `git worktree`
of this project needs the links `trainer/conf -> ../conf` and `trainer/recipes -> ../recipes` (an
installed checkout maps them itself), or the installed checkout's configs are used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
PRECISIONS = ("float32", "mixed_bfloat16")
THROUGHPUT = re.compile(r"Throughput: ([0-9.]+) examples/s")
ACCURACY = re.compile(r"Final eval: .*accuracy=([0-9.]+)")
DEFAULT_STEPS = {"resnet": 80, "transformer": 50}


def run_once(checkout: Path, recipe: str, precision: str, steps: int, extra: list[str]) -> dict:
    """One CLI run in a throw-away run folder; its throughput and final accuracy (if it evaluated)."""
    folder = tempfile.mkdtemp(prefix=f"bench_{recipe}_")
    env = dict(os.environ, PYTHONPATH=str(checkout), TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "trainer", f"recipe={recipe}", f"precision={precision}",
               f"trainer.max_steps={steps}", f"hydra.run.dir={folder}", *extra]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    found = THROUGHPUT.search(result.stdout + result.stderr)
    if result.returncode != 0 or not found:
        output = (result.stdout + result.stderr)[-2000:]
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    accuracy = ACCURACY.search(result.stdout + result.stderr)
    return {"ex_per_s": float(found.group(1)), "accuracy": float(accuracy.group(1)) if accuracy else None}


def load_average() -> float:
    return os.getloadavg()[0]


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x (min {min(values):.2f}, max {max(values):.2f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="resnet,transformer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="trainer.max_steps (default: resnet 80, transformer 50)")
    parser.add_argument("--baseline", type=Path, help="another checkout of the project, run in the same rounds")
    parser.add_argument("--out", type=Path, default=Path("bench_results/bench_recipes.json"))
    parser.add_argument("overrides", nargs="*", help="more CLI overrides for every run (default: trainer.eval_every=0)")
    args = parser.parse_args(argv)
    checkouts = {"this": HERE} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    extra = args.overrides or ["trainer.eval_every=0"]
    rows = []
    for recipe in args.recipes.split(","):
        steps = args.steps or DEFAULT_STEPS.get(recipe, 80)
        cells = [(name, precision) for name in checkouts for precision in PRECISIONS]
        for round_index in range(args.rounds):
            shift = round_index % len(cells)
            for name, precision in cells[shift:] + cells[:shift]:
                result = run_once(checkouts[name], recipe, precision, steps, extra)
                rows.append({"recipe": recipe, "round": round_index, "checkout": name, "precision": precision,
                             "load": round(load_average(), 2), **result})
                print(json.dumps(rows[-1]), flush=True)
    report(rows, checkouts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return 0


def report(rows: list[dict], checkouts: dict) -> None:
    def cell(recipe, name, precision, round_index):
        wanted = (recipe, name, precision, round_index)
        return next(r["ex_per_s"] for r in rows if (r["recipe"], r["checkout"], r["precision"], r["round"]) == wanted)

    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        rounds = sorted({r["round"] for r in rows if r["recipe"] == recipe})
        for name in checkouts:
            f32 = [cell(recipe, name, "float32", i) for i in rounds]
            bf16 = [cell(recipe, name, "mixed_bfloat16", i) for i in rounds]
            print(f"{recipe} [{name}]: float32 {statistics.median(f32):.0f} ex/s ({min(f32):.0f}-{max(f32):.0f}), "
                  f"mixed_bfloat16 {statistics.median(bf16):.0f} ({min(bf16):.0f}-{max(bf16):.0f}); "
                  f"bf16/f32 per round {summary([b / f for b, f in zip(bf16, f32)])}")
        if "baseline" in checkouts:
            for precision in PRECISIONS:
                ratios = [cell(recipe, "this", precision, i) / cell(recipe, "baseline", precision, i) for i in rounds]
                print(f"{recipe} {precision}: this / baseline per round {summary(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
