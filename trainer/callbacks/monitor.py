"""What a training-control callback watches (trainer/callbacks/control.py: EarlyStopping, ReduceLROnPlateau): one
value, an eval result named as `trainer.best_metric` names it (`loss`, `accuracy`; with several eval sets
`val/accuracy`: trainer/evalsets.py) or a train log as `train/NAME` (`train/loss`), checked before the first step
(`Monitor.check_monitor`; `log_names`: the names a trainer's logs hold, which Checkpointing's best_metric is checked
against too). Each event (an evaluation, or a train log) is judged once, so the final evaluation at the step where
the run stopped does not count twice. The counts are in every checkpoint (state_dict): a resumed run goes on
counting where it stopped. They belong to one Trainer: an object given to another Trainer starts fresh there (or
from that Trainer's checkpoint), as Keras' callbacks reset in on_train_begin.
"""
from __future__ import annotations

import logging
import math
import weakref
from typing import Dict, List, Optional

from trainer import evalsets
from trainer.callbacks.base import Callback
from trainer.config import ConfigError, written
from trainer.config_ranges import round_interval
from trainer.memory import memory_logs
from trainer.step import Step

log = logging.getLogger("trainer.callbacks")


def counted(n: int, noun: str) -> str:
    """`n` and the noun, plural unless one: "1 event", "3 events"."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def log_names(trainer, train: bool) -> Optional[List[str]]:
    """The names a train log (train=True) or an eval result of `trainer` holds, known before its first step;
    None when an overridden train_step/test_step may add names of its own (known once it is traced)."""
    step = "train_step" if train else "test_step"
    if getattr(type(trainer), step) is not getattr(Step, step):
        return None
    return default_log_names(trainer, train)


def default_log_names(trainer, train: bool) -> List[str]:
    """The names the default train_step/test_step would log: with an overridden one, the names a monitored name
    is most likely meant to be before its own are known (`acuracy`: 'accuracy', `val_los`: 'val_loss')."""
    names = ["loss", *(trainer.metrics if train else trainer.eval_metrics)]
    if train:
        names += ["examples_per_sec", *memory_logs()]
        for name, updater in trainer.updaters.items():
            prefix = "" if len(trainer.updaters) == 1 else f"{name}/"
            fields = ["lr", "grad_norm", "skipped_steps"] + (["loss_scale"] if updater.loss_scale.enabled else [])
            names += [prefix + field for field in fields]
    return sorted(set(names))


class Monitor(Callback):
    """The value a subclass watches, its best so far, and the events since it last improved (`wait`).
    Subclasses implement `judge(trainer, step, value)`."""

    key = ""  # the callback's place in the config, for messages
    acts = ""  # what it does when it acts, for messages

    def __init__(self, monitor: str, mode: str, min_delta: float, patience: int):
        self.monitor = monitor[len("eval/"):] if monitor.startswith("eval/") else monitor
        # None: auto cannot tell from the name. Refused in check_monitor, after the name is checked: "set mode"
        # would be the wrong fix for a misspelt monitor (`acuracy`), whose close name comes first.
        self.mode = evalsets.guess_mode(mode, self.monitor)
        self.min_delta, self.patience = min_delta, patience
        self.reads = self.monitor  # the eval record's key: `val/loss` for `loss` with several sets (check_monitor)
        self.asked = self.reads  # the name a wrong one is matched by, for the name meant (check_monitor)
        self.cli = False  # the user came from the CLI: fixes name its overrides (check_monitor)
        self.checked = False  # check_monitor ran for the coming on_train_begin (CallbackList.check_monitors)
        self.owner = None  # a weak reference to the Trainer the counts belong to
        self.restored = False  # load_state_dict ran since the last on_train_begin: the counts are a checkpoint's
        self.said_idle = self.idle_now = False  # warn_if_idle warned: with this Trainer (adopt), in this fit() call
        self.events, self.start_step = 0, 0  # events judged in the current fit() call, and the step it began at
        self.fresh()

    def fresh(self) -> None:
        """The counts of a run that has judged nothing yet."""
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.wait = 0
        self.last_step = -1  # the newest event judged

    def state_dict(self) -> Dict:
        return {"best": self.best, "best_step": self.best_step, "wait": self.wait, "last_step": self.last_step}

    def load_state_dict(self, state: Dict) -> None:
        self.best, self.best_step = state["best"], state["best_step"]
        self.wait, self.last_step = int(state["wait"]), int(state["last_step"])
        self.restored = True

    @property
    def best_or_nan(self) -> float:
        return math.nan if self.best is None else self.best

    def improved(self, value: float, reference: Optional[float]) -> bool:
        if reference is None:
            return math.isfinite(value)
        return value < reference - self.min_delta if self.mode == "min" else value > reference + self.min_delta

    def on_train_begin(self, trainer) -> None:
        if self.owner is None or self.owner() is not trainer:
            self.adopt(trainer)
        self.restored = False
        if not self.checked:  # a callback list that did not check it first
            self.check_monitor(trainer)
        self.checked = False  # the next fit() call checks again
        self.events, self.start_step = 0, int(trainer.step.numpy())
        # once per Trainer (not at each fit() call of a loop of them); a dry run's 2 steps act on nothing anyway
        self.idle_now = not trainer.config.fast_dev_run and not self.said_idle and self.warn_if_idle(trainer)
        self.said_idle = self.said_idle or self.idle_now

    def events_to_act(self) -> int:
        """The fewest events after which it can act, counted with the state carried over from an earlier fit()
        call or a checkpoint: a first that sets the best (unless there is one), then `patience` without
        improvement (at least one)."""
        return max(self.patience - self.wait, 1) + (self.best is None)

    def warn_if_idle(self, trainer) -> bool:
        """Loudly, before the first step, when this fit() call has fewer events before its last step than the
        callback needs to act (the final evaluation judges weights whose training is over: a stop or a lower rate
        there acts only in a later fit() call, if any): eval_every above the steps to train silently never
        stopped a run. As Keras and Lightning warn of a monitored value that never comes. True when it warned."""
        name, train = type(self).__name__, self.monitor.startswith("train/")
        if not train and not trainer.evaluates:
            data = ("give the data an eval split (data.*: e.g. data.validation_split=0.1 for an image folder)"
                    if self.cli else "give fit() eval data (fit(train, eval_data), or validation_data=...)")
            log.warning("%s watches the eval result %r, and this fit() call has no eval data: it cannot act. Fix: "
                        "%s, or monitor a train log: %s.", name, self.monitor, data, self.fix("monitor", "train/loss"))
            return True
        key = "log_every" if train else "eval_every"
        every, start, end = getattr(trainer.config, key), int(trainer.step.numpy()), trainer.total
        first = max(start, getattr(self, "start_from_step", 0) - 1)  # EarlyStopping judges no event before it
        events, needed = ((end - 1) // every - first // every if every else 0), self.events_to_act()
        if events >= needed or start >= end:
            return False
        what = "train log" if train else "evaluation"
        have = f"{events} before it" if events else f"none before it{'' if train else ', only the final evaluation'}"
        lower = (end - 1 - first) // needed  # the largest interval that gives `needed` events
        every_fix, note = round_interval(lower, getattr(trainer, "steps_per_epoch", None))
        fixes = [f"{self.fix(f'trainer.{key}', every_fix)}{note} (or less)" if lower >= 1 else "train longer"]
        if self.patience > 0:
            fixes.append("a smaller patience")
        log.warning("%s(monitor=%r, patience=%d) cannot %s in this fit() call: it needs %s before the last step "
                    "(step %d) and this call has %s (%s); a verdict at its final %s acts only in a later fit() "
                    "call. Fix: %s.", name, self.monitor, self.patience, self.acts, counted(needed, what), end, have,
                    self.fix(f"trainer.{key}", every), what, ", or ".join(fixes))
        return True

    def adopt(self, trainer) -> None:
        """This object's first fit() call with `trainer` (a first run, or it is reused by another Trainer): the
        counts start fresh, unless its checkpoint just restored them (a resume)."""
        if not self.restored:
            self.fresh()
        self.owner = weakref.ref(trainer)
        self.said_idle = False

    def check_monitor(self, trainer) -> None:
        """A monitor name that no log of this trainer can hold is refused before the first step (at the first
        event, it may be the final evaluation, after the last checkpoint); then a mode=auto that cannot tell
        from a good name."""
        train = self.monitor.startswith("train/")
        names = log_names(trainer, train)
        sets = None if train else getattr(trainer, "eval_set_names", None)
        self.cli = trainer.from_cli and bool(self.key)  # a fix names the CLI override, else the Python argument
        default = default_log_names(trainer, train)
        self.reads = self.monitor if train else evalsets.resolve(self.monitor, sets, names, f"{self.key}.monitor",
                                                                  f"{type(self).__name__}(monitor=...)", self.cli,
                                                                  known=default)
        name = self.monitor[len("train/"):] if train else self.reads.split("/", 1)[-1] if sets else self.reads
        # the name as the user wrote it, for the name meant: one set's `val_acc` is told 'val_accuracy'
        self.asked = name if train else self.reads if sets else self.monitor
        if names is not None and name not in names:
            self.refuse(self.reads if sets else name, [f"{s}/{n}" for s in sets for n in names] if sets else names,
                        "train logs" if train else "eval results")
        if names is None:  # an overridden step's: a name close to the default step's is most likely misspelt
            asked, key = (self.monitor, self.monitor) if train else (self.asked, self.reads)
            evalsets.check_typo_before_run(
                self.given(), self.monitor, asked, key, default, sets, "train_step" if train else "test_step",
                "mode" if self.mode is None else "",
                lambda what, value: self.fix("monitor" if what == "name" else "mode", value))
        self.mode = evalsets.resolve_mode(self.mode or "auto", self.monitor, f"{self.key}.mode",
                                          f"{type(self).__name__}(mode=...)", self.cli)
        self.checked = True

    def fix(self, name: str, value) -> str:
        """Setting `name` (the callback's own, or trainer.NAME) to `value` as the user does: override or argument."""
        if name.startswith("trainer."):
            return written(name, value, f"Trainer({name[len('trainer.'):]}=...)", self.cli)
        return written(f"{self.key}.{name}", value, f"{type(self).__name__}({name}=...)", self.cli)

    def given(self) -> str:
        """The monitor as the user gave it, for a message's lead-in: from Python, the argument (EarlyStopping(
        monitor='acc')), from the CLI the class and setting (EarlyStopping: monitor='acc')."""
        call = type(self).__name__
        return f"{call}: monitor={self.monitor!r}" if self.cli else f"{call}(monitor={self.monitor!r})"

    def refuse(self, name: str, names: List[str], what: str) -> None:
        prefix = "train/" if what == "train logs" else ""
        close = evalsets.meant(self.asked, names)
        hint = f" (did you mean {prefix + close!r}?)" if close else ""
        raise ConfigError(
            f"{self.given()} is not among the {what} {[prefix + n for n in names]}"
            f"{hint}. Fix: {self.fix('monitor', '<one of them>')}: an eval result as best_metric names it, or a "
            "train log as train/NAME.")

    def on_log(self, trainer, step, logs) -> None:
        if self.monitor.startswith("train/"):
            self._event(trainer, step, logs, self.monitor[len("train/"):], "train logs")

    def on_eval_end(self, trainer, step, logs) -> None:
        if not self.monitor.startswith("train/"):
            self._event(trainer, step, logs, self.reads, "eval results")

    def _event(self, trainer, step: int, logs: Dict, name: str, what: str) -> None:
        if step <= self.last_step:  # the final evaluation of a step already judged (an early stop)
            return
        if name not in logs:  # an overridden step's logs (checked here, when they are known)
            self.refuse(name, sorted(k for k in logs if k not in ("step", "split")), what)
        self.last_step, self.events = step, self.events + 1
        self.judge(trainer, step, float(logs[name]))

    def on_train_end(self, trainer, summary) -> None:
        self.restored = False  # a rollback's restore, in this fit() call: not a resume of a later Trainer
        trained = summary.get("step", self.start_step) > self.start_step
        if (trained and not self.events and not summary.get("failed") and not summary.get("interrupted")
                and not self.idle_now):  # warned at the start already
            if self.monitor.startswith("train/"):
                what, fix = "train log", self.fix("trainer.log_every", "<steps>")
            else:
                what, data = "evaluation", "give the data an eval split" if self.cli else "give fit() eval data"
                every, train_log = self.fix("trainer.eval_every", "<steps>"), self.fix("monitor", "train/loss")
                fix = f"{data}, with {every}, or {train_log}"
            log.warning("%s judged nothing in this fit() call: no %s reached it. Fix: %s.", type(self).__name__,
                        what, fix)

    def judge(self, trainer, step: int, value: float) -> None:
        raise NotImplementedError
