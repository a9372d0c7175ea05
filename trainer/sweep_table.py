"""The table of a sweep's jobs, and the Hydra callback that checks a sweep before its first job and writes
the table after each job (conf/config.yaml's hydra.callbacks).

SweepSummary reads every job's metrics.jsonl and trainer.log and writes sweep_summary.csv in the sweep folder
after each job; at the end of the sweep it prints the table and the best job's command. What a job returns
and how job folders are named is trainer/sweep.py's.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from trainer.sweep import (BASIC_SWEEPER, SWEEP_EXTRA, SWEPT_KEYS_ENV, check_sweep_metric, logged_key, metric_names,
                           record_swept_keys, sweep_objective)

log = logging.getLogger(__name__)
CSV_NAME = "sweep_summary.csv"
CSV_ONLY = ("folder", "command", "best")  # columns too wide for the printed table: the job number finds them
_DONE = re.compile(r"\b(Done|Interrupted): (\d+) steps? in ([\d.]+)s")


def program() -> str:
    """How the user started trainer: the console script or `python -m trainer`."""
    return "trainer" if os.path.basename(sys.argv[0]) == "trainer" else "python -m trainer"


def recorded_overrides(folder: Path) -> Optional[List[str]]:
    """The command-line overrides a run was started with, or None before it began training."""
    recorded = Path(folder) / ".hydra" / "overrides.yaml"  # written once training began (trainer/cli.py)
    return [str(o) for o in OmegaConf.load(recorded)] if recorded.exists() else None


def differing(override_lists: List[List[str]]) -> List[List[str]]:
    """Each list without the overrides all of them share: what tells runs apart (in a table, a legend)."""
    shared = set.intersection(*map(set, override_lists)) if len(override_lists) > 1 else set()
    return [[o for o in overrides if o not in shared] for overrides in override_lists]


def _overrides(folder: Path) -> List[str]:
    recorded = recorded_overrides(folder)
    if recorded is not None:
        return recorded
    _, _, name = folder.name.partition("_")
    return name.split(",") if name else []


def _job_row(folder: Path, metric: str, mode: str) -> Dict[str, Any]:
    rows = []
    if (folder / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("split") == "eval"]
    key = logged_key(metric, list(dict.fromkeys(k for r in evals for k in r)), say=False)  # as the job returned it
    evals = [r[key] for r in evals if isinstance(r.get(key), (int, float))]
    log_text = (folder / "trainer.log").read_text(errors="replace") if (folder / "trainer.log").exists() else ""
    done = _DONE.findall(log_text)
    trained = [d for d in done if int(d[1]) > 0] or done  # a rerun of the finished job trained 0 steps: not its time
    status, seconds = (done[-1][0].lower(), float(trained[-1][2])) if done else ("failed", math.nan)
    best = (max if mode == "max" else min)(evals) if evals else math.nan
    overrides = _overrides(folder)
    return {"job": int(folder.name.split("_")[0]), "overrides": overrides, "status": status,
            "steps": rows[-1]["step"] if rows else 0, "seconds": "" if math.isnan(seconds) else f"{seconds:.1f}",
            f"best_{metric}": best, f"final_{metric}": evals[-1] if evals else math.nan, "folder": folder.name,
            "command": " ".join([program(), *map(shlex.quote, overrides)])}  # this job as a single run


def summarize(sweep_dir: Path, metric: Optional[str], mode: str) -> List[Dict[str, Any]]:
    """One row per job folder of `sweep_dir` (in job order); `overrides` keeps only what differs between
    jobs (the shared shrinking overrides are noise in a table)."""
    metric = metric or "loss"
    mode = mode if metric != "loss" else "min"
    if not Path(sweep_dir).is_dir():
        return []
    folders = [f for f in Path(sweep_dir).iterdir() if f.is_dir() and f.name.split("_")[0].isdigit()]
    rows = [_job_row(f, metric, mode) for f in sorted(folders, key=lambda f: int(f.name.split("_")[0]))]
    for r, kept in zip(rows, differing([r["overrides"] for r in rows])):
        r["overrides"] = ",".join(kept)
    return rows


def best_job(rows: List[Dict[str, Any]], metric: str, mode: str) -> Optional[Dict[str, Any]]:
    """The finished job with the best final `metric`: the value each job returned to the sweeper."""
    ranked = [r for r in rows if r["status"] == "done" and math.isfinite(r.get(f"final_{metric}", math.nan))]
    return (max if mode == "max" else min)(ranked, key=lambda r: r[f"final_{metric}"], default=None)


def cell(value: Any) -> str:
    """A value as the table and the CSV show it."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def write_csv(rows: List[Dict[str, Any]], path: Path) -> None:
    if not rows:
        return
    partial = Path(path).with_name(f".{Path(path).name}.{os.getpid()}")  # parallel jobs (joblib) write it too
    with partial.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: cell(v) for k, v in r.items()} for r in rows)
    os.replace(partial, path)


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = [k for k in rows[0] if k not in CSV_ONLY]
    cells = [header] + [[cell(r[k]) for k in header] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def _objective(config: DictConfig, hydra_node: Optional[DictConfig] = None) -> Tuple[str, str]:
    """The sweep's (metric, mode); an explicit hydra.sweeper.direction (Optuna's) decides the mode. `hydra_node`:
    the hydra node apart (a job's config has none), else config's."""
    metric, mode = sweep_objective(config.trainer, metric_names(config))
    where, key = (hydra_node, "sweeper.direction") if hydra_node is not None else (config, "hydra.sweeper.direction")
    direction = OmegaConf.select(where, key, default=None, throw_on_resolution_failure=False)
    return metric, {"maximize": "max", "minimize": "min"}.get(str(direction), mode)


def write_table(sweep_dir: Path, metric: str, mode: str) -> Tuple[List[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """Writes sweep_summary.csv of the jobs in `sweep_dir` so far; returns (rows, the best job's row). A table is a
    convenience: it never fails a sweep (a problem is said, and no rows returned)."""
    try:
        rows = summarize(sweep_dir, metric, mode)
        best = best_job(rows, metric, mode)
        for row in rows:
            row["best"] = row is best
        write_csv(rows, sweep_dir / CSV_NAME)
    except (OSError, ValueError, KeyError) as e:
        log.warning("The sweep's table in %s could not be made: %s", sweep_dir, e)
        return [], None
    return rows, best


def sweep_command(sweep_dir: Path) -> Optional[str]:
    """The command that runs the sweep in `sweep_dir` again, from the multirun.yaml Hydra's sweeper wrote there at
    its start: with the same hydra.sweep.dir each job resumes from its checkpoints, and the jobs not yet run run
    (a job's single-run command would resume that job alone). None without that record."""
    import yaml

    try:
        overrides = OmegaConf.to_container(OmegaConf.load(Path(sweep_dir) / "multirun.yaml").hydra.overrides,
                                           resolve=False)  # as typed: 'hydra.sweep.subdir=${hydra.job.num}'
    except (OSError, yaml.YAMLError, AttributeError, KeyError, ValueError):
        return None
    ours = ("hydra.mode=", "hydra.sweep.dir=")
    kept = [str(o) for o in overrides["hydra"] if not str(o).startswith(ours)] + [str(o) for o in overrides["task"]]
    return " ".join([program(), "-m", *map(shlex.quote, [*kept, f"hydra.sweep.dir={sweep_dir}"])])


def table_of_a_stopped_sweep(cfg: DictConfig, hydra_node: DictConfig, signal_name: str) -> None:
    """A signal stops a sweep by exiting in a job, so Hydra calls neither on_job_end nor on_multirun_end: the table
    of the jobs so far is written (and said, with the command that resumes the whole sweep) here."""
    sweep_dir = Path(str(hydra_node.sweep.dir)).absolute()
    try:
        metric, mode = _objective(cfg, hydra_node)
    except ValueError as e:  # a ConfigError: checked at the sweep's start, so not expected here
        log.warning("The sweep's table in %s could not be made: %s", sweep_dir, e)
        return
    rows, _ = write_table(sweep_dir, metric, mode)
    command = sweep_command(sweep_dir) if OmegaConf.select(hydra_node, "sweeper._target_") == BASIC_SWEEPER else None
    log.warning("%s stopped the sweep: %s%s", signal_name,
                f"the table of its {len(rows)} jobs so far is in {sweep_dir / CSV_NAME}" if rows else "no job table",
                f"; to resume the whole sweep, run: {command}" if command else "")


def _missing_sweeper(config: DictConfig) -> Optional[str]:
    """Why the chosen sweeper or launcher cannot be made, when its plugin is not installed (hydra/sweeper=optuna
    composes from our conf/ without it: Hydra would fail later with an import traceback)."""
    for kind in ("sweeper", "launcher"):
        target = str(OmegaConf.select(config, f"hydra.{kind}._target_", default=""))
        plugin = ".".join(target.split(".")[:2])  # hydra_plugins.hydra_optuna_sweeper
        if target.startswith("hydra_plugins.") and importlib.util.find_spec(plugin) is None:
            choice = OmegaConf.select(config, f"hydra.runtime.choices.hydra/{kind}", default=kind)
            return (f"hydra/{kind}={choice} needs the Hydra plugin {plugin}, which is not installed. "
                    f"Fix: {SWEEP_EXTRA} (it pins the Optuna sweeper and the joblib launcher).")
    return None


class SweepSummary(HydraCallback):
    """conf/config.yaml's hydra.callbacks: checks the sweeper and the objective before the first job, writes
    the sweep's table as CSV after each job (a failed job ends a Hydra sweep with an exception, before
    on_multirun_end) and prints it at the end, with the best job's command."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from trainer.config import ConfigError
        from trainer.runlock import _fail

        os.environ.pop(SWEPT_KEYS_ENV, None)  # an earlier sweep in this process that failed left its keys

        try:
            problem = _missing_sweeper(config)
            if problem:
                raise ConfigError(problem)
            check_sweep_metric(config)  # before the sweep_mode question: a wrong name needs another fix
            metric, mode = _objective(config)
        except ConfigError as e:
            _fail(e)  # exit 2 before the sweeper is made
        record_swept_keys(config)  # job folders are named by these keys (job_folder)
        if OmegaConf.select(config, "hydra.sweeper._target_") != BASIC_SWEEPER:
            log.info("Sweep objective: the final %s, %s (trainer.sweep_metric)", metric,
                     "maximized" if mode == "max" else "minimized")

    def _rows(self, config: DictConfig):
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        try:
            metric, mode = _objective(config)
        except ValueError as e:  # a ConfigError
            log.warning("The sweep's table in %s could not be made: %s", sweep_dir, e)
            return [], sweep_dir, None
        rows, best = write_table(sweep_dir, metric, mode)
        return rows, sweep_dir, best

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if OmegaConf.select(config, "hydra.mode") == RunMode.MULTIRUN:
            self._rows(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ.pop(SWEPT_KEYS_ENV, None)
        rows, sweep_dir, best = self._rows(config)
        if rows:  # printed: the process's logging belongs to the last job (its trainer.log) by now
            lines = [f"Sweep of {len(rows)} jobs ({sweep_dir / CSV_NAME}):", format_table(rows)]
            if best is not None:
                metric, mode = _objective(config)
                lines.append(f"Best: job {best['job']}, final {metric}={cell(best[f'final_{metric}'])} "
                             f"({mode}): {best['command']}")
            print("\n".join(lines), flush=True)
