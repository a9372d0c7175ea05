"""The choice trainer.jit_compile=measure (or auto, for a long run on a CPU) made, kept in every
checkpoint: a resumed run compiles as the measured run did instead of measuring again (re-measuring
would run steps both ways at the resume point, so the resumed run would not repeat the uninterrupted
one, and would pay for the measuring again)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, Optional

from trainer import step_functions
from trainer.callbacks.base import Callback
from trainer.xla_measure import XlaMeasurement

log = logging.getLogger("trainer.core")


class XlaChoice(Callback):
    """One per Trainer (it carries the measurement across fit() calls); right after Checkpointing, so it
    applies a restored choice before the first loop, and adds the figures to the next train log row
    (metrics.jsonl, TensorBoard) before the writers see it."""

    def __init__(self):
        self.measurement: Optional[XlaMeasurement] = None
        self.unlogged = False

    def measured(self, measurement: XlaMeasurement) -> None:
        self.measurement, self.unlogged = measurement, True

    def on_train_begin(self, trainer):
        m = self.measurement
        if m is not None and trainer.config.jit_compile in ("measure", None) and trainer.jit_compile != m.jit_compile:
            log.info("XLA: %s, as measured before this run was resumed", "on" if m.jit_compile else "off")
            step_functions.choose(trainer, m.jit_compile)

    def on_log(self, trainer, step, logs):
        if self.unlogged and self.measurement is not None:
            m = self.measurement
            logs.update(xla_on_ms_per_step=1e3 * m.on_seconds, xla_off_ms_per_step=1e3 * m.off_seconds,
                        jit_compile=float(m.jit_compile))
            self.unlogged = False

    def state_dict(self) -> Dict:
        return dataclasses.asdict(self.measurement) if self.measurement is not None else {}

    def load_state_dict(self, state: Dict) -> None:
        self.measurement = XlaMeasurement(**state) if state else None
