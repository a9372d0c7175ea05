"""A user's mistake, raised from inside the library, shown with the user's frames only.

An error of ours that names a mistake and its fix (errors.UserError: `self.metrics["acc"]` for a metric named
`accuracy`, a string in a step's logs) raised while a step is traced came after some 35 frames of the Trainer,
tf.function and autograph, none of them the user's. Keras filters its own frames out of what fit() raises; the
Trainer's fit/evaluate/predict do the same for UserError, under Keras' switch
(`keras.config.disable_traceback_filtering()` shows every frame). Any other exception keeps its whole traceback:
that is a bug to debug, ours or the user's, and TensorFlow's own "in user code" lines point into the step.
"""
from __future__ import annotations

import functools
import os
import traceback
import types

from trainer.errors import UserError

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_NOT_THE_USERS = (os.sep + "tensorflow" + os.sep, os.sep + "keras" + os.sep, os.sep + "absl" + os.sep,
                  "__autograph_generated_file", "<frozen ")


def _users(filename: str) -> bool:
    return not filename.startswith(_PACKAGE) and not any(part in filename for part in _NOT_THE_USERS)


def users_frames(tb):
    """`tb` without the library's, TensorFlow's and Keras' frames (None if none is left: the re-raise's frame and
    the user's call of the method are what a traceback then shows)."""
    kept = None
    for frame, line in reversed(list(traceback.walk_tb(tb))):
        if _users(frame.f_code.co_filename):
            kept = types.TracebackType(kept, frame, frame.f_lasti, line)
    return kept


def _filtering() -> bool:
    import keras

    return keras.config.is_traceback_filtering_enabled()


def user_errors_shown_short(method):
    """Wraps a public Trainer method: a UserError leaves it with the user's frames only (see the module)."""
    @functools.wraps(method)
    def shown_short(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except UserError as error:
            if not _filtering():
                raise
            cause = error.__cause__
            raise error.with_traceback(users_frames(error.__traceback__)) from cause
    return shown_short
