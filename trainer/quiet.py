"""Keeps TensorFlow's C++ start-up noise (CUDA probing, oneDNN notes) off the terminal by default.

Those lines are printed by C++ before Python can set any log level, so the only way to hide them is to
point file descriptor 2 elsewhere while TensorFlow loads. Set TRAINER_TF_LOGS=1 to see them.
"""
from __future__ import annotations

import os
import sys
import tempfile


def quiet_tensorflow_import() -> None:
    if "tensorflow" in sys.modules or os.environ.get("TRAINER_TF_LOGS") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # the CUDA probe prints here
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
