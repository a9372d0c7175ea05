"""Loss and metric curves of one or several runs, from their metrics.jsonl (else metrics.csv, else
tensorboard/), as one PNG.

    python -m trainer.plot RUN [RUN ...] --out runs.png

A RUN is a run folder (runs/<recipe>/<time>) or a multirun folder, which stands for its jobs. One panel
per loss or metric (train: solid line, eval: dots; each named eval set its own markers), then the learning
rate (log axis) when it changes during a run or differs between runs (a schedule, a plateau's reduction),
then the loss scale (log axis) and the skipped steps when a run has them (mixed_float16). Each run's lines
are named by the config values that differ between the plotted runs, shortest first (.hydra/config.yaml;
else its overrides less those all share; the folder's name when the run has neither), wrapped at 60
characters below the panels; a name longer than 3 lines is cut to `#N: ...` and printed in full as a key.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from trainer.callbacks.progress import HIDDEN
from trainer.errors import UserError, reports_errors
from trainer.memory import is_memory_field
from trainer.sweep_table import differing, recorded_overrides

# speed and optimizer state; loss scale has its own panels; memory is no curve
NOT_CURVES = HIDDEN | {"step", "split", "time"}
LABEL_WIDTH, LABEL_LINES = 60, 3  # a legend entry's characters per line, and lines before it is cut to #N
FEW_POINTS = 5  # a train series with fewer points gets markers (one point draws no line)
INSTALL_MATPLOTLIB = "pip install -e '.[bench]' (or pip install matplotlib==3.11.2)"


class PlotError(UserError, ValueError):
    """Bad input to the plot (a path, an empty run); the message says what to give instead."""


@dataclass
class Run:
    label: str
    rows: List[Dict[str, Any]]
    full_label: str = ""  # the whole label when `label` (the legend's) is cut short

    def series(self, split: str, key: str):
        """(steps, values) in step order; a step logged twice (rerun after a resume) counts its last value."""
        points = {r["step"]: r[key] for r in self.rows
                  if r.get("split") == split and isinstance(r.get(key), (int, float)) and "step" in r}
        return sorted(points), [points[step] for step in sorted(points)]

    def eval_series(self, key: str):
        """[(label, steps, values)]: the eval set's `key`, or each named set's `<set>/key` (trainer/evalsets.py)."""
        sets = sorted({k.split("/")[0] for r in self.rows if r.get("split") == "eval" for k in r
                       if k.count("/") == 1 and k.endswith("/" + key)})
        found = [("eval", *self.series("eval", key))] + [(f"eval {s}", *self.series("eval", f"{s}/{key}"))
                                                         for s in sets]
        return [(label, steps, values) for label, steps, values in found if steps]


def run_folders(paths: Sequence[str]) -> List[Path]:
    """The run folders the paths name: a run folder itself, or the jobs of a multirun folder."""
    found = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise PlotError(f"{given} is not a folder. Fix: give a run folder "
                            "(runs/<recipe>/<time>) or a multirun folder.")
        if has_metrics(path):
            found.append(path)
            continue
        jobs = sorted((p for p in path.iterdir() if p.is_dir() and has_metrics(p)), key=_job_order)
        if not jobs:
            raise PlotError(f"{given} has no metrics.jsonl (nor metrics.csv or tensorboard/), nor subfolders with one. "
                            "Fix: give a run folder (runs/<recipe>/<time>) or a multirun folder; a run writes "
                            "metrics.jsonl at its first log.")
        found.extend(jobs)
    return found


def _job_order(folder: Path):
    number = folder.name.split("_")[0]
    return (0, int(number), "") if number.isdigit() else (1, 0, folder.name)


def has_metrics(folder: Path) -> bool:
    """Whether a run folder holds logs of any logger that plots: jsonl, csv or tensorboard."""
    return ((folder / "metrics.jsonl").is_file() or (folder / "metrics.csv").is_file()
            or (folder / "tensorboard").is_dir())


def _read_rows(folder: Path) -> List[Dict[str, Any]]:
    """The run's log rows from metrics.jsonl, else metrics.csv (logger=[csv]), else tensorboard/ events."""
    if not (folder / "metrics.jsonl").is_file():
        return (_csv_rows(folder / "metrics.csv") if (folder / "metrics.csv").is_file()
                else _tensorboard_rows(folder / "tensorboard"))
    rows = []
    for line in (folder / "metrics.jsonl").read_text(errors="replace").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return [r for r in rows if isinstance(r, dict)]


def _csv_rows(path: Path) -> List[Dict[str, Any]]:
    import csv

    def number(cell: str):
        try:
            return float(cell)
        except ValueError:
            return cell

    with path.open(newline="", errors="replace") as f:
        rows = [{k: number(v) for k, v in row.items() if k and v not in ("", None)} for row in csv.DictReader(f)]
    return [{**r, "step": int(r["step"])} for r in rows if isinstance(r.get("step"), float)]


def _tensorboard_rows(folder: Path) -> List[Dict[str, Any]]:
    """One row per (split, step) of the scalars under tensorboard/{train,eval} (tf.summary.scalar's tensors)."""
    import tensorflow as tf

    merged: Dict[tuple, Dict[str, Any]] = {}
    for split, pattern in (("train", "events.out.tfevents.*"), ("eval", "events.out.tfevents.*"),
                           ("eval", "*/events.out.tfevents.*")):
        for events in sorted((folder / split).glob(pattern)):
            prefix = "" if events.parent.name == split else f"{events.parent.name}/"  # eval/<set>: a named eval set
            for event in tf.compat.v1.train.summary_iterator(str(events)):
                for value in event.summary.value:
                    number = _scalar(value)
                    if number is not None:
                        row = merged.setdefault((split, event.step), {"step": int(event.step), "split": split})
                        row[prefix + value.tag] = number
    return sorted(merged.values(), key=lambda r: (r["step"], r["split"] != "train"))


def _scalar(value) -> Optional[float]:
    """A summary value's number; None for what is not one scalar (a histogram, an image, a text), which
    the user's own tf.summary calls may have written beside ours."""
    import numpy as np
    import tensorflow as tf

    if value.HasField("tensor"):
        array = tf.make_ndarray(value.tensor)
        return float(array.reshape(())) if array.size == 1 and np.issubdtype(array.dtype, np.number) else None
    return value.simple_value if value.HasField("simple_value") else None


# Keys that do not change what a run computes (conf/config.yaml leaves them out of job folder names too).
NOT_IN_LABELS = ("trainer.progress_bar", "trainer.verbose", "trainer.tensorboard", "logger", "hydra")


def _config_items(folder: Path) -> Optional[Dict[str, str]]:
    """The run's composed config (.hydra/config.yaml) as `key -> value as the command line spells it`."""
    from omegaconf import OmegaConf

    from trainer.callbacks.loggers import flatten

    path = folder / ".hydra" / "config.yaml"
    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - no record (a run from Python), or one that cannot be read: the overrides name it
        return None
    return {k: _spelled(v) for k, v in flatten(config).items()
            if not any(k == x or k.startswith(f"{x}.") for x in NOT_IN_LABELS)}


def _spelled(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(_spelled, value)) + "]"
    return str(value)


def run_labels(folders: Sequence[Path]) -> List[str]:
    """What tells each run apart, shortest first: the config values that differ between the runs (from their
    .hydra/config.yaml), else their overrides less those all share; the folder's name when nothing does."""
    configs = [_config_items(f) for f in folders]
    if len(folders) > 1 and all(c is not None for c in configs):
        keys = sorted({k for c in configs for k in c})
        differ = [k for k in keys if len({c.get(k) for c in configs}) > 1]
        kept = [[f"{k}={c[k]}" for k in differ if k in c] for c in configs]
    else:
        kept = differing([recorded_overrides(f) or [] for f in folders])
    return [",".join(sorted(items, key=len)) or f.name for f, items in zip(folders, kept)]


def load_runs(paths: Sequence[str]) -> List[Run]:
    folders = run_folders(paths)
    labels = run_labels(folders)
    if len(set(labels)) < len(labels):  # runs with the same overrides: their folders tell them apart
        labels = [f"{label} ({f.name})" if label != f.name else label for label, f in zip(labels, folders)]
    runs = [Run(_legend_label(label, number), _read_rows(f), label)
            for number, (label, f) in enumerate(zip(labels, folders), 1)]
    if not any(run.rows for run in runs):
        raise PlotError(f"the metrics.jsonl of {', '.join(map(str, folders))} hold no logs yet. Fix: plot "
                        "once the run has logged.")
    return runs


def _wrapped(label: str) -> List[str]:
    """The label in lines of at most LABEL_WIDTH characters, broken after an override's comma."""
    lines = [""]
    for part in label.split(","):
        if lines[-1] and len(lines[-1]) + 1 + len(part) > LABEL_WIDTH:
            lines[-1] += ","
            lines.append(part)
        else:
            lines[-1] = f"{lines[-1]},{part}" if lines[-1] else part
    return [chunk for line in lines for chunk in (line[i:i + LABEL_WIDTH] for i in range(0, len(line), LABEL_WIDTH))]


def _legend_label(label: str, number: int) -> str:
    lines = _wrapped(label)
    if len(lines) <= LABEL_LINES:
        return "\n".join(lines)
    return f"#{number}: {lines[0][:LABEL_WIDTH - 8]}..."


def label_key(runs: List[Run]) -> List[str]:
    """`#N: the whole label` for each run whose legend entry is cut short."""
    return [f"{run.label.split(':')[0]}: {run.full_label}" for run in runs
            if run.label != "\n".join(_wrapped(run.full_label))]


def _panels(runs: List[Run]) -> List[str]:
    """The loss first, then the metrics, in the order the runs logged them; then loss scaling's."""
    keys: Dict[str, None] = {}
    for run in runs:
        for row in run.rows:  # a named eval set's `val/loss` is drawn on the `loss` panel
            keys.update((k.split("/")[-1] if row.get("split") == "eval" and k.count("/") == 1 else k, None)
                        for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    curves = [k for k in keys if k not in NOT_CURVES and not is_memory_field(k) and "/" not in k
              and not k.endswith(("loss_scale", "skipped_steps"))]
    curves.sort(key=lambda k: not k.endswith("loss"))  # stable: losses first
    rates = [k for k in keys if (k == "lr" or k.endswith("/lr")) and _changes(runs, k)]
    scales = [k for k in keys if k.endswith("loss_scale")]
    skipped = [k for k in keys if k.endswith("skipped_steps")]
    if not scales and not any(r.get(k) for k in skipped for run in runs for r in run.rows):
        skipped = []  # logged as 0 by every run without loss scaling: nothing to see
    return curves + rates + scales + skipped


def _changes(runs: List[Run], key: str) -> bool:
    """A learning rate that changes during a run (a schedule, a plateau's reduction) or differs between runs:
    worth a panel; one constant shared by every run is not."""
    return len({value for run in runs for value in run.series("train", key)[1]}) > 1


def plot_runs(paths: Sequence[str]):
    """A matplotlib Figure of the runs' curves (no pyplot: no display or global state needed)."""
    return draw_runs(load_runs(paths))


def _legend_shape(runs: List[Run]):
    """(columns, extra inches): two columns of short names, one of long ones; 0.6 in holds three rows."""
    columns = 2 if all(len(line) <= LABEL_WIDTH * 2 // 3 for run in runs for line in run.label.split("\n")) else 1
    rows = math.ceil(2 * sum(run.label.count("\n") + 1 for run in runs) / columns)  # train and eval entries
    return columns, max(0, rows - 3) * 0.17


def draw_runs(runs: List[Run]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError(f"trainer.plot needs matplotlib, which is not installed. Fix: {INSTALL_MATPLOTLIB}") from None
    panels = _panels(runs)
    if not panels:
        raise PlotError("the runs logged no loss or metric to plot.")
    columns, legend_inches = _legend_shape(runs)
    fig = Figure(figsize=(8, 2.4 * len(panels) + 0.6 + legend_inches), layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for ax, key in zip(axes, panels):
        for run, color in zip(runs, colors):
            steps, values = run.series("train", key)
            if steps:
                few = {"marker": "o", "markersize": 4} if len(steps) < FEW_POINTS else {}
                ax.plot(steps, values, color=color, label=f"{run.label} train", **few)
            for (label, steps, values), marker in zip(run.eval_series(key), "osD^v<>"):
                ax.plot(steps, values, color=color, linestyle="--", marker=marker, markersize=4,
                        label=f"{run.label} {label}")
        ax.set_ylabel(key)
        if key.endswith("loss_scale"):
            ax.set_yscale("log", base=2)
        elif (key == "lr" or key.endswith("/lr")) and all(v > 0 for run in runs for v in run.series("train", key)[1]):
            ax.set_yscale("log")  # a reduction by 10x is a step of the same height at any rate
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(columns, len(names)), fontsize="small")
    return fig


def save(fig, out: str) -> None:
    """Writes the figure; a path it cannot be written to is a PlotError naming the fix."""
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {out}: {e.strerror or e}. Fix: give --out a path in a folder that exists "
                        "and you can write.") from None
    except ValueError as e:  # matplotlib: an --out suffix it has no writer for
        raise PlotError(f"cannot write {out}: {e}. Fix: give --out a .png path.") from None


@reports_errors(prefix="trainer.plot: ", exits=True)
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or multirun folders (their jobs)")
    parser.add_argument("--out", default="runs.png", help="the PNG to write (default: runs.png)")
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    save(draw_runs(runs), args.out)
    print(f"Wrote {args.out}")
    for line in label_key(runs):
        print(line)


if __name__ == "__main__":
    main()
