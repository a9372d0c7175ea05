"""trainer.resume_from: continue a run from a checkpoint the user names (ckpt-N, best, best/ckpt-N, a path)
instead of the newest one.

What the run did after that checkpoint is moved, never deleted, into `checkpoints/set-aside-after-N/`:
the later `ckpt-M` files, the `best/` copies of later steps (with the `best.json` they were ranked in) and the
rows of `metrics.jsonl` and `metrics.csv` after step N. So the run folder reads as if the run had been stopped
at N and resumed, and so does training from there: the same weights, to the bit, under
trainer.deterministic (tests/test_checkpoint.py).

A rewind is done once: `checkpoints/resumed_from.json` records the checkpoint it went back to, and a start
whose trainer.resume_from names that same checkpoint (the same command run again, after a SIGTERM say)
resumes from the newest checkpoint, as every resume does, with a warning; a start without resume_from
forgets the record.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

from trainer.checkpoint import CheckpointError
from trainer.checkpoint_files import list_checkpoints, read_best_index, write_state_file

log = logging.getLogger("trainer.core")

RECORD = "resumed_from.json"
JOURNAL = "set-aside.json"  # a rewind under way: removed once set aside, saved and recorded
LOG_FILES = ("metrics.jsonl", "metrics.csv")  # the default loggers' files in the run folder


def available(directory: Path) -> List[str]:
    """What trainer.resume_from can name in `directory` (a run's checkpoints/), newest first."""
    names = [Path(prefix).name for _, prefix in list_checkpoints(directory)]
    best = _best_prefixes(directory)
    if best:
        names.append(f"best (step {_step_of(best[0])})")
    names += [f"best/{Path(p).name}" for p in best if Path(p).name not in names]
    return names


def _best_prefixes(directory: Path) -> List[str]:
    """The best/ copies in the order best.json ranks them (those whose files exist)."""
    index = Path(directory) / "best" / "best.json"
    try:
        ranked = json.loads(index.read_text()) if index.exists() else []
    except (OSError, ValueError):
        ranked = []
    prefixes = [str(Path(directory) / "best" / f"ckpt-{e['step']}") for e in ranked
                if isinstance(e, dict) and "step" in e]
    return [p for p in prefixes if Path(p + ".index").exists()]


def _step_of(prefix) -> Optional[int]:
    m = re.fullmatch(r"ckpt-(\d+)", Path(prefix).name)
    return int(m.group(1)) if m else None


def resolve(directory: Path, value: str) -> str:
    """The checkpoint prefix trainer.resume_from=`value` names; a CheckpointError listing what there is."""
    directory, text = Path(directory), str(value)
    if text.isdigit():  # trainer.resume_from=20 (Hydra reads a number): ckpt-20
        text = f"ckpt-{text}"
    if text == "best":
        best = _best_prefixes(directory)
        if best:
            return best[0]
    elif m := re.fullmatch(r"(best/)?ckpt-(\d+)", text):
        regular, copy = directory / f"ckpt-{m.group(2)}", directory / "best" / f"ckpt-{m.group(2)}"
        for prefix in ((copy,) if m.group(1) else (regular, copy)):  # ckpt-N kept only as a best copy: that one
            if Path(f"{prefix}.index").exists():
                return str(prefix)
    else:
        path = Path(text[: -len(".index")] if text.endswith(".index") else text).expanduser()
        if Path(f"{path}.index").exists():
            return str(path)
        if path.is_dir():
            found = list_checkpoints(path if path.name == "checkpoints" or not (path / "checkpoints").is_dir()
                                     else path / "checkpoints")
            example = found[0][1] if found else f"{path}/checkpoints/ckpt-N"
            raise CheckpointError(f"trainer.resume_from={text} is a folder; it takes one checkpoint. Fix: name one, "
                                  f"e.g. trainer.resume_from={example}.")
    there = available(directory)
    raise CheckpointError(f"trainer.resume_from={text} is not a checkpoint of {directory}. Fix: one of "
                          f"{', '.join(there) if there else 'none: the run has no checkpoint yet'}, or the path of a "
                          "checkpoint (.../ckpt-N).")


def applied_before(directory: Path, value: str) -> Optional[dict]:
    """The record of an earlier start that went back to the checkpoint `value` names now (then: resume from
    the newest). Compared on the checkpoint, not the spelling: 20, ckpt-20 and its path are one; `best`
    after a new best is another. A name that no longer resolves (rotated out since) matches by its spelling."""
    try:
        record = json.loads((Path(directory) / RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if "prefix" not in record:  # a record from before it held the checkpoint
        return record if record.get("resume_from") == str(value) else None
    try:
        prefix = resolve(directory, value)
    except CheckpointError:
        return record if record.get("resume_from") == str(value) else None
    same = (record.get("step") == _step_of(prefix)
            and _origin(directory, record.get("prefix")) == _origin(directory, prefix))
    return record if same else None


def _origin(directory: Path, prefix) -> Optional[str]:
    """Where a checkpoint comes from: this run's checkpoints/ or best/ (either copy of a step holds that
    step's state) or elsewhere, a set-aside folder included (its path)."""
    here, path = Path(directory).resolve(), Path(prefix).resolve()
    return "here" if path.parent in (here, here / "best") else str(path)


def remember(directory: Path, value: str, prefix: str, step: int, folder: Optional[Path]) -> None:
    path = Path(directory) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)  # a run folder started from another run's checkpoint
    path.with_suffix(".tmp").write_text(json.dumps({"resume_from": str(value), "prefix": str(prefix), "step": step,
                                                     "set_aside": str(folder) if folder else None}))
    os.replace(path.with_suffix(".tmp"), path)


def forget(directory: Path) -> None:
    """A start without trainer.resume_from: a later start with one rewinds again."""
    (Path(directory) / RECORD).unlink(missing_ok=True)


def is_own_regular(run_dir: Path, prefix: str) -> bool:
    """Whether `prefix` is this run folder's own checkpoints/ckpt-N (else: a best/ copy or another run's)."""
    return Path(prefix).parent.resolve() == (Path(run_dir) / "checkpoints").resolve() and _step_of(prefix) is not None


def set_aside(run_dir: Path, step: int, own: bool = True,
              journal: Optional[dict] = None) -> Tuple[Optional[Path], List[str]]:
    """Moves what the run wrote after `step` into checkpoints/set-aside-after-<step>/ (a new folder each
    time: -2, -3, ...): later ckpt-M files, later best/ copies, later log rows. Not `own` (the restored
    checkpoint is not this folder's checkpoints/ckpt-<step>): a regular ckpt-<step> goes too, as the caller
    saves the restored state there (so "resume from the newest" lands on it). Returns (the folder, or None
    when there was nothing to move; what was moved).

    Crash-safe: `journal` (what to record in checkpoints/set-aside.json, written first; its folder reused when
    an unfinished one is there) lets the next start finish the job (unfinished(), done()); the state file
    and best.json stop naming a checkpoint before it moves, so TF's manager never counts (and deletes
    older real ones for) a moved one; each file moves with os.replace (same folder tree, so atomic)."""
    directory = Path(run_dir) / "checkpoints"
    earlier = unfinished(directory)
    folder = Path(earlier["folder"]) if earlier and earlier.get("step") == step else _new_folder(directory, step)
    first = step + 1 if own else step  # the first regular step set aside
    _write(directory / JOURNAL, json.dumps({**(journal or {}), "step": step, "own": own, "folder": str(folder)}))
    moved: List[str] = []
    if any(later >= first for later, _ in list_checkpoints(directory)):
        write_state_file(directory, before=first)  # the manager must not list (or delete) what moves
    for later, prefix in list_checkpoints(directory):
        if later >= first:
            _move_checkpoint(Path(prefix), folder)
            moved.append(Path(prefix).name)
    for later in sorted({s for p in directory.glob("ckpt-*.data-*")
                         if (s := _step_of(p.name.split(".")[0])) is not None and s >= first}):
        _move_checkpoint(directory / f"ckpt-{later}", folder)  # data files left by an earlier, cut-short set-aside
    moved += _set_aside_best(directory / "best", step, folder / "best")
    for name in LOG_FILES:
        rows = _set_aside_rows(Path(run_dir) / name, step, folder / name)
        if rows:
            moved.append(f"{rows} rows of {name}")
    return (folder if folder.exists() else None), moved


def unfinished(directory: Path) -> Optional[dict]:
    """The journal of a rewind a crash cut short (set aside, saved and recorded only in part), or None."""
    try:
        journal = json.loads((Path(directory) / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    return journal if isinstance(journal, dict) and isinstance(journal.get("step"), int) else None


def done(directory: Path) -> None:
    """The rewind is complete (set aside, saved, recorded): its journal goes."""
    (Path(directory) / JOURNAL).unlink(missing_ok=True)


def _new_folder(directory: Path, step: int) -> Path:
    folder, n = directory / f"set-aside-after-{step}", 1
    while folder.exists():
        n += 1
        folder = directory / f"set-aside-after-{step}-{n}"
    return folder


def _move_checkpoint(prefix: Path, folder: Path) -> None:
    """The .index first: from then on the checkpoint is no longer listed (a data file left is skipped)."""
    folder.mkdir(parents=True, exist_ok=True)
    index = Path(f"{prefix}.index")
    if index.exists():
        os.replace(index, folder / index.name)
    for data in sorted(prefix.parent.glob(f"{prefix.name}.data-*")):
        os.replace(data, folder / data.name)


def _set_aside_best(best: Path, step: int, folder: Path) -> List[str]:
    later = [(s, p) for s, p in list_checkpoints(best) if s > step]
    if not later:
        return []
    index = best / "best.json"
    if index.exists():
        folder.mkdir(parents=True, exist_ok=True)
        # the ranking as it was, beside the copies (once: a finished job keeps it)
        if not (folder / "best.json").exists():
            _write(folder / "best.json", index.read_text())
        kept = [e for e in read_best_index(best, None) if e["step"] <= step]  # a damaged one rebuilt, said
        index.with_suffix(".tmp").write_text(json.dumps(kept, indent=1))
        os.replace(index.with_suffix(".tmp"), index)
    for _, prefix in later:
        _move_checkpoint(Path(prefix), folder)
    return [f"best/{Path(p).name}" for _, p in later]


def _set_aside_rows(path: Path, step: int, target: Path) -> int:
    """Moves the rows of a metrics.jsonl or metrics.csv after `step` into `target`; the count moved. The
    rows set aside are written before the file is rewritten (atomically) without them."""
    if not path.exists():
        return 0
    with path.open(newline="") as f:
        text = f.read()
    if path.suffix == ".csv":
        header, *rows = list(csv.reader(io.StringIO(text))) or [[]]
        if "step" not in header:
            return 0
        after = [len(r) > header.index("step") and (_int(r[header.index("step")]) or 0) > step for r in rows]
        lines = [_csv_text([r]) for r in rows]
        head = _csv_text([header])
    else:
        head, lines = "", text.splitlines(keepends=True)
        after = [(_int(_json_step(line)) or 0) > step for line in lines]
    if not any(after):
        return 0
    _write(target, head + "".join(line for line, later in zip(lines, after) if later))
    _write(path, head + "".join(line for line, later in zip(lines, after) if not later))
    return sum(after)


def _json_step(line: str):
    try:
        return json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None


def _int(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _csv_text(rows) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".tmp").open("w", newline="") as f:  # the csv module's line ends, as written
        f.write(text)
    os.replace(path.with_name(path.name + ".tmp"), path)
