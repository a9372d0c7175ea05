"""Checkpointing: resume or warm start, saves on a cadence, at the end and on a signal, best-k after each
evaluation, and the record of the configured learning rates and of the data position (the batches the
training iterator read). The files and their guarantees are checkpoint.py's Checkpointer; this callback
decides when."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import keras
import tensorflow as tf

from trainer import evalsets
from trainer.callbacks.base import Callback, CallbackState
from trainer.callbacks.best_metric import (EXTREME, UNRECORDED, asked_for, best_metric_fix, best_mode_of,
                                         check_best_metric, check_probable_typo, default_best_metric,
                                         say_ranked_by_loss)
from trainer.callbacks.monitor import default_log_names, log_names
from trainer.callbacks.numerics import check_weights_finite
from trainer import held_state, resume_from
from trainer.checkpoint import NO_BEST, Checkpointer
from trainer.config import ConfigError, as_given, written
from trainer.distribute import input_pipelines
from trainer.data_position import position_in_new_batches, reads_other_examples
from trainer.inputs import batches_read_per_step
from trainer.load_weights import init_from_targets, warm_start_models
from trainer.loop import due as loop_event_due
from trainer.saved import check_frozen_unchanged, checkpoint_objects, frozen_fingerprints

log = logging.getLogger("trainer.core")


def _configured_settings(trainer) -> Dict[str, Tuple[Optional[float], float]]:
    """Per optimizer: its constant learning rate (None for a schedule) and its loss scale: values a
    restore would overwrite."""
    settings = {}
    for name, updater in trainer.updaters.items():
        lr = updater.optimizer._learning_rate
        constant = float(keras.ops.convert_to_numpy(lr)) if isinstance(lr, keras.Variable) else None
        settings[name] = (constant, updater.loss_scale.status().scale)
    return settings


def _say_ranking_starts(recorded: Tuple, best: Tuple, step: int) -> None:
    """A resumed run whose checkpoint ranked its best by another metric or mode (a run without metrics ranked by
    the default `accuracy`, now by the loss): its best value cannot be compared, so the ranking starts again."""
    def ranking(metric, mode):
        return f"the {EXTREME.get(mode, mode)} {metric}" if metric else "nothing"

    log.info("Best checkpoints: the checkpoint resumed (step %d) ranked them by %s; this run ranks them by %s, so "
             "the ranking starts now (the best value so far is forgotten; best/ copies kept by the old ranking are "
             "the first replaced).",
             step, ranking(*recorded), ranking(*best))


class Checkpointing(Callback):
    """One per Trainer (it carries the Checkpointer across fit() calls); first in the callback list, so
    every other callback starts from the restored state."""

    def __init__(self):
        self.checkpointer: Optional[Checkpointer] = None
        self.prepared = False  # resumed, warm-started or started fresh by the first fit() call
        self.configured: Dict[str, Tuple[Optional[float], float]] = {}
        self.frozen: Dict[str, str] = {}  # the frozen models' fingerprints, recorded at each save (trainer/saved.py)
        self.held = held_state.HeldState()  # the state the Trainer subclass holds, in every checkpoint
        self._first_loop = True  # the first loop of the current fit() call is still to end (frozen_watch.py)
        self.last_path: Optional[str] = None
        self.saved_step: Optional[int] = None  # the step of this process's last save
        self.last_save_time = time.monotonic()
        # the step of the last save point (or the run's start): a loop from it went past a due save?
        self.last_point = 0
        # The data position: the training batches read up to step `counted_step`. Counted, not step x batches
        # per step: a resume with other batches per step (or after a rollback) goes on where the data was.
        self.batches_read, self.counted_step = 0, None
        self.other_examples = False  # resumed with another worker count: the position skipped holds other examples
        # (best_metric, best_mode) as decided at the first fit() call (best_mode_of), in every checkpoint; and as
        # the checkpoint a resume restored recorded them
        self.best: Tuple[Optional[str], Optional[str]] = (None, None)
        self.recorded: Tuple[Optional[str], Optional[str]] = UNRECORDED
        self.metric: Optional[str] = None  # what best checkpoints are ranked by (default_best_metric)
        self.said_by_loss = False  # the default's ranking by the eval loss is said at the first fit() that evaluates

    def state_dict(self) -> Dict:
        return {"best_metric": self.best[0], "best_mode": self.best[1]}

    def load_state_dict(self, state: Dict) -> None:
        self.recorded = (state.get("best_metric"), state.get("best_mode"))

    def _record(self, trainer) -> Path:
        return trainer.run_dir / "checkpoints" / "configured.json"

    def on_train_begin(self, trainer):
        first = not self.prepared
        self._first_loop = True
        self.evaluated = None  # an evaluation of an earlier fit() call is never judged against later weights
        best = self._best_metric_key(trainer)  # checked before a resume reads anything
        self._prepare(trainer)
        if self.checkpointer is not None and best:
            self.checkpointer.best_metric, self.checkpointer.best_metric_fix = best, best_metric_fix(trainer)
        self.last_point = int(trainer.step.numpy())  # after a resume's restore
        if first and self.counted_step is None:  # not resumed from a record: a fresh run, or one from before it
            self.batches_read = self.last_point * batches_read_per_step(trainer.config)
        self.counted_step = self.last_point

    @staticmethod
    def _refuse_resume_without_folder(trainer) -> None:
        """trainer.resume_from with no run folder: a dry run (fast_dev_run, from the CLI too) reads none, and a
        Trainer from Python may have been given none."""
        cfg, cli = trainer.config, trainer.from_cli
        asked = as_given("trainer.resume_from", cfg.resume_from, "Trainer(resume_from=...)", cli, str(cfg.resume_from))
        if cfg.fast_dev_run:
            dev = cfg.fast_dev_run
            dry = as_given("trainer.fast_dev_run", dev, "Trainer(fast_dev_run=...)", cli, str(dev).lower())
            raise ConfigError(f"{asked} and {dry}: a dry run reads no run folder, and resume_from names a checkpoint "
                              "of one. Fix: drop one of them.")
        raise ConfigError(f"{asked} needs the run folder it names a checkpoint of, and this Trainer has none. "
                          "Fix: give Trainer(run_dir=...) too, or drop resume_from.")

    def _best_metric_key(self, trainer) -> Optional[str]:
        """The eval record key trainer.best_metric reads (`val/accuracy` with several eval sets), checked against
        the eval results when they are known now; None: no best checkpoint is tracked (no run folder)."""
        if trainer.run_dir is None or not trainer.config.best_metric:
            return None
        names, sets = log_names(trainer, train=False), trainer.eval_set_names
        self.metric = default_best_metric(trainer, names)
        by_loss = self.metric != trainer.config.best_metric  # the default, without metrics: said here, once
        key = evalsets.resolve(self.metric, sets, names, "trainer.best_metric", "Trainer(best_metric=...)",
                               trainer.from_cli, say=not by_loss, known=default_log_names(trainer, False))
        if by_loss and trainer.evaluates and not self.said_by_loss:  # without eval data there are no eval results
            say_ranked_by_loss(trainer, key)
            self.said_by_loss = True
        if names is not None:
            check_best_metric(trainer, key, [f"{s}/{n}" for s in sets for n in names] if sets else names)
        else:  # a test_step's own results: checked at its first evaluation (refuse_missing_best)
            check_probable_typo(trainer, key)
        return key

    def refuse_missing_best(self, trainer, step: int, eval_logs: Dict) -> None:
        """At an evaluation (the first that lacks it: an overridden test_step's results are known only there), a
        best_metric the results lack is a ConfigError, after this step is saved (nothing trained is lost; the
        same command resumes from it once the name is fixed). The default, `accuracy`, was not asked for:
        Checkpointer.update_best warns instead."""
        key = self.checkpointer.best_metric
        if not key or key in eval_logs or not asked_for(trainer):
            return
        if self.saved_step != step:  # every worker alike: a save is collective
            self.save(trainer, step)
        try:
            check_best_metric(trainer, key, sorted(k for k in eval_logs if k not in ("step", "split")))
        except ConfigError as e:
            raise ConfigError(f"{e} Step {step} is saved: with the name fixed, the run resumes from it.") from None

    def data_position(self) -> int:
        """The training batches read so far: the next fit() call's iterator skips them."""
        return self.batches_read

    def _position(self, trainer, step: int) -> int:
        return self.batches_read + (step - self.counted_step) * batches_read_per_step(trainer.config)

    def on_loop_end(self, trainer, step):
        self.count_steps(trainer, step)
        if self._first_loop:  # before any save of this fit() call
            self._first_loop = False
            trainer.frozen_watch.after_first_loop(trainer, step)
            if self.checkpointer is not None:
                self.held.check_made_late(trainer, self.checkpointer)

    def count_steps(self, trainer, step: int) -> None:
        """The data position at `step`: the steps trained since the last count read their batches (a
        loop's, or Trainer.run_steps' outside the loop), so a resume does not read them again."""
        self.batches_read, self.counted_step = self._position(trainer, step), step

    def _prepare(self, trainer):
        self.last_save_time = time.monotonic()
        if self.prepared:  # a later fit() call: the model and optimizer in memory are the newest
            trainer.frozen_watch.started(frozen_fingerprints(trainer))  # set between calls on purpose: allowed
            if self.checkpointer is not None:
                self.held.hold(trainer, self.checkpointer)
            return
        cfg = trainer.config
        targets = init_from_targets(cfg.init_from, trainer.models, trainer.from_cli)  # checked before any read
        if trainer.run_dir is None:
            if cfg.resume_from is not None:
                Checkpointing._refuse_resume_without_folder(trainer)
            warm_start_models(trainer.models, targets, trainer.frozen, trainer.from_cli)
            trainer.frozen_watch.started(frozen_fingerprints(trainer))
            self.prepared = True
            return
        checkpointer = Checkpointer(  # its best_mode is decided below, after a resume (auto: "max" until then)
            trainer.run_dir / "checkpoints", checkpoint_objects(trainer, held=False), keep=cfg.keep_checkpoints,
            keep_best=cfg.keep_best, best_metric=cfg.best_metric, best_mode="max" if cfg.best_mode == "auto"
            else cfg.best_mode, is_chief=trainer.is_chief, extra={"callbacks": CallbackState(trainer)},
        )
        self.held.hold(trainer, checkpointer, fresh=True)  # a refused resume made another Checkpointer before
        configured = _configured_settings(trainer)
        # Prepared only once this succeeds: a refused resume refuses again on the next fit() call, instead
        # of that call training from scratch over the run's checkpoints.
        self.recorded = UNRECORDED
        resumed, rewind = self._resume(trainer, checkpointer)
        self.best = (self.metric or cfg.best_metric,
                     best_mode_of(trainer, self.recorded if resumed is not None else None, self.metric))
        checkpointer.best_mode = self.best[1] or "max"
        # A warm start is a fresh run's; a frozen model is in no checkpoint, so it is warm-started on every run.
        warm_start_models(trainer.models, {name: path for name, path in targets.items()
                                           if resumed is None or name in trainer.frozen}, trainer.frozen,
                          trainer.from_cli)
        frozen = frozen_fingerprints(trainer)  # once: a frozen model does not change during the run
        if resumed is not None:
            check_frozen_unchanged(self._record(trainer), frozen)
        self.frozen = frozen
        trainer.frozen_watch.started(frozen)
        self.checkpointer = trainer.checkpointer = checkpointer
        self.configured, self.prepared = configured, True
        if resumed is not None:
            recorded = self._keep_configured_settings(trainer, rewound=rewind is not None)
            self._resume_data_position(trainer, recorded)
        reranked = resumed is not None and self.recorded not in (UNRECORDED, self.best)
        if reranked and self.best[1]:  # its best value is another metric's (or mode's): never beaten, or wrong
            _say_ranking_starts(self.recorded, self.best, int(trainer.step.numpy()))
        if self.best[1] and (resumed is None or reranked or math.isnan(float(trainer.best.numpy()))):
            trainer.best.assign(NO_BEST[self.best[1]])  # no best yet (NaN: saved before NO_BEST): the mode's worst
        if rewind is not None:
            self._finish_rewind(trainer, resumed, *rewind)

    @staticmethod
    def _resume(trainer, checkpointer: Checkpointer) -> Tuple[Optional[int], Optional[tuple]]:
        """(The newest checkpoint's step, or None: a fresh start; None), or with trainer.resume_from (the step
        of the checkpoint it names, what came after set aside (trainer/resume_from.py); (prefix, whether it is
        this folder's checkpoints/ckpt-N, the set-aside folder) for _finish_rewind); once per rewind."""
        cfg, directory = trainer.config, trainer.run_dir / "checkpoints"
        value = cfg.resume_from
        if value is not None and not cfg.resume:
            resume = written("trainer.resume", False, "Trainer(resume=...)", trainer.from_cli)
            asked = as_given("trainer.resume_from", value, "Trainer(resume_from=...)", trainer.from_cli, str(value))
            raise ConfigError(f"{asked} and {resume}: one resumes from a checkpoint, the other refuses to. "
                              f"Fix: drop {resume}.")
        journal = resume_from.unfinished(directory) if trainer.is_chief else None
        if journal is not None:
            value = Checkpointing._finish_cut_short(journal, value)
        earlier = resume_from.applied_before(directory, value) if value is not None else None
        if value is None or earlier is not None:
            if earlier is None and trainer.is_chief:
                resume_from.forget(directory)
            if journal is not None:  # recorded before the cut: nothing left to do
                resume_from.done(directory)
            step = checkpointer.prepare(resume=cfg.resume)
            if earlier is not None:
                log.warning("Resumed from the newest checkpoint (step %s), not from step %s that "
                            "trainer.resume_from=%s names: this run went back to that checkpoint before (set aside: "
                            "%s), so this start is taken for the same command run again. To go back to step %s again: "
                            "delete %s and rerun.", step, earlier.get("step"),
                            value, earlier.get("set_aside"), earlier.get("step"), directory / resume_from.RECORD)
            return step, None
        prefix = resume_from.resolve(directory, value)
        checkpointer.restore_from(prefix, str(value))  # nothing is moved unless this succeeded
        step = int(trainer.step.numpy())
        log.info("Resuming from %s (step %d), as trainer.resume_from=%s asks", prefix, step, value)
        own, folder = resume_from.is_own_regular(trainer.run_dir, prefix), None
        if trainer.is_chief:
            folder, moved = resume_from.set_aside(trainer.run_dir, step, own=own, journal={"resume_from": str(value)})
            if moved:
                log.warning("What the run did after step %d is set aside, not deleted, in %s: %s. TensorBoard and "
                            "MLflow keep those steps (docs/concepts/checkpoints.md).", step, folder, ", ".join(moved))
            else:
                log.info("The run has nothing after step %d to set aside.", step)
        return step, (prefix, own, folder, str(value))

    @staticmethod
    def _finish_cut_short(journal: dict, value):
        """A rewind a crash cut short (checkpoints/set-aside.json): this start finishes it, with or without
        the same trainer.resume_from; another one is refused (the run folder would mix two rewinds)."""
        named = journal.get("resume_from")
        if value is not None and str(value) != named:
            raise ConfigError(f"trainer.resume_from={value}: a start with trainer.resume_from={named} was cut short "
                              f"while taking this run back to step {journal['step']}. Fix: run once with "
                              f"trainer.resume_from={named} (it finishes that), then with the checkpoint you want.")
        log.warning("A start with trainer.resume_from=%s was cut short while taking this run back to step %s: "
                    "finishing it (set aside in %s).", named, journal["step"], journal.get("folder"))
        return named

    def _finish_rewind(self, trainer, step: int, prefix: str, own: bool, folder, value: str) -> None:
        """A checkpoint other than this folder's checkpoints/ckpt-N is saved there at once (every worker: a
        save is collective), so the run folder always has a regular checkpoint and a start that resumes
        from the newest lands on N; then the record (trainer/resume_from.py), so a crash before redoes it."""
        if not own:
            if self.counted_step is None:  # no data-position record: step x batches per step, as on_train_begin
                self.batches_read, self.counted_step = step * batches_read_per_step(trainer.config), step
            self.save(trainer, step)
        if trainer.is_chief:
            resume_from.remember(trainer.run_dir / "checkpoints", value, prefix, step, folder)
            resume_from.done(trainer.run_dir / "checkpoints")

    def _keep_configured_settings(self, trainer, rewound: bool = False) -> None:
        """After a resume, a learning rate changed in the configuration (since the newest checkpoint's run,
        per checkpoints/configured.json) and a fixed scale win over the checkpoint's values; a rate that a
        callback changed during the run is kept (a schedule is code and follows the config anyway). After a
        rewind (`rewound`) the record describes the newest run, not the restored checkpoint's: the
        configuration's rate wins. A
        dynamic scale's value is state and is kept, unless it is 1: the value of a run without loss
        scaling (float32 resumed as float16) or at the floor; it restarts at its initial value then.
        Returns the record."""
        try:
            recorded = json.loads(self._record(trainer).read_text())
        except (OSError, ValueError):  # none (a run from before this record) or unreadable
            recorded = {}  # then the configuration wins, as it did before
        if not isinstance(recorded, dict):
            recorded = {}
        for name, (constant_lr, scale) in self.configured.items():
            updater = trainer.updaters[name]
            old = recorded.get("lr") if name == trainer.default_optimizer else recorded.get("lrs", {}).get(name)
            if constant_lr is not None and (rewound or old != constant_lr):
                restored = float(keras.ops.convert_to_numpy(updater.optimizer.learning_rate))
                if restored != constant_lr:
                    updater.optimizer.learning_rate = constant_lr
                    log.info("Learning rate %g from the configuration (the checkpoint had %g)", constant_lr, restored)
            checkpointed = updater.loss_scale.status()
            if checkpointed.scale != scale and (checkpointed.mode != "dynamic" or checkpointed.scale <= 1.0):
                updater.loss_scale.set_scale(scale)
                log.info("Loss scale %g from the configuration (the checkpoint had %g)", scale, checkpointed.scale)
        return recorded

    def _resume_data_position(self, trainer, recorded) -> None:
        """The batches the run had read at the restored step, from the record of its last save (any
        batches per step, then and now); without one (a run from before it), step x batches per step."""
        step, read, at = int(trainer.step.numpy()), recorded.get("batches_read"), recorded.get("step")
        if not isinstance(read, int) or not isinstance(at, int):
            return  # on_train_begin counts step x batches per step
        # A checkpoint older than the record's (the newest unreadable): the record's batches per step back to it.
        self.batches_read = max(0, read + (step - at) * recorded.get("batches_read_per_step", 1))
        self.counted_step = step
        self.other_examples = reads_other_examples(trainer, recorded)
        self.batches_read = position_in_new_batches(trainer, self.batches_read, recorded, self.other_examples)

    def on_eval_end(self, trainer, step, logs):
        self.evaluated = (step, logs)  # judged at the save point, after every callback saw the results

    def judge_pending(self) -> None:
        """Judges for best/ the evaluation no save point follows: a finished run's restart that logged its missing
        final evaluation (the weights are that step's, restored)."""
        evaluated, self.evaluated = getattr(self, "evaluated", None), None
        if evaluated is not None and self.checkpointer is not None:
            self.checkpointer.update_best(*evaluated)

    def on_save_point(self, trainer, step, reason):
        self.counted_step = step  # a rollback moved the step back; the data goes on
        if self.checkpointer is None:
            return
        evaluated, self.evaluated = getattr(self, "evaluated", None), None
        if evaluated is not None and reason != "error":  # "error": an evaluation failed; its results are not judged
            self.refuse_missing_best(trainer, *evaluated)
            check = functools.partial(trainer.frozen_watch.check, trainer, step)  # before best/ is written
            if isinstance(trainer.strategy, tf.distribute.MultiWorkerMirroredStrategy):
                check()  # on every worker alike: the chief alone knows whether best/ is written
                check = None
            self.checkpointer.update_best(*evaluated, before_write=check)
        cfg, last_point, self.last_point = trainer.config, self.last_point, step
        if reason in ("end", "signal") and self.saved_step == step and evaluated is None:
            return  # a stop at a loop's save, no evaluation since: nothing new (its callbacks may change state)
        if reason == "loop":
            due = loop_event_due(cfg.checkpoint_every, last_point, step) or (
                cfg.checkpoint_every_secs and time.monotonic() - self.last_save_time >= cfg.checkpoint_every_secs)
            if not due or step >= trainer.total:  # the end saves once, after the final evaluation
                return
        self.save(trainer, step)

    def save(self, trainer, step: int) -> Optional[str]:
        """Saves a checkpoint; non-finite weights end the run (exit 3) instead of a save that is refused.
        With it, the configured constant learning rates (see _keep_configured_settings): written only once
        a checkpoint holds that run's state, and after every worker has read the old record at its start."""
        check_weights_finite(trainer, step)
        trainer.frozen_watch.check(trainer, step)  # a frozen model changed: nothing of this step is saved
        path = self.checkpointer.save(step)
        self.last_save_time, self.saved_step = time.monotonic(), step
        self.last_path = path
        lrs = {name: lr for name, (lr, _) in self.configured.items() if lr is not None}
        if path is not None:  # the chief's save
            record = self._record(trainer)
            single = lrs.get(trainer.default_optimizer) if len(self.configured) == 1 else None
            written = {"lr": single} if single is not None else ({"lrs": lrs} if lrs else {})
            written.update(step=step, batches_read=self._position(trainer, step),  # the data position
                           batches_read_per_step=batches_read_per_step(trainer.config),
                           batch_size=trainer.batch_size, pass_batches=getattr(trainer, "data_pass_batches", None),
                           input_pipelines=input_pipelines(trainer.strategy))  # the workers, each its own shard
            if self.frozen:  # compared on resume: the frozen models are in no checkpoint
                written["frozen"] = self.frozen
            record.with_suffix(".tmp").write_text(json.dumps(written))
            os.replace(record.with_suffix(".tmp"), record)
        return path
