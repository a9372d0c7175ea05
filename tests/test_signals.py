"""Signals at the end of a run (trainer/signals.py): during the final evaluation, the final save and the
summary. The signals while training and at start-up are in test_checkpoint.py and test_faults.py."""
import json
import os
import signal
import time

import keras
import pytest

from conftest import blobs, read_metrics
from trainer import Callback, Trainer
from trainer.checkpoint import list_checkpoints


def _make(run_dir, callbacks=()):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                   keras.layers.Dense(2, dtype="float32")]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=run_dir, progress_bar=False,
                   eval_every=10, steps_per_loop=5, checkpoint_every=10, callbacks=list(callbacks))


class TermAt(Callback):
    """Sends SIGTERM to this process at the final evaluation's start, the final save and the run's end."""

    def __init__(self, hooks):
        self.hooks = hooks

    def _term(self, hook):
        if hook in self.hooks:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_eval_begin(self, trainer, step):
        if step == 20:
            self._term("eval")

    def on_save_point(self, trainer, step, reason):
        if reason == "end":
            self._term("save")

    def on_train_end(self, trainer, logs):
        self._term("end")


def test_sigterm_during_the_final_evaluation_save_and_summary_is_said_and_the_run_completes(tmp_path, caplog):
    """A SIGTERM during the final evaluation or save was absorbed without a word, and a further one during
    the summary (the loggers' ends) killed the process: the run now finishes, says so, and none of them
    reaches the handler outside fit(); the run folder holds the complete run."""
    outside = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    try:
        with caplog.at_level("WARNING", logger="trainer"):
            trainer = _make(tmp_path, [TermAt({"eval", "save", "end"})])
            trainer.fit(blobs(), blobs(), steps=20)  # no TrainingInterrupted: the run is complete
    finally:
        signal.signal(signal.SIGTERM, before)
    assert outside == []
    assert "Received SIGTERM during the last loop of steps, the final evaluation" in caplog.text
    assert caplog.text.count("SIGTERM again: finishing the save (or the run's end)") == 2  # at the save, at the end
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20]
    assert list_checkpoints(tmp_path / "checkpoints")[0][0] == 20
    again = _make(tmp_path)
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        again.fit(blobs(), blobs(), steps=20)
    assert "already at step 20" in caplog.text
    assert again.weights_fingerprint() == trainer.weights_fingerprint()


def test_a_sigterm_at_the_end_of_a_sweep_job_stops_the_sweep(tmp_path):
    """A SIGTERM during a multirun job's summary let the job finish (it is complete), then Hydra started the
    next job: the sweep now stops there with exit 143."""
    from conftest import TINY, run_cli

    result = run_cli("-m", *TINY, "trainer.max_steps=20,40", "+callbacks.term._target_=test_signals.TermAt",
                     "+callbacks.term.hooks=[end]", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 143, (result.stdout + result.stderr)[-3000:]
    assert "job complete; sweep stopped (exit 143)" in result.stdout + result.stderr
    (job,) = [p for p in tmp_path.iterdir() if p.is_dir()]  # the second job (max_steps=40) never started
    assert job.name.startswith("0_") and list_checkpoints(job / "checkpoints")[0][0] == 20


class TermInSummary(Trainer):
    """Sends SIGTERM to this process while fit() computes the summary's weights fingerprint (after the loop)."""

    def weights_fingerprint(self) -> str:
        if not getattr(self, "termed", False):
            self.termed = True
            os.kill(os.getpid(), signal.SIGTERM)
        return super().weights_fingerprint()


def test_a_sigterm_between_the_loop_and_the_summary_waits_for_the_run_end(tmp_path):
    """Between the training loop and the loggers' ends (the weights fingerprint, 0.1-0.2 s per 20M parameters)
    SIGTERM had the handler from outside fit() again (the default one kills the process before MLflow's run
    end is written): it now waits for the summary, as one during the loggers' ends does."""
    outside = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    try:
        trainer = TermInSummary(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, progress_bar=False)
        trainer.fit(blobs(), steps=10)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert trainer.termed and outside == []
    assert list_checkpoints(tmp_path / "checkpoints")[0][0] == 10


class FailFinalEval(Callback):
    """Ends the run during its final evaluation, as a peer lost there did (the trained steps are saved first)."""

    def on_eval_begin(self, trainer, step):
        if step == 20:
            raise RuntimeError("peer lost during the final evaluation")


def test_a_run_stopped_during_its_final_evaluation_logs_it_when_started_again(tmp_path, caplog):
    """Stopped during the final evaluation (after the save of its last step), the run started again said
    "nothing to train" and printed a final eval that metrics.jsonl never got: it now logs it, once."""
    try:
        _make(tmp_path, [FailFinalEval()]).fit(blobs(), blobs(), steps=20)
    except RuntimeError:
        pass
    assert list_checkpoints(tmp_path / "checkpoints")[0][0] == 20
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10]
    with caplog.at_level("INFO", logger="trainer"):
        _make(tmp_path).fit(blobs(), blobs(), steps=20)
    assert "already at step 20" in caplog.text and "evaluating and logging it now" in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20]
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer"):
        _make(tmp_path).fit(blobs(), blobs(), steps=20)  # the row is there now: not logged again
    assert "already at step 20" in caplog.text and "evaluating and logging it now" not in caplog.text
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20]


def test_the_final_evaluation_logged_by_a_restart_is_judged_for_best(tmp_path):
    """The evaluation a restart logs (its record lacked it) has no save point after it: it is judged for best/ at
    once (the weights are that step's), and never later against other weights."""
    def make(callbacks=()):
        return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, progress_bar=False, eval_every=10,
                       checkpoint_every=10, best_metric="loss", best_mode="min", keep_best=5, callbacks=list(callbacks))
    try:
        make([FailFinalEval()]).fit(blobs(), blobs(), steps=20)
    except RuntimeError:
        pass
    best = tmp_path / "checkpoints" / "best" / "best.json"
    assert [e["step"] for e in json.loads(best.read_text())] == [10]
    again = make()
    again.fit(blobs(), blobs(), steps=20)
    assert sorted(e["step"] for e in json.loads(best.read_text())) == [10, 20]
    again.fit(blobs(), blobs(), steps=30)  # a later fit of the same Trainer: step 20's logs are not judged again
    steps = [e["step"] for e in json.loads(best.read_text())]
    assert sorted(steps) == sorted(set(steps)) and 30 in steps


class SignalAtTheEnd(Callback):
    """Sends `signum` to this process at the run's final save point (a fit() of one loop: its last one)."""

    def __init__(self, signum):
        self.signum = signum

    def on_save_point(self, trainer, step, reason):
        if reason == "end":
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_command_that_saves_nothing_stops_on_a_signal_its_trainers_fit_received(signum, capsys, monkeypatch):
    """The doctor's Trainers took a signal for theirs: their fit(steps=1) finished "despite" it, and the doctor
    ran on to a normal report and exit 0. A command decorated with stops_on_signals now stops once that fit()
    returns: one line naming the signal, exit 143 / 130, nothing after it runs."""
    from trainer import iterator_release
    from trainer.signals import stops_on_signals

    monkeypatch.setattr(iterator_release, "_exit_code", None)  # the command's exit code: not this test process's
    reached = []

    @stops_on_signals("nothing written")
    def command():
        _make(None, [SignalAtTheEnd(signum)]).fit(blobs(), steps=1)
        reached.append("after fit")
        return 0

    before = {s: signal.signal(s, h) for s, h in ((signal.SIGTERM, signal.SIG_DFL),
                                                  (signal.SIGINT, signal.default_int_handler))}
    try:
        assert command() == 128 + signum
        after = {s: signal.getsignal(s) for s in before}
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert reached == []
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == f"stopped by {signal.Signals(signum).name}: nothing written"
    assert after == {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}


class SignalAtLoop(Callback):
    """Sends SIGTERM to this process at the end of the loop of `step`; records the run's ends and errors."""

    def __init__(self, step):
        self.step, self.ends, self.errors = step, [], []

    def on_loop_end(self, trainer, step):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, error):
        self.errors.append(repr(error))

    def on_train_end(self, trainer, summary):
        self.ends.append({k: summary[k] for k in ("step", "interrupted", "failed") if k in summary})


@pytest.mark.parametrize("at_step", [5, 20], ids=["before_the_last_loop", "in_the_last_loop"])
def test_a_command_stopped_by_a_signal_ends_its_trainers_run_once(at_step, capsys, monkeypatch):
    """The doctor's Trainer, signalled before its last loop, ran on_train_end twice: once as the loop stopped
    ("interrupted"), then again, as "failed" with on_exception, when the command's stop (CommandStopped) left fit().
    Its callbacks (a logger closing its files) now see one end, interrupted, and no error, wherever the signal
    lands; the command stops as before (exit 143)."""
    from trainer import iterator_release
    from trainer.signals import stops_on_signals

    monkeypatch.setattr(iterator_release, "_exit_code", None)
    spy = SignalAtLoop(at_step)

    @stops_on_signals("nothing written")
    def command():
        _make(None, [spy]).fit(blobs(), steps=20)  # loops of 5 steps
        return 0

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert command() == 143
    finally:
        signal.signal(signal.SIGTERM, before)
    assert spy.ends == [{"step": at_step, "interrupted": True}] and spy.errors == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by SIGTERM: nothing written"


def test_a_signal_after_a_command_wrote_its_results_says_what_was_written(capsys, monkeypatch):
    """The doctor's report (or lr_find's json) on disk, a signal during what follows (--set-auto, the plot) says
    that, not "wrote no report"; the next command starts from its own message again."""
    from trainer import iterator_release
    from trainer.signals import now_kept, stops_on_signals

    monkeypatch.setattr(iterator_release, "_exit_code", None)

    @stops_on_signals("nothing written")
    def command(written: bool):
        if written:
            now_kept("the report was written")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in the main thread at once
        return 0

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert command(True) == 143
        assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by SIGTERM: the report was written"
        assert command(False) == 143
        assert capsys.readouterr().err.strip().splitlines()[-1] == "stopped by SIGTERM: nothing written"
    finally:
        signal.signal(signal.SIGTERM, before)
