"""The best checkpoint's metric and mode (trainer.best_metric, trainer.best_mode): a name no eval result can hold is
refused before the first step (or, for an overridden test_step's, said as a probable typo, and refused at its first
evaluation: Checkpointing.refuse_missing_best), and best_mode=auto decided once, as a resumed run's best/ is ranked."""
from __future__ import annotations

import dataclasses
import logging
from typing import List, Optional, Tuple

from trainer import evalsets
from trainer.callbacks.monitor import default_log_names
from trainer.config import ConfigError, TrainerConfig, as_given, written

log = logging.getLogger("trainer.core")
DEFAULT_BEST_METRIC = next(f.default for f in dataclasses.fields(TrainerConfig) if f.name == "best_metric")
UNRECORDED = ("(unrecorded)", None)  # a checkpoint saved before the best mode was recorded in it (see best_mode_of)
EXTREME = {"min": "smallest", "max": "largest"}


def check_best_metric(trainer, key: Optional[str], names: List[str]) -> None:
    """trainer.best_metric (`key`: the eval record's key it reads) must name an eval result: one no result has
    is a ConfigError naming them and the closest spelling before the first step, when the names are known
    (the default test_step's), not a warning after an evaluation that with eval_every=0 is the run's end. An
    overridden test_step's names are known at its first evaluation: the same error there, once that step is
    saved (Checkpointing.refuse_missing_best). The default, `accuracy`, on a model without that metric was not
    asked for: Checkpointer.update_best warns."""
    given = trainer.config.best_metric
    if not key or key in names or not asked_for(trainer):
        return
    asked = key if trainer.eval_set_names else given[len("eval/"):] if given.startswith("eval/") else given
    setting = as_given("trainer.best_metric", given, "Trainer(best_metric=...)", trainer.from_cli)
    raise ConfigError(f"{setting} is not among the eval results {names}"
                      f"{evalsets.close_hint(asked, names)}: no best checkpoint could be kept. "
                      f"Fix: {best_metric_fix(trainer)}.")


def check_probable_typo(trainer, key: str) -> None:
    """With an overridden test_step, whose result names are known only at its first evaluation: a best_metric
    misspelt from a name the default step reports (`acuracy`, `val_los`) is said so (evalsets.check_typo_before_run),
    not as a best_mode to set."""
    given, cli = trainer.config.best_metric, trainer.from_cli
    if not asked_for(trainer):
        return
    sets, auto_fails = trainer.eval_set_names, trainer.config.best_mode == "auto" and not evalsets.guess_mode(
        "auto", given)
    asked = key if sets else given[len("eval/"):] if given.startswith("eval/") else given
    evalsets.check_typo_before_run(
        as_given("trainer.best_metric", given, "Trainer(best_metric=...)", cli), given, asked, key,
        default_log_names(trainer, train=False), sets, "test_step", "best_mode" if auto_fails else "",
        lambda what, value: written(f"trainer.best_{'metric' if what == 'name' else 'mode'}", value,
                                    f"Trainer(best_{'metric' if what == 'name' else 'mode'}=...)", cli))


def best_metric_fix(trainer) -> str:
    """The fix for a best_metric no eval result has, in the form the user set it (CLI override or argument)."""
    def fix(value) -> str:
        return written("trainer.best_metric", value, "Trainer(best_metric=...)", trainer.from_cli)

    return f"{fix('<one of them>')} (a metric's name is its `name=`), or {fix(None)} to keep none"


def best_mode_of(trainer, recorded: Optional[Tuple[Optional[str], Optional[str]]],
                 metric: Optional[str] = None) -> Optional[str]:
    """trainer.best_mode for this run; None without a best_metric. `auto` is decided as EarlyStopping's mode=auto
    decides (evalsets.resolve_mode: `loss`, `val_loss` min, `accuracy` max; a name it cannot judge is a ConfigError
    naming max|min), at the first fit() call, once the name is checked. A resumed run (`recorded`: what its
    checkpoint holds, UNRECORDED for one saved before that record) keeps the mode its best/ is ranked by: one
    from before best_mode=auto kept max, then the default; said loudly when the name says the other is better.
    `metric`: the one ranked (default_best_metric's), else trainer.best_metric."""
    metric, mode = metric or trainer.config.best_metric, trainer.config.best_mode
    if not metric or mode != "auto":
        return mode if metric else None
    kept = "max" if recorded == UNRECORDED else recorded[1] if recorded and recorded[0] == metric else None
    if kept is None:  # a fresh run, or one that kept no best (or another best_metric) until now
        mode = evalsets.resolve_mode("auto", metric, "trainer.best_mode", "Trainer(best_mode=...)", trainer.from_cli)
        log.info("Best checkpoints: the %s %s (trainer.best_mode=auto: %s).", EXTREME[mode], metric, mode)
        return mode
    guessed = evalsets.guess_mode("auto", metric)
    if guessed not in (None, kept):
        def fix(value):
            return written("trainer.best_mode", value, "Trainer(best_mode=...)", trainer.from_cli)

        began = " (the default before best_mode=auto)" if recorded == UNRECORDED else ""
        log.warning("trainer.best_metric=%r: this run began with best_mode=%s%s, so its best checkpoints are kept by "
                    "the %s %s, as best/ is ranked, though the %s is better. Fix: %s keeps the %s from here (best/ is "
                    "ranked again), or %s keeps them as they are, without this warning.", metric, kept, began,
                    EXTREME[kept], metric, EXTREME[guessed], fix(guessed), EXTREME[guessed], fix(kept))
    return kept


def asked_for(trainer) -> bool:
    """trainer.best_metric was given (Trainer(best_metric="accuracy") too), not left at its default: a name the
    results lack is then an error, and no default ranks by the loss instead."""
    return trainer.config.best_metric != DEFAULT_BEST_METRIC or getattr(trainer, "best_metric_given", False)


def default_best_metric(trainer, names: Optional[List[str]]) -> Optional[str]:
    """The metric best checkpoints are ranked by: trainer.best_metric, or for its default (`accuracy`, not given) on a
    Trainer without metrics (its eval results known: only the loss), the eval loss (said_ranked_by_loss); it had
    said "the largest accuracy", then warned at the first evaluation that there is none and kept no best
    checkpoint. With metrics of other names the default stays that warning, which names them."""
    given = trainer.config.best_metric
    return "loss" if not asked_for(trainer) and names == ["loss"] else given


def say_ranked_by_loss(trainer, key: str) -> None:
    """The default best_metric ranks by the eval loss (`key`: its record's, the first eval set's of several): said
    once per Trainer, at its first fit() call."""
    of_set = f" of the first eval set ({key!r}; " if key != "loss" else " ("
    log.info("The default trainer.best_metric=%r is not among the eval results ['loss']: best checkpoints are ranked "
             "by the eval loss%s%s names another).", DEFAULT_BEST_METRIC, of_set,
             written("trainer.best_metric", "<a metric>", "Trainer(best_metric=...)", trainer.from_cli))
