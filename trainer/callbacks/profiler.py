"""trainer.profile_steps=[N, M]: a TensorBoard profiler trace of train steps N..M (docs/debugging.md).

TensorFlow writes the trace itself (`tf.profiler.experimental.start(logdir)` ... `stop()`) as
`<logdir>/plugins/profile/<time>/<host>.xplane.pb`; with logdir = the run folder's tensorboard/,
`tensorboard --logdir RUN/tensorboard` shows it in its Profile tab (the tensorboard-plugin-profile
package: `pip install -e ".[profile]"`). The loop ends a loop at step N-1 and at step M
(loop.steps_to_next_event), so the trace holds exactly steps N..M whatever steps_per_loop is; it starts
after step N-1's logs, evaluation and checkpoint, and stops as soon as step M's loop returns. A loop that
went past step N-1 (trainer.jit_compile=measure's first loop does not stop at the cuts: it does not measure
when its steps would cover step N, xla_measure.measure_in_run) gets a warning and no trace, never a wrong one.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import tensorflow as tf

from trainer.callbacks.base import Callback

log = logging.getLogger("trainer.callbacks")


class Profiler(Callback):
    """Traces train steps `first`..`last` (1-based, as the logs count them) into `logdir` (chief only)."""

    chief_only = True

    def __init__(self, first: int, last: int, logdir: Path):
        self.first, self.last, self.logdir = first, last, Path(logdir)
        self.active = False
        self.last_point = 0  # the step of the last save point: did a loop go past step N-1?
        self.given_up = False  # no trace in this run, and said why
        self.folder: Optional[Path] = None  # the trace's folder, once written

    def on_train_begin(self, trainer) -> None:
        start, total = int(trainer.step.numpy()), trainer.total
        self.last_point, self.given_up = start, self.first > total or start >= self.first
        if self.first > total:
            log.warning("trainer.profile_steps=[%d, %d]: this run ends at step %d, before step %d: no trace. Fix: "
                        "profile steps within trainer.max_steps.", self.first, self.last, total, self.first)
        elif start >= self.first:
            log.warning("trainer.profile_steps=[%d, %d]: this run starts at step %d (resumed), past step %d: no "
                        "trace. Fix: profile later steps.", self.first, self.last, start, self.first)
        elif start == self.first - 1:
            self._start(trainer)
        if self.last > total >= self.first > start:
            log.warning("trainer.profile_steps=[%d, %d]: the run ends at step %d: the trace stops there.",
                        self.first, self.last, total)

    def on_save_point(self, trainer, step: int, reason: str) -> None:
        last_point, self.last_point = self.last_point, step
        if reason != "loop" or self.active or self.folder is not None or self.given_up:
            return
        if step == self.first - 1:
            self._start(trainer)  # the last hook before the loop of step N: its logs, eval and save are done
        elif last_point < self.first - 1 < step:
            self.given_up = True
            log.warning("trainer.profile_steps=[%d, %d]: one loop ran steps %d..%d, past step %d where the trace "
                        "had to start: no trace (a trace from step %d would not be the steps asked for). Fix: "
                        "profile steps after %d.", self.first, self.last, last_point + 1, step, self.first - 1,
                        step + 1, step)

    def on_loop_end(self, trainer, step: int) -> None:
        if self.active and step >= min(self.last, trainer.total):
            self._stop(step)

    def on_train_end(self, trainer, summary) -> None:
        if self.active:  # the run ended (an error, a signal, a stop) inside the profiled steps
            self._stop(summary.get("step", self.last))

    def _start(self, trainer) -> None:
        try:
            tf.profiler.experimental.start(str(self.logdir))
        except tf.errors.AlreadyExistsError:
            log.warning("trainer.profile_steps: another profiler session is running in this process: no trace.")
            return
        self.active = True
        self.before = set(self._folders())
        log.info("Profiling train steps %d..%d into %s (loops end at steps %d and %d so the trace holds exactly "
                 "these steps)", self.first, self.last, self.logdir / "plugins" / "profile", self.first - 1, self.last)

    def _stop(self, step: int) -> None:
        tf.profiler.experimental.stop()
        self.active = False
        new = sorted(set(self._folders()) - self.before) or sorted(self._folders())[-1:]
        self.folder = new[-1] if new else self.logdir / "plugins" / "profile"
        log.info("Profile of train steps %d..%d written to %s; view it with: tensorboard --logdir %s (Profile tab, "
                 'needs pip install -e ".[profile]")', self.first, step, self.folder, self.logdir)

    def _folders(self):
        root = self.logdir / "plugins" / "profile"
        return [p for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
