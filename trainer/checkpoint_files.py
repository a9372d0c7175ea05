"""The files of a run's checkpoints/ folder: which checkpoints it holds (by their index files, not trusting
TensorFlow's `checkpoint` state file), which were cut short, and that state file, rewritten when TF cannot
read it or when trainer.resume_from sets later checkpoints aside."""
from __future__ import annotations

import logging
import os
import re
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
