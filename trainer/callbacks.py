"""Callbacks: the small hook interface the loop calls, and the built-in ones that use it.

A callback overrides any of: on_train_begin(trainer), on_loop_end(trainer, step) after each loop of
`steps_per_loop` steps, on_log(trainer, step, logs) with train logs every `log_every` steps,
on_eval_end(trainer, step, logs), on_train_end(trainer, summary); on_train_end also runs when fit()
ends early, with `summary["interrupted"]` (a signal) or `summary["failed"]` (an error) set. Set
`trainer.stop_training = True` to stop after the current loop.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Dict, List

log = logging.getLogger(__name__)


class Callback:
    def on_train_begin(self, trainer) -> None: ...

    def on_loop_end(self, trainer, step: int) -> None: ...

    def on_log(self, trainer, step: int, logs: Dict) -> None: ...

    def on_eval_end(self, trainer, step: int, logs: Dict) -> None: ...

    def on_train_end(self, trainer, summary: Dict) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: List[Callback]):
        self.callbacks = list(callbacks)

    def _call(self, name, *args):
        for cb in self.callbacks:
            getattr(cb, name)(*args)

    def on_train_begin(self, trainer):
        self._call("on_train_begin", trainer)

    def on_loop_end(self, trainer, step):
        self._call("on_loop_end", trainer, step)

    def on_log(self, trainer, step, logs):
        self._call("on_log", trainer, step, logs)

    def on_eval_end(self, trainer, step, logs):
        self._call("on_eval_end", trainer, step, logs)

    def on_train_end(self, trainer, summary):
        self._call("on_train_end", trainer, summary)


def _scalars(logs: Dict) -> Dict[str, float]:
    return {k: v for k, v in logs.items() if k not in ("step", "split") and isinstance(v, (int, float))}


class ProgressBar(Callback):
    """tqdm bar over training steps (loss and examples/s in the postfix)."""

    def on_train_begin(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.total, initial=int(trainer.step.numpy()), desc="train", unit="step", dynamic_ncols=True)
        self.last = int(trainer.step.numpy())

    def on_loop_end(self, trainer, step):
        self.bar.update(step - self.last)
        self.last = step

    def on_log(self, trainer, step, logs):
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", ex_per_s=f"{logs['examples_per_sec']:.0f}")

    def on_eval_end(self, trainer, step, logs):
        self.bar.write(
            f"eval @ step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in _scalars(logs).items())
        )

    def on_train_end(self, trainer, summary):
        self.bar.close()


class MetricsWriter(Callback):
    """Appends one JSON object per log/eval event to run_dir/metrics.jsonl."""

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

    def __init__(self, logdir: Path):
        self.logdir = Path(logdir)
        self.writers = {}

    def _write(self, split, step, logs):
        import tensorflow as tf

        if split not in self.writers:
            self.writers[split] = tf.summary.create_file_writer(str(self.logdir / split))
        with self.writers[split].as_default():
            for name, value in _scalars(logs).items():
                tf.summary.scalar(name, value, step=step)
        self.writers[split].flush()

    def on_log(self, trainer, step, logs):
        self._write("train", step, logs)

    def on_eval_end(self, trainer, step, logs):
        self._write("eval", step, logs)

    def on_train_end(self, trainer, summary):
        for w in self.writers.values():
            w.close()


class Summary(Callback):
    """Logs a short summary at the end: final eval metrics, time, throughput, the run folder."""

    def on_train_begin(self, trainer):
        self.start = time.perf_counter()
        self.start_step = int(trainer.step.numpy())
        self.examples_per_sec = []

    def on_log(self, trainer, step, logs):
        if math.isfinite(logs.get("examples_per_sec", math.nan)):
            self.examples_per_sec.append(logs["examples_per_sec"])

    def on_train_end(self, trainer, summary):
        seconds = time.perf_counter() - self.start
        steps = summary.get("step", 0) - self.start_step
        evals = {k[5:]: v for k, v in summary.items() if k.startswith("eval_")}
        if summary.get("failed"):
            log.info("Stopped by an error at step %s, after %d steps in %.1fs.", summary.get("step"), steps, seconds)
            return
        ended = "Interrupted" if summary.get("interrupted") else "Done"
        lines = [f"{ended}: {steps} steps in {seconds:.1f}s (to step {summary.get('step')})."]
        if evals:
            lines.append("Final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
        if self.examples_per_sec:
            ordered = sorted(self.examples_per_sec)
            lines.append(f"Throughput: {ordered[len(ordered) // 2]:.0f} examples/s (median of log windows)")
        if summary.get("traces"):
            lines.append(f"Traced: {summary['traces']} (first loop incl. compile: {summary.get('first_loop_seconds', 0):.2f}s)")
            retraced = {k: v for k, v in summary["traces"].items() if v > 1}
            if retraced:
                log.warning(
                    "Step functions were traced more than once %s: each trace (and XLA compile) costs time. "
                    "Usual causes: batches of changing shape (pad or bucket them), or resets after freezing layers.",
                    retraced,
                )
        if summary.get("weights_sha256"):
            lines.append(f"Weights fingerprint: {summary['weights_sha256']}")
        if trainer.run_dir is not None:
            lines.append(f"Run folder: {trainer.run_dir}")
        log.info("\n  ".join(lines))


def default_callbacks(trainer) -> List[Callback]:
    """The built-ins: progress bar, metrics.jsonl, TensorBoard (chief only), and the end summary."""
    cbs: List[Callback] = []
    if trainer.config.progress_bar:
        cbs.append(ProgressBar())
    if trainer.run_dir is not None and trainer.is_chief:
        cbs.append(MetricsWriter(trainer.run_dir / "metrics.jsonl"))
        if trainer.config.tensorboard:
            cbs.append(TensorBoardWriter(trainer.run_dir / "tensorboard"))
    cbs.append(Summary())
    return cbs
