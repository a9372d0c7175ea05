"""The progress bar (or, without it, a log line per event) and the end-of-run summary."""
from __future__ import annotations

import logging
import math
import shlex
import time
from typing import Dict

from trainer import model_summary
from trainer.console import BAR_SHOWS, while_a_bar_is_shown
from trainer.callbacks.base import Callback
from trainer.callbacks.loggers import scalars
from trainer.memory import is_memory_field, memory_logs, memory_text

MADE_ANEW_OK = 2  # functions made anew in one call without a warning: fine-tuning's freeze, then unfreeze
log = logging.getLogger("trainer.callbacks")


HIDDEN = {"examples_per_sec", "grad_norm", "lr", "loss_scale", "skipped_steps",
          "xla_on_ms_per_step", "xla_off_ms_per_step", "jit_compile"}  # in metrics.jsonl, not shown


def shown(logs) -> dict:
    """The loss and metrics, or the logs an overridden train_step returned (a GAN's d_loss and g_loss)."""
    return {k: v for k, v in scalars(logs).items() if k not in HIDDEN and "/" not in k and not is_memory_field(k)}


def eval_line(step: int, logs, trainer=None) -> str:
    """`eval @ step N: loss=...`; an evaluation limited to some batches (trainer.eval_steps,
    limit_eval_batches, fast_dev_run) says how many it read: `eval @ step N (10 batches): ...`."""
    limit = trainer.eval_limit if trainer is not None else None
    limit = limit if isinstance(limit, int) else None  # several named sets: each its own limit, not said
    read = ""
    if limit is not None and trainer.eval_batches is not None:
        short = f" of the {limit} asked: the eval set ended" if trainer.eval_batches < limit else ""
        read = f" ({trainer.eval_batches} batches{short})"
    return f"eval @ step {step}{read}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars(logs).items())


def train_line(step: int, logs, trainer) -> str:
    """`step 500/1500: loss=0.4300, accuracy=0.8400 (7170 ex/s) | mem 612 MiB`."""
    values = ", ".join(f"{k}={v:.4f}" for k, v in shown(logs).items())
    speed = logs.get("examples_per_sec", math.nan)
    memory = memory_text(logs)
    return (f"step {step}/{trainer.total}: {values}" + (f" ({speed:.0f} ex/s)" if math.isfinite(speed) else "")
            + (f" | {memory}" if memory else ""))


class LogLines(Callback):
    """Without the progress bar (trainer.progress_bar=false, or left unset with stderr no terminal: a log file, a
    pipe): a line per log and eval event in the log, as
    Keras' fit(verbose=2) prints one per epoch:
    `step 500/1500: loss=0.4300, accuracy=0.8400 (7170 ex/s) | mem 612 MiB`."""

    def on_log(self, trainer, step, logs):
        log.info("%s", train_line(step, logs, trainer))

    def on_eval_end(self, trainer, step, logs):
        log.info("%s", eval_line(step, logs, trainer))


class ProgressBar(LogLines):
    """tqdm bar over training steps (the loss, or a custom step's first logs, and examples/s). The lines
    LogLines logs are logged too: the train lines to the log files only (the bar shows them), and every line
    on the terminal clears the bar and draws it again after (console.while_a_bar_is_shown)."""

    def on_train_begin(self, trainer):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=trainer.total, initial=int(trainer.step.numpy()), desc="train", unit="step",
                        dynamic_ncols=True)
        self.last = int(trainer.step.numpy())
        self.undo = while_a_bar_is_shown(type(self.bar))

    def on_loop_end(self, trainer, step):
        self.bar.update(step - self.last)
        self.last = step

    def on_log(self, trainer, step, logs):
        postfix = {k: f"{v:.4f}" for k, v in list(shown(logs).items())[:3]}
        postfix["ex_per_s"] = f"{logs.get('examples_per_sec', math.nan):.0f}"
        if "host_rss_mb" in logs:
            postfix["mem"] = f"{logs['host_rss_mb']:.0f}MiB"
        self.bar.set_postfix(postfix)
        log.info("%s", train_line(step, logs, trainer), extra={BAR_SHOWS: True})  # trainer.log's loss over time

    def on_train_end(self, trainer, summary):
        self.bar.close()
        self.undo()


class Summary(Callback):
    """Logs a short summary at the end: final eval metrics, time, throughput, peak memory, the run folder."""

    def on_train_begin(self, trainer):
        self.start = time.perf_counter()
        self.start_step = int(trainer.step.numpy())
        self.examples_per_sec = []
        if trainer.run_dir is not None and trainer.is_chief:  # after the resume's checks: a refused one writes nothing
            model_summary.write(trainer.run_dir / model_summary.FILE, trainer.models, trainer.frozen)

    def on_log(self, trainer, step, logs):
        if math.isfinite(logs.get("examples_per_sec", math.nan)):
            self.examples_per_sec.append(logs["examples_per_sec"])

    def on_train_end(self, trainer, summary):
        seconds = time.perf_counter() - self.start
        steps = summary.get("step", 0) - self.start_step
        evals = {k[5:]: v for k, v in summary.items() if k.startswith("eval_")}
        if summary.get("failed"):
            log.info("Stopped by an error at step %s, after %d step%s in %.1fs.", summary.get("step"), steps,
                     "" if steps == 1 else "s", seconds)
            return
        ended = "Interrupted" if summary.get("interrupted") else "Done"
        lines = [f"{ended}: {steps} step{'' if steps == 1 else 's'} in {seconds:.1f}s (to step {summary.get('step')})."]
        if evals:
            lines.append("Final eval: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
        if self.examples_per_sec:
            ordered = sorted(self.examples_per_sec)
            lines.append(f"Throughput: {ordered[len(ordered) // 2]:.0f} examples/s (median of log windows)")
        lines.append(peak_memory_line(memory_logs()))
        if any(summary.get("traces", {}).values()):
            first = summary.get("first_loop_seconds")
            lines.append(f"Traced: {summary['traces']} in this call"
                         + (f" (first loop incl. compile: {first:.2f}s)" if first is not None else ""))
            warn_retraces(summary)
        if summary.get("xla_measurement"):
            lines.append(f"XLA, measured: {summary['xla_measurement']}")
        if summary.get("weights_sha256"):
            lines.append(f"Weights fingerprint: {summary['weights_sha256']}")
        if summary.get("ema_weights_sha256"):
            lines.append("Averaged weights (optimizer.use_ema; used by evaluation, best/ and export): "
                         f"{summary['ema_weights_sha256']}")
        if trainer.run_dir is not None:
            lines.append(f"Run folder: {trainer.run_dir}")
            lines.append(f"Plot: python -m trainer.plot {shlex.quote(str(trainer.run_dir))} --out runs.png")
        log.info("\n  ".join(lines))


def peak_memory_line(memory) -> str:
    """`Peak memory: host RSS 812 MiB (now 640 MiB), GPU:0 1843 MiB`: peaks since the process started."""
    gpus = [f"GPU:{k[len('gpu'):-len('_peak_mb')]} {v:.0f} MiB" for k, v in memory.items() if k.startswith("gpu")]
    return ", ".join([f"Peak memory: host RSS {memory['host_peak_rss_mb']:.0f} MiB (now "
                      f"{memory['host_rss_mb']:.0f} MiB)", *gpus])


def warn_retraces(summary: Dict) -> None:
    """Traces that cost time for nothing: TensorFlow tracing the same function again, or functions made anew in
    many loops. A function made anew on purpose (freezing layers, XLA measured on and off, fuse_elementwise)
    and traced once is neither (step_functions.py); fine-tuning's one unfreeze makes two."""
    retraced = {k: v for k, v in summary.get("retraces", {}).items() if v}
    if retraced:
        log.warning(
            "Step functions were traced more than once: TensorFlow traced the same function again %s, and "
            "each trace (and XLA compile) costs time. Usual causes: batches of changing shape (pad or bucket "
            "them; the same shapes in every fit() call), or variables (an optimizer, a metric) created "
            "inside an overridden step: pass them to the Trainer.", retraced)
    remade = {k: v for k, v in summary.get("made", {}).items() if v > MADE_ANEW_OK}
    if remade:
        first = summary.get("first_loop_seconds")
        cost = f" (the first loop, one of them included, took {first:.2f}s)" if first else ""
        log.warning(
            "Step functions were made anew (and traced) %s times in this call: each costs a trace and XLA "
            "compile%s. Expected when what the step reads changes in stages on purpose (gradual unfreezing, "
            "grad_multipliers changed a few times). If not, something changes it in every loop: "
            "reset_step_functions(), or a change of `trainable` or grad_multipliers. A Python value of yours the "
            "step reads can live in a tf.Variable instead (assign to it: no trace); grad_multipliers' factors "
            "stay Python numbers.", remade, cost)
