"""Writers of the run folder: metrics.jsonl and TensorBoard scalars (chief only)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Dict

from trainer.callbacks.base import Callback


def scalars(logs: Dict) -> Dict[str, float]:
    return {k: v for k, v in logs.items() if k not in ("step", "split") and isinstance(v, (int, float))}


class MetricsWriter(Callback):
    """Appends one JSON object per log/eval event to run_dir/metrics.jsonl."""

    chief_only = True

    def __init__(self, path: Path):
        self.path = Path(path)

    def _write(self, logs):
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}
        record["time"] = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_log(self, trainer, step, logs):
        self._write(logs)

    def on_eval_end(self, trainer, step, logs):
        self._write(logs)


class TensorBoardWriter(Callback):
    """Scalars for everything in metrics.jsonl, under run_dir/tensorboard/{train,eval}."""

    chief_only = True

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.writers = {}

    def _write(self, split, step, logs):
        import tensorflow as tf

        if split not in self.writers:
            self.writers[split] = tf.summary.create_file_writer(str(self.logdir / split))
        with self.writers[split].as_default():
            for name, value in scalars(logs).items():
                tf.summary.scalar(name, value, step=step)
        self.writers[split].flush()

    def on_log(self, trainer, step, logs):
        self._write("train", step, logs)

    def on_eval_end(self, trainer, step, logs):
        self._write("eval", step, logs)

    def on_train_end(self, trainer, summary):
        for w in self.writers.values():
            w.close()
