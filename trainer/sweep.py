"""Multirun sweeps: job folders named by their overrides, and a table of the jobs at the sweep's end.

conf/config.yaml names each job's folder `<job number>_<its overrides>` (Hydra's
hydra.job.override_dirname, through the `job_folder` resolver below) and registers SweepSummary, which
reads every job's metrics.jsonl and trainer.log and writes sweep_summary.csv in the sweep folder after
each job; at the end of the sweep it prints the table.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
CSV_NAME = "sweep_summary.csv"
_DONE = re.compile(r"\b(Done|Interrupted): (\d+) steps in ([\d.]+)s")


def job_folder(num: Any, override_dirname: str) -> str:
    """`0_optimizer.lr=1e-3`, or `0` without overrides: the number keeps names unique and in job order; a
    `/` in a value (a path) would make nested folders, and a long name would exceed the file system's."""
    name = str(override_dirname).replace("/", "_")[:200]
    return f"{num}_{name}" if name else str(num)


def register_resolver() -> None:
    if not OmegaConf.has_resolver("job_folder"):
        OmegaConf.register_new_resolver("job_folder", job_folder)


def _overrides(folder: Path) -> List[str]:
    recorded = folder / ".hydra" / "overrides.yaml"  # written once training began (trainer/cli.py)
    if recorded.exists():
        return [str(o) for o in OmegaConf.load(recorded)]
    _, _, name = folder.name.partition("_")
    return name.split(",") if name else []


def _job_row(folder: Path, metric: str, mode: str) -> Dict[str, Any]:
    rows = []
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r[metric] for r in rows if r.get("split") == "eval" and isinstance(r.get(metric), (int, float))]
    log_text = (folder / "trainer.log").read_text(errors="replace") if (folder / "trainer.log").exists() else ""
    done = _DONE.findall(log_text)
    status, seconds = (done[-1][0].lower(), float(done[-1][2])) if done else ("failed", math.nan)
    best = (max if mode == "max" else min)(evals) if evals else math.nan
    return {"job": int(folder.name.split("_")[0]), "overrides": _overrides(folder), "status": status,
            "steps": rows[-1]["step"] if rows else 0, "seconds": "" if math.isnan(seconds) else f"{seconds:.1f}",
            f"best_{metric}": best, f"final_{metric}": evals[-1] if evals else math.nan, "folder": folder.name}


def summarize(sweep_dir: Path, metric: Optional[str], mode: str) -> List[Dict[str, Any]]:
    """One row per job folder of `sweep_dir` (in job order); `overrides` keeps only what differs between
    jobs (the shared shrinking overrides are noise in a table)."""
    metric = metric or "loss"
    mode = mode if metric != "loss" else "min"
    if not Path(sweep_dir).is_dir():
        return []
    folders = [f for f in Path(sweep_dir).iterdir() if f.is_dir() and f.name.split("_")[0].isdigit()]
    rows = [_job_row(f, metric, mode) for f in sorted(folders, key=lambda f: int(f.name.split("_")[0]))]
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for r in rows:
        r["overrides"] = ",".join(o for o in r["overrides"] if o not in shared)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = [k for k in rows[0] if k != "folder"]  # in the CSV; the job number finds it
    cells = [header] + [[_cell(r[k]) for k in header] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


class SweepSummary(HydraCallback):
    """conf/config.yaml's hydra.callbacks: the sweep's table, as CSV after each job (a failed job ends a
    Hydra sweep with an exception, before on_multirun_end) and printed at the end."""

    def _rows(self, config: DictConfig):
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        metric = OmegaConf.select(config, "trainer.best_metric")
        try:  # a table is a convenience: it never fails a sweep
            rows = summarize(sweep_dir, metric, str(OmegaConf.select(config, "trainer.best_mode", default="max")))
            write_csv(rows, sweep_dir / CSV_NAME)
        except (OSError, ValueError, KeyError) as e:
            log.warning("The sweep's table in %s could not be made: %s", sweep_dir, e)
            rows = []
        return rows, sweep_dir

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN:
            self._rows(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows, sweep_dir = self._rows(config)
        if rows:  # printed: the process's logging belongs to the last job (its trainer.log) by now
            print(f"Sweep of {len(rows)} jobs ({sweep_dir / CSV_NAME}):\n{format_table(rows)}", flush=True)
