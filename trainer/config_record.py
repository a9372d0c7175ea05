"""The run folder's record of its config, `.hydra/config.yaml`, across resumes.

A resume may change the config (a longer `trainer.max_steps`, another precision); the file then holds the
newest one, so the config each earlier part of the run trained with is kept beside it, in
`.hydra/history/config.until-step-N.yaml`, and the log names what changed. `python -m trainer` writes it
with RunConfigWriter, a callback: this module is imported by a run only (it loads TensorFlow).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from trainer.callbacks import Callback

log = logging.getLogger("trainer")

# Changing these is how a run is continued (docs: "raise trainer.max_steps to continue it"), or changes only what
# the terminal shows (progress_bar's default became null, auto, so every earlier run's record has true): said,
# not warned.
_CONTINUATION_KEYS = {"trainer.max_steps", "trainer.epochs", "trainer.progress_bar", "trainer.verbose"}


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(node, dict):
        out: Dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def config_changes(before, after) -> List[Tuple[str, Any, Any]]:
    """(key, old value, new value) for each key whose value differs (interpolations compared as written)."""
    old = _flat(OmegaConf.to_container(before, resolve=False))
    new = _flat(OmegaConf.to_container(after, resolve=False))
    missing = object()
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)]


_UNREADABLE = object()  # an old config.yaml that cannot be parsed (_old_config)


def _history_path(folder: Path, step: int, kind: str = "") -> Path:
    path, n = folder / "history" / f"config.{kind}until-step-{step}.yaml", 1
    while path.exists():  # resumed from the same step with another change before
        n += 1
        path = folder / "history" / f"config.{kind}until-step-{step}.{n}.yaml"
    return path


def record_config(folder: Path, cfg, step: int) -> None:
    """Writes `cfg` to `folder/config.yaml`. When a resume at `step` changes it, the old file moves under
    `folder/history/` and the changes are logged (a warning unless only the run's length changed). The new
    file is written first, so a full disk leaves the folder's record as it was."""
    path, new = folder / "config.yaml", folder / "config.yaml.new"
    old = _old_config(path) if step > 0 and path.exists() else None
    changes = config_changes(old, cfg) if old is not None and old is not _UNREADABLE else []
    folder.mkdir(parents=True, exist_ok=True)
    try:
        OmegaConf.save(cfg, new)
        if changes or old is _UNREADABLE:
            kept = _history_path(folder, step, "unreadable-" if old is _UNREADABLE else "")
            kept.parent.mkdir(parents=True, exist_ok=True)
            path.replace(kept)
            if changes:
                _say(changes, step, kept)
            else:
                log.warning("The unreadable config record is kept as %s; %s holds this resume's config.", kept, path)
        new.replace(path)
    finally:
        new.unlink(missing_ok=True)  # a failure above (a full disk, no history/ folder): the old record stays


def _old_config(path: Path):
    """The config `path` holds, or _UNREADABLE (said) when it cannot be parsed or read."""
    import yaml

    try:
        return OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        log.warning("%s cannot be read (%s): the config changes of this resume cannot be listed.", path,
                    (str(e).strip().splitlines() or [""])[0][:200])
        return _UNREADABLE


def _say(changes, step: int, kept: Path) -> None:
    said = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, a, b in changes)
    precision = [b for k, _, b in changes if k == "precision.policy"]
    note = (f" The checkpoint's weights and optimizer state are restored as saved; steps {step + 1}- "
            f"compute in {precision[0]}." if precision else "")
    level = logging.INFO if {k for k, _, _ in changes} <= _CONTINUATION_KEYS else logging.WARNING
    log.log(level, "Resuming at step %d with a changed config: %s.%s The config of steps 1-%d is kept in %s.",
            step, said, note, step, kept)


def _show(value: Any) -> str:
    return "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def started_otherwise(run_dir: Path, choices: Dict[str, Any], found: str = "",
                      warm_start: bool = False) -> Optional[str]:
    """Why a run folder's checkpoints cannot fit this command, in the CLI's words, when the folder's recorded
    config (.hydra/hydra.yaml's choices) ran another recipe or model than `choices` (this command's): the cause a
    checkpoint check names as the Trainer's (its models, frozen=) is the command line's. `found`: the check's
    shapes that differ; `warm_start`: trainer.init_from can start from the run's weights. None: neither changed,
    or nothing is recorded."""
    import yaml

    try:
        recorded = OmegaConf.load(Path(run_dir) / ".hydra" / "hydra.yaml").hydra.runtime.choices
    except (OSError, yaml.YAMLError, AttributeError, KeyError):
        return None
    changed = [g for g in ("recipe", "model") if recorded.get(g) is not None and recorded.get(g) != choices.get(g)]
    if not changed:
        return None

    def named(picks) -> str:
        return " ".join(f"{g}={picks.get(g)}" for g in ("recipe", "model"))
    warm = (f"; to start from that run's weights, give this run a folder of its own and trainer.init_from={run_dir} "
            "(a warm start: weights only)" if warm_start else "")
    return (f"The run folder {run_dir} holds a run of {named(recorded)} (its .hydra/hydra.yaml), and this command "
            f"runs {named(choices)}: its checkpoints hold another model{f' ({found})' if found else ''}, and a run "
            f"folder resumes only the run it holds. Fix: give this run a folder of its own (another "
            f"hydra.run.dir=..., or leave hydra.run.dir out for a new dated one), or resume that run with "
            f"{' '.join(f'{g}={recorded.get(g)}' for g in changed)}{warm}.")


class RunConfigWriter(Callback):
    """Writes .hydra/{config,hydra,overrides}.yaml once training begins (a resume: once it has trained a
    loop, so a run already complete keeps the record of the config it ran with), i.e. after the checkpoints were
    found to fit (conf/config.yaml turns Hydra's own early write off): a refused resume must leave the
    run's record of its config as it was (export rebuilds the model from it). `hydra_cfg`: the hydra node,
    as Hydra writes it (HydraConfig.instance().cfg)."""

    chief_only = True

    def __init__(self, cfg, run_dir: Path, hydra_cfg):
        self.cfg, self.folder, self.hydra_cfg = cfg, run_dir / ".hydra", hydra_cfg
        self.start: Optional[int] = None  # the step training began at, until the config is recorded

    def on_train_begin(self, trainer) -> None:
        self.start = int(trainer.step.numpy())
        if self.start == 0:  # a fresh run: recorded at once; a resume once it trains (a finished run keeps its record)
            self._record()

    def on_loop_end(self, trainer, step: int) -> None:
        if self.start is not None:
            self._record()

    def _record(self) -> None:
        record_config(self.folder, self.cfg, self.start)  # after the resume: keeps the config it replaces
        OmegaConf.save(self.hydra_cfg, self.folder / "hydra.yaml")
        OmegaConf.save(self.hydra_cfg.hydra.overrides.task, self.folder / "overrides.yaml")
        self.start = None
