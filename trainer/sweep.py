"""Multirun sweeps: job folders named by their overrides and the value a sweeper optimizes (the table of
the jobs at the sweep's end is trainer/sweep_table.py's).

conf/config.yaml names each job's folder `<job number>_<its swept overrides>` (the `job_folder` resolver
below: the keys given several values, or the sweeper's params).

A job returns its final value of trainer.sweep_metric (`job_value`); hydra/sweeper=optuna, as
`register_sweeper_configs` stores it, points the Optuna sweeper's direction at the same choice (the
`sweep_direction` resolver).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from trainer import evalsets

log = logging.getLogger(__name__)
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"  # runs every job; uses no value
SWEEP_EXTRA = "pip install -e '.[sweep]'"  # the Optuna sweeper and the joblib launcher (pyproject.toml)


SWEPT_KEYS_ENV = "TRAINER_SWEPT_KEYS"  # {"sweep_dir": ..., "keys": [...]}: set at a sweep's start, read by each job


def job_folder(num: Any, override_dirname: str, task: Any = None, sweep_dir: Any = None, exclude: Any = None) -> str:
    """`0_optimizer.lr=1e-3`, or `0` without overrides: the number keeps names unique and in job order; a
    `/` in a value (a path) would make nested folders, and a long name would exceed the file system's.

    With the job's overrides (`task`) and a sweep whose swept keys SweepSummary recorded, only the swept keys
    name the folder (`0_optimizer.lr=0.001`, not every shrinking override given once); else Hydra's
    override_dirname (every override). Either way without hydra.job.config.override_dirname.exclude_keys
    (`exclude`: what does not change the result)."""
    swept = swept_keys(sweep_dir) if task is not None else None
    if swept is not None:
        swept = swept - {str(k) for k in (exclude or [])}
        override_dirname = ",".join(sorted(line for line in map(str, task) if _key_of(line) in swept))
    name = str(override_dirname).replace("/", "_")[:200]
    return f"{num}_{name}" if name else str(num)


def _key_of(line: str) -> Optional[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(line).key_or_group
    except Exception:  # noqa: BLE001 - Hydra parsed it once already; an unparsable line names no key
        return None


def record_swept_keys(config: DictConfig) -> List[str]:
    """The keys a sweep varies: command-line overrides with several values (`optimizer.lr=1e-3,1e-2`,
    Optuna's `interval(...)`) and the sweeper's `params`; kept in the environment for the jobs (the joblib
    launcher's workers inherit it)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.select(config, "hydra.overrides.task", default=[])
    parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
    keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    keys |= {str(k) for k in (OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})}
    sweep_dir = str(OmegaConf.select(config, "hydra.sweep.dir", default=""))
    os.environ[SWEPT_KEYS_ENV] = json.dumps({"sweep_dir": sweep_dir, "keys": sorted(keys)})
    return sorted(keys)


def swept_keys(sweep_dir: Any) -> Optional[set]:
    """The keys recorded for this sweep folder; None when none were (a job of another sweep, or run alone)."""
    try:
        recorded = json.loads(os.environ.get(SWEPT_KEYS_ENV, ""))
    except ValueError:
        return None
    if not isinstance(recorded, dict) or recorded.get("sweep_dir") != str(sweep_dir):
        return None
    return set(recorded.get("keys", []))


def metric_names(config: Any) -> Optional[List[str]]:
    """The names of a composed config's metrics, None when not known: no `metrics` key, or a step that may log
    others (a trainer_class's own)."""
    if (config is None or "metrics" not in config
            or str(config.get("trainer_class") or "trainer.Trainer") != "trainer.Trainer"):
        return None
    return [str(name) for name in (config.get("metrics") or {})]


def _sweep_metric(trainer_cfg: Any, metrics: Optional[Sequence[str]] = None) -> str:
    """trainer.sweep_metric, else the metric the best checkpoints are ranked by (callbacks/best_metric.py's
    default_best_metric: the default best_metric, `accuracy`, of a config without metrics is the loss), else the
    loss. `metrics`: metric_names(config), None when not known."""
    from trainer.config import TrainerConfig

    best_metric = getattr(trainer_cfg, "best_metric", None)
    if metrics is not None and not metrics and best_metric == TrainerConfig.best_metric:
        best_metric = "loss"
    return getattr(trainer_cfg, "sweep_metric", None) or best_metric or "loss"


def sweep_objective(trainer_cfg: Any, metrics: Optional[Sequence[str]] = None) -> Tuple[str, str]:
    """(metric, "max" or "min"): what a sweep optimizes. trainer.sweep_metric, else the best_metric the
    recipe keeps its best checkpoint by (the loss for the default one without metrics: `metrics`, as
    metric_names gives them), else the loss; the mode is sweep_mode, else best_mode for the best_metric (auto
    decided as the run's best checkpoint decides it), min for a loss. Raises ConfigError for any other metric
    without a sweep_mode, and for a best_metric auto cannot judge."""
    from trainer.config import ConfigError

    best_metric, best_mode = getattr(trainer_cfg, "best_metric", None), getattr(trainer_cfg, "best_mode", "auto")
    metric, mode = _sweep_metric(trainer_cfg, metrics), getattr(trainer_cfg, "sweep_mode", None)
    if mode is None and metric == best_metric:
        mode = evalsets.resolve_mode(best_mode, best_metric, "trainer.best_mode")
    elif mode is None and metric.endswith("loss"):
        mode = "min"
    elif mode is None:
        raise ConfigError(f"trainer.sweep_metric={metric}: is a larger or a smaller {metric} better? "
                          "Fix: set trainer.sweep_mode=max or trainer.sweep_mode=min.")
    return metric, mode


def logged_names(config: Any) -> List[str]:
    """The names a sweep may rank: the loss and the config's `metrics` keys; with `eval_sets`, each also
    prefixed by its set, the recipe's own split named `val` (when it has one; the job's logs tell), a bare
    name meaning the first set's, as trainer.best_metric reads it (trainer/evalsets.py)."""
    names = ["loss", *(str(name) for name in (config.get("metrics") or {}))]
    sets = list(config.get("eval_sets") or {})
    return names + [f"{s}/{n}" for s in ["val", *sets] for n in names] if sets else names


def check_sweep_metric(config: Any) -> None:
    """An explicit trainer.sweep_metric the run will not log: a ConfigError before the first job (else every
    trial trains, then fails). A recipe's own trainer_class step may log other names: then only a warning."""
    from trainer.config import ConfigError

    metric, names = getattr(config.trainer, "sweep_metric", None), logged_names(config)
    if not metric or metric in names or (not config.get("eval_sets")
                                         and evalsets.single_set(metric, names, "trainer.sweep_metric") in names):
        return  # one eval set: `val/accuracy` (and Keras' `val_accuracy`) is its `accuracy`
    problem = (f"trainer.sweep_metric={metric}: the run logs no {metric!r}; its eval logs hold "
               f"{', '.join(names)}{evalsets.close_hint(metric, names)}. Fix: set trainer.sweep_metric to one of them")
    trainer_class = str(config.get("trainer_class") or "trainer.Trainer")
    if trainer_class != "trainer.Trainer":
        log.warning("%s, unless trainer_class=%s's step logs %r.", problem, trainer_class, metric)
        return
    raise ConfigError(problem + " (or add it to metrics).")


def sweep_direction(trainer_cfg: Any, _root_: Any = None) -> str:
    """hydra/sweeper=optuna's `direction: ${sweep_direction:${trainer}}` (register_sweeper_configs); OmegaConf
    hands the resolver the composed config as `_root_` (its metrics)."""
    return {"max": "maximize", "min": "minimize"}[sweep_objective(trainer_cfg, metric_names(_root_))[1]]


def logged_key(metric: str, keys: Sequence[str], say: bool = True) -> str:
    """The key of a job's eval record (`keys`) that holds the sweep's `metric`: the one the job returns to its
    sweeper (job_value) and the table ranks the jobs by (summarize), read as the best checkpoint reads
    trainer.best_metric (evalsets.resolve): with several eval sets a bare name (or `eval/NAME`) is the first set's
    and Keras' `val_loss` is `val/loss`; with one set, `val/accuracy`, `val_accuracy` and `eval/accuracy` are its
    `accuracy`. A name it cannot place comes back as given (the caller says it is missing). `say`: the job's log
    says which (the table reads the records quietly)."""
    if metric in keys:
        return metric
    sets = list(dict.fromkeys(k.partition("/")[0] for k in keys if "/" in k))  # several eval sets, in order
    names = (sorted({k.partition("/")[2] for k in keys if "/" in k}) if sets
             else [k for k in keys if k not in ("step", "split")])
    try:
        return evalsets.resolve(metric, sets or None, names, "trainer.sweep_metric", say=say)
    except evalsets.EvalSetError:  # a set no record has: job_value names the keys there are
        return metric


def job_value(logs: Dict[str, Any], trainer_cfg: Any,
              metrics: Optional[Sequence[str]] = None) -> Tuple[float, Optional[str]]:
    """The value a job returns to its sweeper, and the error when the final logs lack a finite one. `metrics`:
    metric_names of its config."""
    metric = logged_key(_sweep_metric(trainer_cfg, metrics), list(logs))
    value = logs.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value), None
    if value is None:
        names = ", ".join(k for k, v in logs.items() if isinstance(v, (int, float)) and k not in ("step",))
        return math.nan, (f"trainer.sweep_metric: {metric!r} is not in the run's final logs ({names}). "
                          "Fix: set trainer.sweep_metric to one of them.")
    return math.nan, f"trainer.sweep_metric: the final {metric} is {value}, which a sweeper cannot rank."


def register_resolver() -> None:
    if not OmegaConf.has_resolver("job_folder"):
        OmegaConf.register_new_resolver("job_folder", job_folder)
    if not OmegaConf.has_resolver("sweep_direction"):
        OmegaConf.register_new_resolver("sweep_direction", sweep_direction)


OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def register_sweeper_configs() -> None:
    """hydra/sweeper=optuna as the plugin defines it but for two defaults: the direction follows
    trainer.sweep_metric (maximize accuracy, minimize a loss; hydra.sweeper.direction=... still wins), and a
    failed job is a failed trial, not the end of the sweep (max_failure_rate=1.0).

    A YAML file of ours cannot take the plugin's name (Hydra 1.3 would take the plugin's entry for its schema,
    and refuses one with a defaults list), and a plugin stores its ConfigStore entries when Hydra scans the
    plugins (once per process): so the scan runs here first, and our entry then replaces the plugin's. Without the
    plugins, hydra/sweeper=optuna and hydra/launcher=joblib still compose, to their plugins' targets, so that
    SweepSummary.on_multirun_start can say how to install them (instead of Hydra's "Could not find")."""
    from dataclasses import make_dataclass

    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    store = ConfigStore.instance()
    Plugins.instance()  # the plugins' own ConfigStore entries, now rather than after ours
    try:
        from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    except ImportError:
        store.store(group="hydra/sweeper", name="optuna", node={"_target_": OPTUNA_SWEEPER}, provider="trainer")
    else:
        node = make_dataclass("TrainerOptunaSweeperConf", [
            ("direction", Any, "${sweep_direction:${trainer}}"),  # sweep_direction above
            ("max_failure_rate", float, 1.0)], bases=(OptunaSweeperConf,))
        store.store(group="hydra/sweeper", name="optuna", node=node, provider="trainer")
    if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is None:
        store.store(group="hydra/launcher", name="joblib", node={"_target_": JOBLIB_LAUNCHER}, provider="trainer")
