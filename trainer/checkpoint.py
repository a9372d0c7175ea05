"""Checkpoints that never lose work: save, keep-N and best-k, resume with fallback (warm starts: load_weights.py).

Layout of run_dir/checkpoints/: `ckpt-<step>.index` / `.data-*` (tf.train.Checkpoint via
CheckpointManager, which writes the files before it updates the `checkpoint` state file and deletes old
ones only after a newer one is complete), and `best/` with the best `keep_best` by an eval metric.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf

from trainer.checkpoint_files import (incomplete_checkpoints, list_checkpoints, read_best_index, remove_leftovers,
                                      repair_state_file)
from trainer.checkpoint_graph import as_saved, match_variables, nested_by
from trainer.config import ConfigError
from trainer.errors import UserError
from trainer.storage_errors import refused_write_is_error
from trainer.evalsets import close_hint

log = logging.getLogger(__name__)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used; the message says why and what to do."""


def _check_layout(objects: Dict, prefix: str) -> None:
    """One trained model saves as `model/`, several as `models/<name>/`: a switch means Trainer(frozen=...) changed
    (or the models), which the per-variable check below would blame on a changed config."""
    expected = "models" if "models" in objects else "model"
    if expected not in objects:
        return
    _, _, saved = match_variables(objects[expected], prefix, expected)  # by object path: a key may name another
    held = {root for root in ("model", "models") if any(p.startswith(f"{root}/") for p in saved)}
    if held and expected not in held:
        names = sorted({p.split("/")[1] for p in saved if p.startswith("models/")})
        saved = (f"several trained models ({names}, as models/<name>)" if held == {"models"}
                 else "one trained model (model/)")
        now = (f"several ({sorted(objects['models'])})" if expected == "models" else "one (model/)")
        raise CheckpointError(
            f"{prefix} holds {saved}, and this Trainer trains {now}: Trainer(frozen=...) (or its models) changed "
            "since the run started, a frozen model being in no checkpoint. Fix: keep frozen= as the run started, or "
            "start a new run folder (hydra.run.dir=...) and load each model from this run with "
            "init_from={name: PATH}.")


def _check_compatible(objects: Dict, prefix: str) -> None:
    """A changed model or optimizer must be a clear error, not a partial restore or a 'corrupt file'."""
    _check_layout(objects, prefix)
    optimizer = "the optimizer (its type, or options that add state such as amsgrad, momentum or optimizer.use_ema)"
    for name, what in (("model", "the model"), ("optimizer", optimizer), ("models", "the models"),
                       ("optimizers", optimizer)):
        if name not in objects:
            continue
        reader, rows, saved = match_variables(objects[name], prefix, name)
        problems = [
            f"{path}: checkpoint {shape} vs now {list(var.shape)}" if key else f"not in checkpoint: {path}"
            for path, var, key, shape in rows
            if key is None or list(shape) != list(var.shape)
        ]
        fix = ("run with the config the run was started with (see .hydra/config.yaml), or start a new run folder "
               "(hydra.run.dir=...) and use trainer.init_from=PATH to warm start (weights only)")
        if problems and all(p.endswith("/_learning_rate") for p in problems):
            what = ("the learning rate from a schedule to a constant (a constant rate is a variable of the "
                    "checkpoint, a schedule is not): keep optimizer.schedule as it was")
        cause = f"The config changed {what} since this run saved it."
        if problems and name in ("model", "models") and _regrouped(rows, saved, reader, name):
            cause, fix = _regrouped_cause(nested_by(objects[name]))
        if problems:
            raise CheckpointError(f"{prefix} does not fit this {name} ({'; '.join(problems[:6])}). {cause} Fix: {fix}.")


def _regrouped_cause(settings: List[str]):
    """(the cause, the fix) for a checkpoint of the same weights under other object paths: the setting that nests
    the model's layers (say_nested_by: the ResNet recipe's model.recompute) when the model has one, else the model's
    code. init_from reads the same layout: it cannot load these either."""
    if settings:
        return (f"Since this run saved it, the config changed how the model's layers are nested, not its weights (the "
                f"same variables, grouped otherwise: {', '.join(settings)} makes each block a nested model or not).",
                f"keep {' and '.join(settings)} (and the model) as the run was started with (see .hydra/config.yaml; "
                "from Python, the build function's argument), or start a new run folder (hydra.run.dir=...)")
    return ("The model's layers are nested otherwise than when this run saved it: the same weights, grouped otherwise "
            "(layers moved into a nested model or layer of their own, or out of one).",
            "build the model with its layers grouped as when the run started, or start a new run folder "
            "(hydra.run.dir=...; from Python: Trainer(run_dir=...))")


def _regrouped(rows, saved: Dict[str, str], reader, name: str) -> bool:
    """The checkpoint holds the same weights (the same shapes, as many) under other object paths: the
    layers were nested otherwise (a model.recompute switch on the ResNet recipe, say), not changed."""
    shapes = reader.get_variable_to_shape_map()
    held = sorted(tuple(shapes[key]) for path, key in saved.items() if path.startswith(f"{name}/") and key in shapes)
    return bool(held) and held == sorted(tuple(var.shape) for _, var, _, _ in rows)


def _refused_write(folder: Path, what: str, last_complete):
    """storage_errors.refused_write_is_error, raising a CheckpointError (the same command resumes once fixed)."""
    return refused_write_is_error(folder, what, last_complete, CheckpointError)


def non_finite_weights(model) -> List[str]:
    """The paths of the model's weights that hold an inf or NaN."""
    return [w.path for w in model.weights if not np.isfinite(keras.ops.convert_to_numpy(w)).all()]


# The best metric's value before any evaluation: the worst finite float32 for its mode.
NO_BEST = {"max": -3.4028235e38, "min": 3.4028235e38}


class Checkpointer:
    """Saves and restores the trainer's state in `directory`.

    Args:
      objects: name -> trackable (model, optimizer, step, loss_scale, rng, ...).
      keep: how many recent checkpoints to keep.
      keep_best, best_metric, best_mode: keep the best `keep_best` by eval `best_metric` (max/min).
      is_chief: non-chief workers (multi-worker) write to a temporary folder that is removed.
      extra: name -> trackable saved with every checkpoint but restored leniently (the callbacks' state, the state a
        Trainer subclass holds: a checkpoint without it, from an older run or before it was added, still resumes).
      reports: name -> function(prefix, the keys the checkpoint holds under that name) that says what a restore
        lacked (or found that nothing now takes), in place of the one INFO line for a checkpoint without any of it;
        called also for a name that is not (or no longer) in `extra`.
    """

    def __init__(
        self,
        directory: Path,
        objects: Dict,
        keep: int = 3,
        keep_best: int = 1,
        best_metric: Optional[str] = None,
        best_mode: str = "max",
        is_chief: bool = True,
        extra: Optional[Dict] = None,
        reports: Optional[Dict[str, Callable[[str, List[str]], None]]] = None,
    ):
        if best_mode not in ("max", "min"):
            raise ConfigError(f"trainer.best_mode={best_mode!r} is not one of max|min")
        self.directory = Path(directory)
        self.objects = objects
        self.extra, self.reports = dict(extra or {}), dict(reports or {})
        self._restorable = tf.train.Checkpoint(**objects)
        self.checkpoint = tf.train.Checkpoint(**objects, **self.extra) if self.extra else self._restorable
        self.is_chief = is_chief
        self.keep = keep
        self.keep_best = keep_best
        self.best_metric = best_metric
        # said when no eval result is best_metric; its user's form is set by callbacks/checkpointing.py
        self.best_metric_fix = ("trainer.best_metric=<one of them> (Trainer(best_metric=...) from Python; a metric's "
                                "name is its `name=`)")
        self.best_mode = best_mode
        self._manager = None
        self._warned_no_best = False

    def set_extra(self, name: str, trackable) -> None:
        """Saves `trackable` as `name` from the next save on (None: no longer), restored leniently (see `extra`)."""
        self.extra.pop(name, None)
        if trackable is not None:
            self.extra[name] = trackable
        self.checkpoint = tf.train.Checkpoint(**self.objects, **self.extra) if self.extra else self._restorable
        self._manager = None  # made again over the new checkpoint object (it reads the folder's state file)

    def set_report(self, name: str, report: Callable[[str, List[str]], None]) -> None:
        """`report` says, after a restore, what the checkpoint's `name` state lacked (see `reports`)."""
        self.reports[name] = report

    def saved_objects(self) -> Dict:
        """What every checkpoint holds from the next save on: the objects and the extra state."""
        return {**self.objects, **self.extra}

    # -- saving ------------------------------------------------------------------------------

    def _write_dir(self) -> Path:
        return self.directory if self.is_chief else Path(tempfile.mkdtemp(prefix="trainer-worker-ckpt-"))

    def manager(self, directory: Path) -> tf.train.CheckpointManager:
        if self._manager is None or Path(self._manager.directory) != directory:
            repair_state_file(directory)
            self._manager = tf.train.CheckpointManager(self.checkpoint, str(directory), max_to_keep=self.keep)
        return self._manager

    def weights_finite(self) -> bool:
        models = self.objects["models"].values() if "models" in self.objects else [self.objects["model"]]
        return not any(non_finite_weights(model) for model in models)

    def save(self, step: int) -> Optional[str]:
        """Saves the full state at `step`. Refuses (and says so) when the weights are not finite."""
        if not self.weights_finite():
            log.error("Not saving step %d: the model has non-finite weights. The last good checkpoint is kept.", step)
            return None
        directory = self._write_dir()
        with _refused_write(directory, f"saving step {step}", self._last_complete):
            directory.mkdir(parents=True, exist_ok=True)
            path = self.manager(directory).save(checkpoint_number=step)
        if not self.is_chief:
            shutil.rmtree(directory, ignore_errors=True)
            return None
        log.info("Saved checkpoint %s", path)
        return path

    def _last_complete(self) -> Optional[int]:
        found = list_checkpoints(self.directory)
        return found[0][0] if found else None

    def update_best(self, step: int, eval_logs: Dict, before_write: Optional[Callable[[], None]] = None) -> bool:
        """After an evaluation: records the best value, and keeps a copy in best/ when it is in the top k
        (`before_write` is called first: a check that may refuse it)."""
        if self.best_metric and self.best_metric not in eval_logs and not self._warned_no_best:
            self._warned_no_best = True
            names = sorted(k for k in eval_logs if k not in ("step", "split"))
            log.warning("trainer.best_metric=%r is not among the eval results %s%s: no best checkpoint is tracked. "
                        "Fix: %s.", self.best_metric, names, close_hint(self.best_metric, names), self.best_metric_fix)
        if not self.best_metric or self.best_metric not in eval_logs or not self.weights_finite():
            return False
        value = float(eval_logs[self.best_metric])
        if not math.isfinite(value):
            return False
        best = float(self.objects["best_metric"].numpy())
        if math.isnan(best) or (value > best if self.best_mode == "max" else value < best):  # NaN: older runs
            self.objects["best_metric"].assign(value)
        if self.keep_best <= 0:
            return False
        directory = self._write_dir()
        with _refused_write(directory / "best", f"saving the best checkpoint of step {step}",
                                                self._last_complete):
            kept = self._keep_best(directory, step, value, before_write)
        if not self.is_chief:
            shutil.rmtree(directory, ignore_errors=True)
        return kept

    def _keep_best(self, directory: Path, step: int, value: float, before_write) -> bool:
        best_dir = directory / "best"
        best_dir.mkdir(parents=True, exist_ok=True)
        index_path = best_dir / "best.json"
        entries = [e for e in read_best_index(best_dir, self.best_metric) if e["step"] != step]
        candidate = {"step": step, self.best_metric: value, "path": str(best_dir / f"ckpt-{step}")}
        worst = NO_BEST[self.best_mode]  # a copy ranked by another metric (a resume that changed it) goes first
        ranked = sorted(entries + [candidate], key=lambda e: e.get(self.best_metric, worst),
                        reverse=self.best_mode == "max")
        kept, dropped = ranked[: self.keep_best], ranked[self.keep_best :]
        if candidate in kept:
            if before_write is not None:
                before_write()
            self.checkpoint.write(candidate["path"])  # complete before the index names it
        tmp = index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept, indent=1))
        os.replace(tmp, index_path)
        for e in dropped:
            if e is candidate:
                continue
            for f in best_dir.glob(f"ckpt-{e['step']}.*"):
                f.unlink()
        return candidate in kept

    # -- restoring ---------------------------------------------------------------------------

    def prepare(self, resume: bool) -> Optional[int]:
        """Resumes from the newest complete checkpoint (returns its step), or starts fresh (None: the caller
        may warm start, trainer/load_weights.py).

        Raises CheckpointError when the folder has checkpoints but resume is off, when none of them
        is readable, or when they do not fit the model.
        """
        if self.is_chief and resume:
            remove_leftovers(self.directory)
        found = list_checkpoints(self.directory)
        incomplete = incomplete_checkpoints(self.directory)
        if found and not resume:
            raise CheckpointError(
                f"{self.directory} already has checkpoints (newest: step {found[0][0]}) and "
                "trainer.resume=false: refusing to overwrite them. To continue that run, drop "
                "trainer.resume=false; to start fresh, pick a new run folder (hydra.run.dir=...) or "
                "move that folder away."
            )
        if resume and (found or incomplete):
            return self.restore_latest(found, incomplete)
        return None

    def restore_latest(self, found=None, incomplete=None) -> int:
        found = found if found is not None else list_checkpoints(self.directory)
        incomplete = incomplete if incomplete is not None else incomplete_checkpoints(self.directory)
        if found and _read_as_pattern(found[0][1]):
            raise CheckpointError(
                f"{self.directory}: TensorFlow cannot read checkpoints in a folder whose path has brackets: it matches "
                "the path as a glob pattern ('[8]' matches '8', not itself). The checkpoints are intact. Fix: rename "
                "the folder to a path without '[' and ']' and resume with hydra.run.dir=<that path> (Python: "
                "run_dir=); for a sweep over a list-valued key (model.hidden_units=[8],[16,8]), number its job "
                "folders: 'hydra.sweep.subdir=${hydra.job.num}'.")
        errors = []
        for step, prefix in incomplete:
            if not found or step > found[0][0]:  # an older one is shadowed by a newer complete one anyway
                log.warning("Checkpoint %s is unreadable (its .index file is missing); trying the previous one.",
                            prefix)
                errors.append(f"{prefix}: no .index file")
        for step, prefix in found:
            try:
                self._restore(prefix)
                self._restore_extra(prefix)  # a damaged byte in the callbacks' state: as in the model's
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                first = _readable_reason(e)
                log.warning("Checkpoint %s is unreadable (%s: %s); trying the previous one.", prefix, type(e).__name__,
                            first)
                errors.append(f"{prefix}: {first}")
                continue
            if errors:
                log.warning("Resumed from an older checkpoint (step %d) because newer ones were unreadable.", step)
            log.info("Resuming from %s (step %d)", prefix, step)
            return step
        raise CheckpointError(
            f"{self.directory} has checkpoints but none is readable: {'; '.join(errors)}. Nothing was "
            "changed. Fix: restore the files from a backup, or start a new run folder (hydra.run.dir=...)."
        )

    def restore_from(self, prefix: str, named_as: str) -> None:
        """Restores the checkpoint the user named (trainer.resume_from): no fallback to another one; a
        checkpoint that does not fit or cannot be read is a CheckpointError naming it, nothing changed."""
        try:
            self._restore(prefix)
            self._restore_extra(prefix)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - TF raises several types for an unreadable checkpoint
            raise CheckpointError(f"trainer.resume_from={named_as}: {prefix} is unreadable ({_readable_reason(e)}). "
                                  "Nothing was changed. Fix: name another checkpoint.") from None

    def _restore(self, prefix: str) -> None:
        """Restores the objects, each model as the checkpoint holds it (as_saved: inside trainer's float32-output
        wrapper or not, whichever precision the run saved it under)."""
        objects = as_saved(self.objects, prefix)
        _check_compatible(objects, prefix)
        same = all(objects[name] is self.objects[name] for name in objects)
        status = (self._restorable if same else tf.train.Checkpoint(**objects)).restore(prefix)
        status.assert_existing_objects_matched()
        status.expect_partial()  # the extra state is read by _restore_extra, on its own

    def _restore_extra(self, prefix: str) -> None:
        reader = tf.train.load_checkpoint(prefix)
        saved = reader.get_variable_to_shape_map()
        dtypes = reader.get_variable_to_dtype_map()
        for name in {**self.extra, **self.reports}:
            full = [key for key in saved if key.startswith(f"{name}/")]
            keys = [key[len(name) + 1:] for key in full]
            trackable = self.extra.get(name)
            if keys and trackable is not None:
                for key in full:  # a damaged byte fails here: a Checkpoint cut short mid-read lists, at deletion,
                    if dtypes[key] != tf.variant:  # (a data iterator's state: no NumPy value, read by the restore)
                        reader.get_tensor(key)  # every value it did not restore in a TF warning (dozens of lines)
                try:
                    tf.train.Checkpoint(**{name: trackable}).read(prefix).expect_partial()
                except tf.errors.DataLossError:  # a damaged byte in a data iterator's state (read here only)
                    raise
                except (ValueError, tf.errors.OpError) as e:  # another shape or dtype
                    raise CheckpointError(
                        f"{prefix}: its saved {name} state does not fit this Trainer's ({_readable_reason(e)}): the "
                        "code changed it since the run saved it (an attribute's shape or dtype, say). Fix: run with "
                        "the code the run was started with, or start a new run folder.") from None
            if name in self.reports:
                self.reports[name](prefix, keys)
            elif not keys:
                log.info("%s holds no saved %s state (an older run): it starts fresh", prefix, name)


def _readable_reason(error: Exception) -> str:
    """An error's first line without TensorFlow's {{function_node ...}} prefix, cut at a word (a log line)."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    first = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", first)
    return first if len(first) <= 200 else first[:200].rsplit(" ", 1)[0] + " ..."


def _read_as_pattern(prefix: str) -> bool:
    """TensorFlow's checkpoint reader finds `prefix` as a glob pattern: with brackets in its path it finds nothing
    (and a glob-escaped path matches, but is then opened literally): every checkpoint reads as unreadable."""
    return os.path.exists(prefix + ".index") and not tf.io.gfile.glob(prefix + ".index")
