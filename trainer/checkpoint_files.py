"""The files of a run's checkpoints/ folder: which checkpoints it holds (by their index files, not trusting
TensorFlow's `checkpoint` state file), which were cut short, and that state file, rewritten when TF cannot
read it or when trainer.resume_from sets later checkpoints aside."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import tensorflow as tf

log = logging.getLogger("trainer.checkpoint")  # its lines are the checkpoints' own

_CKPT = re.compile(r"^ckpt-(\d+)\.index$")
_DATA = re.compile(r"^ckpt-(\d+)\.data-\d+-of-\d+$")


def list_checkpoints(directory: Path) -> List[Tuple[int, str]]:
    """(step, prefix) of every checkpoint with an index file, newest first (does not trust the state file)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _CKPT.match(p.name)
        if m:
            found.append((int(m.group(1)), str(directory / f"ckpt-{m.group(1)}")))
    return sorted(found, reverse=True)


def incomplete_checkpoints(directory: Path) -> List[Tuple[int, str]]:
    """(step, prefix) of every checkpoint with data files but no index file (deleted, or a save cut short
    by a crash before TF wrote it), newest first: never restorable."""
    directory = Path(directory)
    indexed = {step for step, _ in list_checkpoints(directory)}
    steps = ({int(m.group(1)) for p in directory.glob("ckpt-*.data-*") if (m := _DATA.match(p.name))}
             if directory.is_dir() else set())
    return [(step, str(directory / f"ckpt-{step}")) for step in sorted(steps - indexed, reverse=True)]


def repair_state_file(directory: Path) -> None:
    """Rewrites the `checkpoint` state file from the ckpt-N.index files when TF cannot read it.

    tf.train.CheckpointManager takes its list of earlier checkpoints from that file; an unreadable one
    is read as "no checkpoints" (with a warning), so keep-N would never delete the older ones."""
    state = Path(directory) / "checkpoint"
    if not state.exists():
        return
    try:
        readable = tf.train.get_checkpoint_state(str(directory)) is not None
    except Exception:  # noqa: BLE001 - TF raises ValueError for some contents, returns None for others
        readable = False
    if readable:
        return
    found = write_state_file(directory)
    log.warning("The checkpoint state file %s was unreadable; rebuilt it from the checkpoint files (steps %s).",
                state, found)


def write_state_file(directory: Path, before: Optional[int] = None) -> List[int]:
    """Writes the `checkpoint` state file from the ckpt-N.index files (after a repair, or after
    trainer.resume_from set later checkpoints aside: only those `before` a step, written before they move);
    returns their steps, oldest first. With none left the
    file is deleted: TF reads an empty one as invalid (a ValueError on the next save)."""
    state = Path(directory) / "checkpoint"
    # oldest first, as TF
    found = sorted((s, p) for s, p in list_checkpoints(directory) if before is None or s < before)
    if not found:
        state.unlink(missing_ok=True)
        return []
    lines = [f'model_checkpoint_path: "{Path(found[-1][1]).name}"'] if found else []
    lines += [f'all_model_checkpoint_paths: "{Path(prefix).name}"' for _, prefix in found]
    # The manager only deletes checkpoints whose timestamp is after its last_preserved_timestamp (0 here).
    lines += [f"all_model_checkpoint_timestamps: {Path(prefix + '.index').stat().st_mtime}" for _, prefix in found]
    tmp = state.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, state)
    return [step for step, _ in found]


def _recorded_best(index: Path) -> Tuple[Optional[List[dict]], str]:
    """(best.json's entries, "") or (None, what is wrong with it)."""
    try:
        entries = json.loads(index.read_text()) if index.exists() else None
    except (OSError, ValueError) as e:
        return None, f"unreadable: {type(e).__name__}: {str(e)[:120] or 'empty'}"
    if entries is None:
        return None, "missing"
    if isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("step"), int) for e in entries):
        return entries, ""
    return None, "not a list of entries with a step"


def remove_leftovers(directory: Path) -> None:
    """Removes what a run killed mid-save left, and only that: TensorFlow's `ckpt-N_temp/` folders (a save writes
    there, then renames), and best/ copies best.json does not name (a kill between its update and the deletion of
    the copies it dropped, or before a new copy was named). A damaged best.json names nothing for sure: its
    copies are kept (read_best_index rebuilds it)."""
    directory, removed = Path(directory), []
    for folder in (directory, directory / "best"):
        for temp in sorted(folder.glob("ckpt-*_temp")) if folder.is_dir() else []:
            if re.fullmatch(r"ckpt-\d+_temp", temp.name) and temp.is_dir():
                shutil.rmtree(temp, ignore_errors=True)
                removed.append(f"{temp.relative_to(directory)}/")
    named, _ = _recorded_best(directory / "best" / "best.json")
    if named is not None:
        steps = {e["step"] for e in named}
        for step, prefix in list_checkpoints(directory / "best") + incomplete_checkpoints(directory / "best"):
            if step not in steps:
                for f in Path(prefix).parent.glob(f"{Path(prefix).name}.*"):
                    f.unlink(missing_ok=True)
                removed.append(f"best/ckpt-{step}.*")
    if removed:
        log.info("Removed what a run stopped during a save left in %s: %s (named by no record).", directory,
                 ", ".join(removed))


def read_best_index(best_dir: Path, metric: Optional[str]) -> List[dict]:
    """best.json's entries (best/ copies, ranked). A damaged record (truncated, empty, not a list of entries), or
    none beside copies (a kill before its first write), is rebuilt from the copies in best/ and said: a crash at the
    next evaluation would lose the steps trained since the last save, at every resume. A rebuilt copy's value is
    known only when it is the only one (its `best_metric` is the run's best then); the others rank last."""
    index = Path(best_dir) / "best.json"
    copies = list_checkpoints(best_dir)
    entries, problem = _recorded_best(index)
    if entries is not None or (not index.exists() and not copies):
        return entries or []
    rebuilt = [{"step": step, "path": prefix} for step, prefix in copies]
    known = ""
    if len(rebuilt) == 1 and metric:
        try:
            reader = tf.train.load_checkpoint(rebuilt[0]["path"])
            value = float(reader.get_tensor("best_metric/.ATTRIBUTES/VARIABLE_VALUE"))
            rebuilt[0][metric], known = value, f", {metric}={value:g} as it recorded"
        except Exception:  # noqa: BLE001 - an unreadable copy ranks last, as any copy of unknown value
            pass
    log.warning("The record of the best checkpoints %s is %s; rebuilt from the copies in %s (steps %s%s). A copy "
                "whose value is unknown ranks last: the next evaluations replace it first.", index, problem, best_dir,
                [e["step"] for e in rebuilt], known)
    return rebuilt
