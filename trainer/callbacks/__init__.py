"""Callbacks: the hook interface (base.py) and the built-ins, one concern a file: checkpointing, the
numerics and divergence guards, training control (early stopping, plateaus), the progress bar and
summary, the loggers (loggers.py)."""
from __future__ import annotations

from typing import List

from trainer.callbacks.base import HOOKS, Callback, CallbackList
from trainer.callbacks.checkpointing import Checkpointing
from trainer.callbacks.control import EarlyStopping, ReduceLROnPlateau
from trainer.callbacks.divergence import DivergenceGuard
from trainer.callbacks.numerics import NumericalError, NumericsGuard
from trainer.callbacks.profiler import Profiler
from trainer.callbacks.progress import LogLines, ProgressBar, Summary
from trainer.callbacks.loggers import CSVLogger, Logger, MetricsWriter, MLflowLogger, TensorBoardWriter, default_loggers
from trainer.callbacks.wandb_logger import WandbLogger
from trainer.callbacks.xla_choice import XlaChoice
from trainer.console import bar_shown

__all__ = ["HOOKS", "CSVLogger", "Callback", "CallbackList", "Checkpointing", "DivergenceGuard", "EarlyStopping",
           "LogLines", "Logger", "MLflowLogger", "MetricsWriter", "NumericalError", "NumericsGuard", "Profiler",
           "ProgressBar", "ReduceLROnPlateau", "Summary", "TensorBoardWriter", "WandbLogger", "XlaChoice",
           "callback_list", "loop_host_callbacks"]


def callback_list(trainer, user_callbacks: List[Callback]) -> CallbackList:
    """The built-ins around the user's: checkpointing first (everyone starts from the restored state),
    the numerics guard last (it judges the loop after every other callback ran), the divergence guard just
    before it (with on_divergence=rollback it rolls back on non-finite steps before the guard would stop)."""
    cbs: List[Callback] = [trainer.checkpointing, trainer.xla_choice]  # a restored XLA choice applies before the loop
    if trainer.config.verbose:
        # the bar shows what LogLines logs; auto: a bar on a terminal only (console.bar_shown)
        cbs.append(ProgressBar() if bar_shown(trainer.config.progress_bar) else LogLines())
    loggers = default_loggers(trainer) if trainer.loggers is None else trainer.loggers
    if trainer.config.fast_dev_run:  # writes nothing (trainer/debug.py)
        loggers = []
    cbs += [lg for lg in loggers if trainer.config.tensorboard or not isinstance(lg, TensorBoardWriter)]
    cbs.append(Summary())
    cbs += list(user_callbacks)
    if trainer.config.profile_steps and trainer.run_dir is not None:  # after the others: it starts once they saved
        cbs.append(Profiler(*trainer.config.profile_steps, logdir=trainer.run_dir / "tensorboard"))
    return CallbackList(cbs + [trainer.divergence, NumericsGuard()], is_chief=trainer.is_chief)


def loop_host_callbacks(trainer) -> CallbackList:
    """The loop's host work between windows without the run's other callbacks (loggers, progress, early
    stopping, the user's), for Trainer.run_steps(loop=True): the data position (checkpointing), the
    divergence guard and the last fit() call's numerics guard."""
    numerics = [cb for cb in trainer.callback_list.callbacks if isinstance(cb, NumericsGuard)][-1:]
    return CallbackList([trainer.checkpointing, trainer.divergence, *numerics], is_chief=trainer.is_chief)
