"""Writes the run folder's disk refuses: full, over a quota, over a file size limit, read-only, or not permitted.
As Python (OSError with its errno) or TensorFlow (an OpError of a file op such as SaveV2, by its text: TF names a full
disk ResourceExhausted, a file size limit OutOfRange, a refused write PermissionDenied) reports them. Each is the
user's to fix, said in one line: never a traceback."""
from __future__ import annotations

import errno
from typing import Optional, Tuple

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

