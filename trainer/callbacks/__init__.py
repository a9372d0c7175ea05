"""Callbacks: the hook interface (base.py) and the built-ins, one concern a file: checkpointing, the
numerics and divergence guards, the progress bar and summary, the run folder's writers."""
from __future__ import annotations

from typing import List

from trainer.callbacks.base import HOOKS, Callback, CallbackList
from trainer.callbacks.checkpointing import Checkpointing
from trainer.callbacks.divergence import DivergenceGuard
from trainer.callbacks.numerics import NumericalError, NumericsGuard
from trainer.callbacks.progress import LogLines, ProgressBar, Summary
from trainer.callbacks.writers import MetricsWriter, TensorBoardWriter
from trainer.callbacks.xla_choice import XlaChoice

__all__ = ["HOOKS", "Callback", "CallbackList", "Checkpointing", "DivergenceGuard", "LogLines", "MetricsWriter",
           "NumericalError", "NumericsGuard", "ProgressBar", "Summary", "TensorBoardWriter", "XlaChoice",
           "callback_list"]


def callback_list(trainer, user_callbacks: List[Callback]) -> CallbackList:
    """The built-ins around the user's: checkpointing first (everyone starts from the restored state),
    the numerics guard last (it judges the loop after every other callback ran), the divergence guard just
    before it (with on_divergence=rollback it rolls back on non-finite steps before the guard would stop)."""
    cbs: List[Callback] = [trainer.checkpointing, trainer.xla_choice]  # a restored XLA choice applies before the loop
    if trainer.config.verbose:
        cbs.append(ProgressBar() if trainer.config.progress_bar else LogLines())  # the bar shows what LogLines logs
    if trainer.run_dir is not None:
        cbs.append(MetricsWriter(trainer.run_dir / "metrics.jsonl"))
        if trainer.config.tensorboard:
            cbs.append(TensorBoardWriter(trainer.run_dir / "tensorboard"))
    cbs.append(Summary())
    return CallbackList(cbs + list(user_callbacks) + [trainer.divergence, NumericsGuard()], is_chief=trainer.is_chief)
