"""Writes the run folder's disk refuses: full, over a quota, over a file size limit, read-only, or not permitted.
As Python (OSError with its errno) or TensorFlow (an OpError of a file op such as SaveV2, by its text: TF names a full
disk ResourceExhausted, a file size limit OutOfRange, a refused write PermissionDenied) reports them. Each is the
user's to fix, said in one line: never a traceback."""
from __future__ import annotations

import contextlib
import errno
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple, Type

# errno -> (the OS's text, in TF's messages too; what it is; the fix)
_CAUSES = {
    errno.ENOSPC: ("No space left on device", "no space left on device",
                   "free space on that disk (or move the run folder to a larger one)"),
    errno.EDQUOT: ("Disk quota exceeded", "disk quota exceeded",
                   "free space within your quota or have it raised (or move the run folder to another disk)"),
    errno.EFBIG: ("File too large", "a file grew over the file size limit (`ulimit -f`) or the file system's largest",
                  "raise the limit (`ulimit -f unlimited` in the shell that starts the run) or move the run folder"),
    errno.EROFS: ("Read-only file system", "the file system is read-only",
                  "remount it read-write, or move the run folder to a writable disk"),
    errno.EACCES: ("Permission denied", "permission denied",
                   "make it writable for this user again (`chmod u+w`; `sudo chown $USER` when another user owns "
                   "it; `chattr -i` when it was made immutable)"),
    errno.EPERM: ("Operation not permitted", "the write is not permitted",
                  "make it writable again (`chattr -i` when it was made immutable, `chmod u+w`)"),
}


def storage_failure(error: BaseException) -> Optional[Tuple[str, str]]:
    """(what happened, the fix) when `error` is a write the disk refused (see the module), else None. An
    out-of-memory is a ResourceExhaustedError too, without these texts: not one."""
    import tensorflow as tf

    if isinstance(error, OSError) and error.errno in _CAUSES:
        return _CAUSES[error.errno][1:]
    if not isinstance(error, (OSError, tf.errors.OpError)):
        return None
    text = str(error)
    return next((cause[1:] for cause in _CAUSES.values() if cause[0] in text), None)


def write_leftovers(new_entries) -> List[Path]:
    """What a refused save left among `new_entries`: TF's `ckpt-N_temp/` folders and the files of a `ckpt-N` without
    its `.index` (written last: a checkpoint with one is complete, and kept)."""
    left = []
    for entry in new_entries:
        partial = re.fullmatch(r"(ckpt-\d+)\..+", entry.name)
        if (re.fullmatch(r"ckpt-\d+_temp", entry.name) and entry.is_dir()) or (
                partial and not entry.is_dir() and not (entry.parent / f"{partial[1]}.index").exists()):
            left.append(entry)
    return left


def refused_path(error: BaseException, folder: Path) -> str:
    """The file a refused write names (OSError's filename, or a path in TF's text), else `folder`."""
    named = getattr(error, "filename", None)
    if named:
        return str(named)
    found = re.search(re.escape(str(folder)) + r"[^\s;,'\"]*", str(error))
    return found[0].rstrip(".:") if found else str(folder)


@contextlib.contextmanager
def refused_write_is_error(folder: Path, what: str, last_complete, error_type: Type[Exception]):
    """A write the disk refuses in `folder` (full, a quota, a file size limit, read-only, not permitted:
    trainer/storage_errors.py) removes what the write left there (TF's `ckpt-N_temp/`, a partial `ckpt-N.*`;
    never a complete checkpoint, such as the new one when an old one's deletion is refused) and becomes a
    `error_type` (a CheckpointError) naming the cause, the file and the last complete checkpoint
    (`last_complete()`), so the same command resumes once it is fixed."""
    import tensorflow as tf

    before = set(folder.iterdir()) if folder.is_dir() else set()
    try:
        yield
    except (OSError, tf.errors.OpError) as e:
        refused = storage_failure(e)
        if refused is None:
            raise
        with contextlib.suppress(OSError):  # a folder that refuses writes may refuse the removal too
            for leftover in write_leftovers((set(folder.iterdir()) if folder.is_dir() else set()) - before):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
        last = last_complete()
        kept = (f"the last complete checkpoint is step {last}" if last is not None
                else "there is no complete checkpoint yet")
        cause, fix = refused
        raise error_type(
            f"{cause} at {refused_path(e, folder)} while {what}; {kept}. Fix: {fix}, and run the same command "
            "again: it resumes from there."
        ) from None
