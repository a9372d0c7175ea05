"""The outer loop, as Orbit's controller has it: loops of K steps (one tf.function call each) between
events (log, evaluate, save), signals and preemption. Everything else happens in callbacks."""
from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from typing import Any, Dict, Tuple

import tensorflow as tf
from tensorflow.python.util import deprecation as _tf_deprecation

from trainer import ema, signals, step_functions
from trainer.errors import EXIT_BUG, EXIT_SIGNAL, TrainerError, first_sentence
from trainer.inputs import batches_read_per_step, nothing_to_train
from trainer.xla_measure import measure_first_loop

log = logging.getLogger("trainer.core")


class TrainingInterrupted(TrainerError):
    """SIGTERM/SIGINT arrived; a checkpoint was saved (when a run folder is set) before this is raised.
    Its message is the signal's name; a command exits as a shell reports that signal (143, 130)."""

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(str(self), EXIT_BUG)


class PreemptedAndSaved(TrainingInterrupted):
    """Raised by TF's PreemptionCheckpointHandler (as its exit_fn) once every worker has saved."""


def steps_to_next_event(config, step: int, total: int) -> int:
    k = min(config.steps_per_loop, total - step)
    for every in (config.log_every, config.eval_every, config.checkpoint_every):
        if every:
            k = min(k, every - step % every)
    if config.profile_steps:  # loops end at N-1 and at M: the trace holds steps N..M exactly (callbacks/profiler.py)
        first, last = config.profile_steps
        for end in (first - 1, last):
            if step < end:
                k = min(k, end - step)
    return max(k, 1)


def due(every: int, before: int, step: int) -> bool:
    """An event every `every` steps is due at `step` when a loop from step `before` ended on a multiple of
    it or went past one (a loop that ignores the cuts at events, as the measuring one does, skips none)."""
    return bool(every) and (step % every == 0 or before // every < step // every)


def preemption_handler(trainer):
    """TF's preemption support for multi-worker runs: on SIGTERM to any worker, every worker saves at
    the same step, then raises PreemptedAndSaved. TF decides when; our Checkpointer saves (non-finite
    guard, temporary folders for non-chief workers, retention). TF's handler also wants a checkpoint
    manager, which it restores at once: it gets one over an empty scratch folder, because the
    Checkpointing callback has already restored (with its fallback past unreadable checkpoints)."""
    if trainer.checkpointer is None or not isinstance(trainer.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return None

    def exit_fn():
        raise PreemptedAndSaved("SIGTERM")

    scratch = tempfile.mkdtemp(prefix="trainer-preemption-")
    try:
        handler = tf.distribute.experimental.PreemptionCheckpointHandler(
            trainer.strategy.cluster_resolver,
            tf.train.CheckpointManager(trainer.checkpointer.checkpoint, scratch, max_to_keep=1),
            termination_config=tf.distribute.experimental.TerminationConfig(
                exit_fn=exit_fn, save_fn=lambda step: trainer.checkpointing.save(trainer, step)
            ),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("Multi-worker preemption handling on: SIGTERM to any worker saves a checkpoint on all, then exits")
    return handler


class Loop:
    """Runs one fit() call from `trainer.step` to `total`; returns (train_logs, eval_logs, step)."""

    def __init__(self, trainer, callbacks, make_iterator, eval_data, total: int, request=(None, None), *,
                 iterator=None, ends_run: bool = True):
        self.trainer, self.callbacks, self.eval_data, self.total = trainer, callbacks, eval_data, total
        self.request = request  # fit()'s (steps, epochs): what a call with nothing to train names
        self.make_iterator, self.iterator = make_iterator, iterator
        self.start = self.step = int(trainer.step.numpy())
        self.train_logs: Dict = {}
        self.eval_logs: Dict = {}
        # an iterator given: a fit() traced the train function already, no first loop to time (run_windows)
        self.first_loop_seconds = None if iterator is None else 0.0
        self.window_start, self.window_step = time.perf_counter(), self.step  # the log window's start
        self.ends_run = ends_run  # reaching `total` ends the run (its last train logs); run_windows: it does not
        self.interrupted = signals.SignalCatcher()  # run() makes the one it enters; not entered, it catches nothing
        self.ended = False  # the callbacks' on_train_end ran (a stop by a signal): it runs once

    def run(self) -> Tuple[Dict, Dict, int]:
        t = self.trainer
        sigterm_before = signals.sigterm_handler_outside_deferral()
        preemption = preemption_handler(t)
        # Under multi-worker, TF's PreemptionCheckpointHandler owns SIGTERM (it makes every worker save
        # at the same step); we keep SIGINT. On GCP VMs it does not take SIGTERM (it polls maintenance
        # notices, or is unsupported): SIGTERM keeps its default there, as one worker cannot save alone.
        tf_owns_sigterm = preemption is not None and signals.sigterm_owned_by(preemption)
        caught = (signal.SIGINT,) if preemption is not None else (signal.SIGTERM, signal.SIGINT)
        self.interrupted = signals.SignalCatcher(*caught)
        try:
            self.iterator = self.make_iterator()  # inside: a data error still closes the callbacks
            if tf_owns_sigterm:
                signals.hand_pending_sigterm_to_tensorflow()
            # Signals stay caught until the save they asked for is done: a repeated SIGTERM (a supervisor and
            # the process group both signalling) waits for it instead of killing the process mid-save.
            with self.interrupted:
                try:
                    if self.interrupted.signum is not None:  # arrived during start-up: no step trained, nothing to save
                        raise TrainingInterrupted(signal.Signals(self.interrupted.signum).name)
                    self._train(preemption)
                    self._finish()
                except PreemptedAndSaved:
                    raise
                except TrainingInterrupted as e:
                    self._interrupted(e)
                    raise
        except PreemptedAndSaved as e:
            log.warning("Preemption notice at step %d (%s or the platform's maintenance notice to a worker of this "
                        "run): every worker saved step %d; %s.", self.step, e, self.step, how_to_resume(t))
            self.callbacks.on_train_end(t, {"step": self.step, "interrupted": True})
            raise
        except TrainingInterrupted:  # saved, and said so, above
            raise
        except signals.CommandStopped:  # a command that saves nothing stops (stops_on_signals): a stop, no error
            if not self.ended:  # _interrupted ended the run already when the signal came before the last loop
                try:
                    self.callbacks.on_train_end(t, {"step": self.step, "interrupted": True})
                except Exception:  # noqa: BLE001 - the command stops as the signal asked, without a traceback
                    log.exception("A callback's on_train_end failed while fit() was stopping on a signal")
            raise
        except BaseException as e:  # writers and the progress bar are closed; the error goes on unchanged
            for hook, args in (("on_exception", (e,)),
                               ("on_train_end", ({"step": self.step, "failed": f"{type(e).__name__}: {e}"[:500]},))):
                try:
                    getattr(self.callbacks, hook)(t, *args)
                except Exception:  # noqa: BLE001 - never hide the error that ended the run
                    log.exception("A callback's %s failed while fit() was ending on an error", hook)
            raise
        finally:
            if tf_owns_sigterm:  # TF's handler must not outlive this fit() (it would swallow later SIGTERMs)
                signals.restore_sigterm(sigterm_before)
        return self.train_logs, self.eval_logs, self.step

    def summary(self) -> Dict[str, Any]:
        """What on_train_end gets after a run: the last train logs and the final evaluation's (`eval_*`), the step,
        the traces, retraces (of a function traced before) and functions made anew since the last summary
        (step_functions.since_summary: this call's, and a standalone evaluate()'s before it), the first loop's
        time, trainer.jit_compile=measure's figures and the weights' fingerprints."""
        t = self.trainer
        summary = {**self.train_logs,
                   **{f"eval_{k}": v for k, v in self.eval_logs.items() if k not in ("step", "split")}}
        summary.update(step=self.step, **step_functions.since_summary(t))
        if self.first_loop_seconds is not None:
            summary["first_loop_seconds"] = self.first_loop_seconds
        if t.xla_measurement is not None:
            summary["xla_measurement"] = t.xla_measurement.describe()
        if t.run_dir is not None or t.strategy.extended._in_multi_worker_mode():
            # 0.1-0.2 s per 20M parameters: for runs that write a summary, not for every fit() call.
            summary["weights_sha256"] = t.weights_fingerprint()
            with ema.averaged_weights(t) as averaged:
                if averaged:  # what evaluation and export see
                    summary["ema_weights_sha256"] = t.weights_fingerprint()
        return summary

    def _train(self, preemption) -> None:
        self._evaluate_missing_at_start()
        self.window_start, self.window_step = time.perf_counter(), self.step
        while self.step < self.total and not self.trainer.stop_training:
            self.window(preemption)

    def _evaluate_missing_at_start(self) -> None:
        """A resumed run whose evaluation due at its step is not in the record (it failed: the "error" save of
        _save_before_failing) runs it first: the loop evaluates only at steps it trains to, so none would."""
        t, every = self.trainer, self.trainer.config.eval_every
        if (self.eval_data is None or not self.start or self.start >= self.total or not every or self.start % every
                or isinstance(t.strategy, tf.distribute.MultiWorkerMirroredStrategy)  # the chief alone keeps the record
                or not self.callbacks.eval_missing(self.start)):
            return
        log.info("The evaluation at step %d is missing from the run's record (it failed, or the run was stopped "
                 "during it): evaluating and logging it before training on.", self.start)
        self.eval_logs = t.evaluate(self.eval_data, step=self.start, callbacks=self.callbacks)
        t.checkpointing.judge_pending()  # no save point at this step follows: best/ judges it now

    def window(self, preemption=None) -> None:
        """One window of the loop: the steps to the next event in one call of the train function, then the
        host work after it (the callbacks' on_loop_end: the data position, the divergence and numerics
        guards; the step read back; the preemption check; the train logs when due; evaluation when due; the
        save point; the signal check). The doctor times its configurations through this (run_windows)."""
        t, cfg, callbacks = self.trainer, self.trainer.config, self.callbacks
        before, k = self.step, steps_to_next_event(cfg, self.step, self.total)
        t0 = time.perf_counter()
        done = self._train_loop(k)
        self.step += done
        if self.first_loop_seconds is None:
            self.first_loop_seconds = time.perf_counter() - t0
            log.info("First loop (trace/compile + %d step%s): %.2fs", done, "" if done == 1 else "s",
                     self.first_loop_seconds)
            self.window_start, self.window_step = time.perf_counter(), self.step
        callbacks.on_loop_end(t, self.step)  # the numerics guard last: never save (and exit on) bad weights
        self.step = int(t.step.numpy())  # a rollback (callbacks/divergence.py) moves it back
        if preemption is not None and self.step < self.total:  # at the end, the run finishes instead
            with _tf_deprecation.silence():  # TF calls its own deprecated total_run_calls
                preemption.save_checkpoint_if_preempted(self.step)
        if due(cfg.log_every, before, self.step) or (self.step == self.total and self.ends_run):
            examples = (self.step - self.window_step) * t.batch_size * batches_read_per_step(cfg)
            self.train_logs = t.collect_train_logs(self.step, examples, time.perf_counter() - self.window_start)
            callbacks.on_log(t, self.step, self.train_logs)
            self.step = int(t.step.numpy())  # likewise
            self.window_start, self.window_step = time.perf_counter(), self.step
        paused = time.perf_counter()  # evaluation and saving do not count as training time
        if self.eval_data is not None and due(cfg.eval_every, before, self.step) and self.step < self.total:
            try:
                self.eval_logs = t.evaluate(self.eval_data, step=self.step, callbacks=callbacks)
            except Exception as e:  # an overridden test_step is first traced here: its mistakes end the run
                self._save_before_failing(e, final=False)
                raise
        callbacks.on_save_point(t, self.step, "loop")
        self.window_start += time.perf_counter() - paused
        if self.interrupted.signum is not None and self.step < self.total:
            raise TrainingInterrupted(signal.Signals(self.interrupted.signum).name)

    def _train_loop(self, k: int) -> int:
        """Runs k train steps; returns how many ran. The first loop of a run with trainer.jit_compile=measure
        (or auto, for a long run on a CPU) measures instead (xla_measure.py): its steps are real ones, and events
        (logs, evaluation, checkpoints) that fall inside it wait for its end."""
        measured = measure_first_loop(self.trainer, self.iterator, self.total - self.step)
        if measured is not None:
            return measured
        step_functions.run_train(self.trainer, self.iterator, k)
        return k

    def _finish(self) -> None:
        t = self.trainer
        if self.step == self.start and (self.start >= self.total or t.stop_training):  # no new rows, no new save
            if self.start >= self.total and t.sweep_job:  # a sweep run again to finish its stopped jobs
                log.info("This sweep job is complete (step %d of %d): nothing to train.", self.step, self.total)
            elif self.start >= self.total:  # a finished run started again, or fit(epochs=1) twice (a total)
                log.warning("%s", nothing_to_train(self.step, self.total, *self.request, t.config, t.steps_per_epoch,
                                                   cli=t.from_cli))
                # this Trainer's last, else the run's record of it (a new process), else the keys unmeasured
                self.train_logs = dict(t.last_train_logs) or self.callbacks.logged("train", self.step) or {
                    "step": self.step, "split": "train", "loss": float("nan"), **{m: float("nan") for m in t.metrics}}
            else:  # a run that early stopping ended, say (the callback said why)
                log.info("Stopped at step %d before training a step (a callback set trainer.stop_training at the "
                         "start): nothing trained, no new evaluation row, nothing saved.", self.step)
            if self.eval_data is not None:  # logged only if missing: a run stopped during its final evaluation
                missing = self.start >= self.total and self.callbacks.eval_missing(self.step)
                if missing:
                    log.info("The evaluation at step %d is missing from the run's record (the run was stopped "
                             "during it): evaluating and logging it now.", self.step)
                self.eval_logs = t.evaluate(self.eval_data, step=self.step,
                                            callbacks=self.callbacks if missing else None)
                if missing:
                    t.checkpointing.judge_pending()  # no save point follows: best/ judges it now
            return
        if self.eval_data is not None and self.eval_logs.get("step") != self.step:  # not again after an early stop
            try:
                self.eval_logs = t.evaluate(self.eval_data, step=self.step, callbacks=self.callbacks)
            except Exception as e:
                self._save_before_failing(e, final=True)
                raise
        self.callbacks.on_save_point(t, self.step, "end")

    def _save_before_failing(self, error: Exception, final: bool) -> None:
        """An evaluation failed (an overridden test_step's mistake, found at its first trace; or a callback refused
        its results: a monitor named a log the test_step does not return, say): the steps trained since the last
        checkpoint are saved first, at the end's save point after the `final` one, else at an "error" one."""
        t = self.trainer
        if t.checkpointer is None or self.step == self.start:
            return
        which = "final evaluation" if final else "evaluation"
        try:
            self.callbacks.on_save_point(t, self.step, "end" if final else "error")
        except Exception:  # noqa: BLE001 - the evaluation's error is the one to report
            log.exception("Saving step %d after the %s failed did not work either", self.step, which)
            return
        log.warning("The %s at step %d failed (%s: %s); the trained steps were saved first: %s.", which,
                    self.step, type(error).__name__, first_sentence(str(error)), t.checkpointing.last_path)
        if final and self.interrupted.signum is not None:  # a checkpoint at the last step means the run is complete
            log.warning("Received %s during the last loop: finished the run (final evaluation and save) "
                        "instead of stopping one loop early.", signal.Signals(self.interrupted.signum).name)

    def _interrupted(self, e: TrainingInterrupted) -> None:
        t = self.trainer
        resume = how_to_resume(t)
        if self.step == self.start:
            log.warning("Received %s at step %d, before this run trained a step: nothing new to save; %s.",
                        e, self.step, resume if self.start else "run the same command again to start")
        elif t.checkpointer:
            self.callbacks.on_save_point(t, self.step, "signal")
            log.warning("Received %s at step %d: saved %s; %s", e, self.step, t.checkpointing.last_path if t.is_chief
                        else "it with the other workers (the chief writes the checkpoint)", resume)
        else:
            log.warning("Received %s at step %d: stopping (no run folder, nothing saved).", e, self.step)
        self.ended = True  # a CommandStopped raised after it (SignalCatcher.__exit__) does not end the run again
        self.callbacks.on_train_end(t, {"step": self.step, "interrupted": True})


def run_windows(trainer, iterator, steps: int, callbacks) -> int:
    """`steps` more train steps on `iterator` through the loop's per-window path (Loop.window, with
    `callbacks`: the loop's host work, callbacks.loop_host_callbacks), without fit()'s start and end
    (on_train_begin/end, making the iterator, signal handlers) and without an end of run at the last step (no
    final logs, evaluation or save); returns the steps trained (fewer when a guard stopped training). What the doctor
    times: the host work a run pays between windows is in the time, not only the compiled steps."""
    start = int(trainer.step.numpy())
    loop = Loop(trainer, callbacks, None, None, start + steps, iterator=iterator, ends_run=False)
    while loop.step < loop.total and not trainer.stop_training:
        loop.window()
    return loop.step - start


def run_steps(trainer, kept, num_steps: int, host_work=None) -> int:
    """Trainer.run_steps: `num_steps` more steps on `kept`, the last fit() call's kept iterator (its
    position moves on), through the loop's windows with `host_work` (a CallbackList) when given, else the
    compiled loop alone; returns the steps trained."""
    loop = host_work is not None
    if kept is None or kept.iterator is None or not step_functions.has_train_function(trainer):
        raise RuntimeError("Trainer.run_steps continues a fit() call: call fit() first")
    if loop and trainer.run_dir is not None:
        raise RuntimeError("Trainer.run_steps(loop=True) is for a Trainer without a run folder: the loop's "
                           "loggers and checkpoints closed at the end of fit()")
    trainer.stop_training = False  # a stop of the last fit() call ended that call, not these steps
    if loop:
        done = run_windows(trainer, kept.iterator, num_steps, host_work)
    else:
        step_functions.run_train(trainer, kept.iterator, num_steps)
        done = num_steps
        trainer.checkpointing.count_steps(trainer, int(trainer.step.numpy()))  # the data position goes on
    kept.step += done
    return done


def how_to_resume(trainer) -> str:
    """The CLI gives the exact command (trainer.resume_command: in a worker of python -m trainer.launch, the
    launcher's); from Python, the run folder resumes. Said by the chief: a multi-worker run's others point to it."""
    if not trainer.is_chief:
        return "the chief (worker 0) says how to resume"
    if trainer.resume_command:
        return f"to resume, run: {trainer.resume_command}"
    return (f"to resume, call fit() on a Trainer built as this one with run_dir={str(trainer.run_dir)!r} "
            "(Trainer(run_dir=...) resumes from the newest checkpoint in the folder)")
