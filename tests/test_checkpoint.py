"""Never lose work: resume, crash safety, exactly-once data, bit-identical resume, retention, warm start, export."""
import logging
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, WAIT_LIMIT_S, blobs, read_metrics, run_cli, wait_until
from trainer import Callback, Trainer, TrainingInterrupted, warm_start
from trainer.checkpoint import list_checkpoints

WORKER = Path(__file__).parent / "workers" / "ids_worker.py"
STEPS_PER_EPOCH = 12


def start_worker(run_dir, log, steps, every=5):
    with open(log, "a") as f:
        f.write("START\n")
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(run_dir), str(log), str(steps), str(every)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def parse_log(log):
    """[(segment, step, ids)] in the order the steps ran; a segment per process start. A last line
    still being written (no newline yet) is left out."""
    rows, segment = [], -1
    text = Path(log).read_text()
    for line in text.splitlines()[: None if text.endswith("\n") else -1]:
        if line == "START":
            segment += 1
            continue
        step, ids = line.split(" ", 1)
        rows.append((segment, int(step), [int(i) for i in ids.strip("[]").split()]))
    return rows


def check_exactly_once(rows, total):
    final = {}
    for _, step, ids in rows:
        final[step] = ids  # a step redone after a kill: the last run of it is the one that counts
    assert sorted(final) == list(range(total))
    for epoch in range(total // STEPS_PER_EPOCH):
        seen = [i for s in range(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH) for i in final[s]]
        assert sorted(seen) == list(range(96)), f"epoch {epoch}: ids not seen exactly once"


@pytest.mark.slow
def test_exactly_once_data_across_kill_resume_cycles(tmp_path):
    """Several SIGKILLs at chosen steps: every id is still seen exactly once per epoch."""
    log = tmp_path / "ids.log"
    total = 48
    for segment, stop_after in enumerate((7, 19, 30)):
        proc = start_worker(tmp_path, log, total)
        while True:  # wait until this process has logged the step we want to kill it after
            time.sleep(0.05)
            if any(seg == segment and s >= stop_after for seg, s, _ in parse_log(log)):
                break
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = start_worker(tmp_path, log, total)
    assert final.wait(timeout=300) == 0, final.stderr.read()[-2000:]
    rows = parse_log(log)
    check_exactly_once(rows, total)
    first_steps = [next(s for seg, s, _ in rows if seg == k) for k in range(4)]
    assert first_steps[0] == 0 and all(s > 0 and s % 5 == 0 for s in first_steps[1:])  # resumed, not restarted


@pytest.mark.slow
def test_random_kills_including_inside_save_always_resume(tmp_path):
    """Six SIGKILLs at random moments of training (saves every 2 steps, so some land inside a save)."""
    log = tmp_path / "ids.log"
    kills, total, every, most_per_process = 6, 240, 2, 30  # six processes of <= 31 steps cannot finish 240
    rng = random.Random(0)
    for segment in range(kills):
        proc = start_worker(tmp_path, log, total, every)
        # Kill at a random moment after this process's first step (its startup is not the interesting
        # part), or once it has trained `most_per_process` steps, so that all kills fit in `total`.
        deadline = None
        while True:
            time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            steps = [s for seg, s, _ in parse_log(log) if seg == segment]
            if steps and deadline is None:
                deadline = time.time() + rng.uniform(0.0, 1.5)
            if deadline is not None and (time.time() >= deadline or steps[-1] - steps[0] >= most_per_process):
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start_worker(tmp_path, log, total, every)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    rows = parse_log(log)
    assert sorted({seg for seg, _, _ in rows}) == list(range(kills + 1))  # the killed processes, then the finisher
    check_exactly_once(rows, total)
    # At most `every` steps were lost per kill: a new process starts within `every` of where the last stopped.
    last_step_of, first_step_of = {}, {}
    for seg, step, _ in rows:
        last_step_of[seg] = step
        first_step_of.setdefault(seg, step)
    for seg in range(1, max(first_step_of) + 1):
        if seg in first_step_of and seg - 1 in last_step_of:
            assert last_step_of[seg - 1] + 1 - first_step_of[seg] <= every


def _kill_when(proc, path_glob: str, folder: Path):
    wait_until(lambda: list(folder.glob(path_glob)), proc, f"{path_glob} appeared (to kill it then)")
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _checkpoint_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k != "_CHECKPOINTABLE_OBJECT_GRAPH" and "save_counter" not in k}


@pytest.mark.slow
def test_sigkill_resume_is_bit_identical_in_deterministic_mode(tmp_path):
    """The acceptance test: SIGKILL `python -m trainer` mid-run, rerun: same final weights and metrics."""
    args = [
        "trainer.max_steps=240", "trainer.checkpoint_every=40", "trainer.log_every=40", "trainer.eval_every=120",
        "trainer.deterministic=true", "trainer.progress_bar=false", "data.batch_size=64",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_cli(*args, f"hydra.run.dir={straight}").returncode == 0

    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args, f"hydra.run.dir={resumed}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _kill_when(proc, "ckpt-80.index", resumed / "checkpoints")
    again = run_cli(*args, f"hydra.run.dir={resumed}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming from" in again.stdout + again.stderr

    a, b = (_checkpoint_tensors(str(straight / "checkpoints" / "ckpt-240")),
            _checkpoint_tensors(str(resumed / "checkpoints" / "ckpt-240")))
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs"
    final = lambda d: [r for r in read_metrics(d) if r["split"] == "eval"][-1]
    fa, fb = final(straight), final(resumed)
    assert (fa["loss"], fa["accuracy"]) == (fb["loss"], fb["accuracy"])


@pytest.mark.slow  # the default stage: tests/test_cli.py's SIGTERM to a real process (exit 143, saved, the printed
# command resumes it); in process, test_sigterm_in_the_last_loop_finishes_the_run and the SIGTERM tests below
@pytest.mark.parametrize("signum, code", [pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
                                          pytest.param(signal.SIGINT, 130, id="SIGINT")])
def test_a_signal_saves_and_exits_143_or_130_then_resumes(tmp_path, signum, code):
    """The real process: a signal while training saves a checkpoint, exits 143 (SIGTERM) or 130 (SIGINT)."""
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.progress_bar=false",
            "data.batch_size=32", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_until(lambda: (run_dir / "metrics.jsonl").exists(), proc, "training started (first log at step 100)")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    assert proc.returncode == code, err[-2000:]
    assert f"Received {signal.Signals(signum).name}" in out + err
    found = list_checkpoints(run_dir / "checkpoints")
    assert found and found[0][0] >= 100
    resumed = run_cli(*[a if not a.startswith("trainer.max_steps") else f"trainer.max_steps={found[0][0] + 10}"
                        for a in args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"step {found[0][0]})" in resumed.stdout + resumed.stderr


def test_sigterm_in_the_last_loop_finishes_the_run(tmp_path):
    """A signal during the last loop finishes the run (final eval, best, save) instead of saving the last
    step as if interrupted, which a restart would then find complete and never evaluate."""
    import os

    class TermAtTheEnd(Callback):
        def on_loop_end(self, trainer, step):
            if step == 20:
                os.kill(os.getpid(), signal.SIGTERM)

    trainer = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                      run_dir=tmp_path, progress_bar=False, eval_every=10, steps_per_loop=5, checkpoint_every=10,
                      callbacks=[TermAtTheEnd()])
    trainer.fit(blobs(), blobs(), steps=20)  # no TrainingInterrupted
    assert [r["step"] for r in read_metrics(tmp_path) if r["split"] == "eval"] == [10, 20]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][0] == 20


def test_sigterm_from_python_names_the_folder_that_resumes(tmp_path, caplog):
    """No command line to print from Python: the message names the run folder and how it resumes."""
    import os

    class TermAt(Callback):
        def on_loop_end(self, trainer, step):
            if step == 10:
                os.kill(os.getpid(), signal.SIGTERM)

    make = lambda callbacks: Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),  # noqa: E731
                                     optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, progress_bar=False,
                                     steps_per_loop=5, checkpoint_every=100, callbacks=callbacks)
    with caplog.at_level("WARNING", logger="trainer"), pytest.raises(TrainingInterrupted):
        make([TermAt()]).fit(blobs(), steps=20)
    assert f"to resume, call fit() on a Trainer built as this one with run_dir={str(tmp_path)!r}" in caplog.text
    assert "to resume, run:" not in caplog.text
    assert make([]).fit(blobs(), steps=20) is not None and read_metrics(tmp_path)[-1]["step"] == 20


@pytest.mark.slow  # the default stage: the next test (a SIGTERM deferred until training is honoured by the loop
# before any step, a second one ends a real process) and test_cli.py's SIGTERM to a real CLI run
def test_sigterm_during_start_up_stops_before_the_first_step(tmp_path):
    """The CLI remembers a SIGTERM that arrives between the strategy and the loop (here: while it loads
    data and builds the model): the run stops before its first step, exit 143, nothing written."""
    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.progress_bar=false",
            f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    log = run_dir / "trainer.log"
    wait_until(lambda: log.exists() and "Hardware:" in log.read_text(), proc, "the deferral is on (Hardware: logged)",
               poll=0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    text = log.read_text()
    assert "SIGTERM during start-up" in text and "before this run trained a step" in text and "First loop" not in text
    assert list_checkpoints(run_dir / "checkpoints") == []


def test_sigterm_after_the_folder_is_made_and_before_the_deferral_leaves_no_folder(tmp_path):
    """A SIGTERM between Hydra making the run folder and the start-up deferral (trainer.signals) killed the process
    with an empty folder and an empty trainer.log left behind: the folder goes, the process dies of the signal."""
    run_dir = tmp_path / "run"
    script = (
        "import os, signal, sys\n"
        "import trainer.cli as cli\n"
        "def term(*args):\n"
        "    assert os.path.isdir(sys.argv[-1].split('=', 1)[1])\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "cli.run_length_of_command_line = term\n"
        "cli.main()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *TINY, f"hydra.run.dir={run_dir}"], capture_output=True,
                          text=True, timeout=WAIT_LIMIT_S, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert f"SIGTERM during start-up: removed the run folder {run_dir} this run had made" in done.stderr
    assert not run_dir.exists()


def test_sigterm_before_fit_is_honoured_by_the_loop_and_a_second_stops_at_once(tmp_path):
    from trainer.signals import sigterm_deferred_until_training, take_pending_sigterm
    from trainer import TrainingInterrupted

    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1),
                      run_dir=tmp_path / "run", progress_bar=False, steps_per_loop=3, tensorboard=False)
    trainer.fit(blobs(), steps=3)  # ckpt-3
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_deferred_until_training():
        signal.raise_signal(signal.SIGTERM)  # remembered: this process lives on
        with pytest.raises(TrainingInterrupted, match="SIGTERM"):
            trainer.fit(blobs(), steps=30)
        assert int(trainer.step.numpy()) == 3 and not take_pending_sigterm()  # no step trained; the loop took it
        assert signal.getsignal(signal.SIGTERM) is before  # the deferral ended when the loop took SIGTERM
    assert [step for step, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [3]
    code = subprocess.run([sys.executable, "-c", (
        "import os, signal, time\n"
        "from trainer.signals import sigterm_deferred_until_training\n"
        "with sigterm_deferred_until_training():\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.1); print('alive', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5); print('not reached')\n"
    )], capture_output=True, text=True, timeout=120)
    assert code.returncode == -signal.SIGTERM and code.stdout.strip() == "alive", code.stdout + code.stderr


def test_corrupt_newest_checkpoint_falls_back_and_unreadable_is_an_error(tmp_path):
    run_dir = tmp_path / "run"
    base = [*TINY, f"hydra.run.dir={run_dir}"]
    assert run_cli(*base).returncode == 0  # checkpoints at 20 and 40
    data_file = next((run_dir / "checkpoints").glob("ckpt-40.data-*"))
    data_file.write_bytes(data_file.read_bytes()[:100])  # truncated, as by a crash mid-write
    result = run_cli(*base, "trainer.max_steps=60")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout + result.stderr
    assert "unreadable" in out and "Resuming from" in out and "ckpt-20" in out
    assert (run_dir / "checkpoints" / "ckpt-60.index").exists()

    for f in (run_dir / "checkpoints").glob("ckpt-*.data-*"):
        f.write_bytes(b"garbage")
    before = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir() if p.is_file()}
    broken = run_cli(*base, "trainer.max_steps=80")
    assert broken.returncode == 2
    assert "none is readable" in broken.stdout + broken.stderr
    assert {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir() if p.is_file()} == before


def test_changed_model_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run_dir}").returncode == 0
    record = {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()}
    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.max_steps=60", "model.hidden_units=[64]")
    assert result.returncode == 2
    assert "does not fit this model" in result.stdout + result.stderr
    # The run's record of its config (export rebuilds the model from it) is left as it was.
    assert {p.name: p.read_text() for p in (run_dir / ".hydra").iterdir()} == record
    assert sorted(record) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    result = run_cli(*TINY, f"hydra.run.dir={run_dir}", "trainer.max_steps=60", "optimizer=sgd")
    assert result.returncode == 2
    assert "does not fit this optimizer" in result.stdout + result.stderr
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [40, 20]  # left as they were


def _net(classes=2):
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                     keras.layers.Dense(classes, dtype="float32")])


def test_keep_last_n_and_best_k(tmp_path):
    trainer = Trainer(
        model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(0.1),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], run_dir=tmp_path, progress_bar=False,
        checkpoint_every=5, keep_checkpoints=2, eval_every=5, keep_best=2, best_metric="loss", best_mode="min",
        log_every=5,
    )
    trainer.fit(blobs(), blobs(), steps=30)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [30, 25]
    evals = [r for r in read_metrics(tmp_path) if r["split"] == "eval"]
    best_two = sorted(evals, key=lambda r: r["loss"])[:2]
    index = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    assert [e["step"] for e in index] == [r["step"] for r in best_two]
    assert (sorted(p.name for p in (tmp_path / "checkpoints" / "best").glob("*.index"))
            == sorted(f"ckpt-{r['step']}.index" for r in best_two))
    assert float(trainer.best.numpy()) == pytest.approx(best_two[0]["loss"])


def test_resume_takes_the_configured_learning_rate_and_fixed_loss_scale(tmp_path):
    """Resuming with a new constant lr (or a new fixed loss scale) uses it, not the checkpoint's value."""
    from trainer import PrecisionConfig

    def trainer(lr, precision, run_dir):
        return Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.Adam(lr), precision=precision, run_dir=run_dir,
                       progress_bar=False, jit_compile=False)

    for run_dir in (tmp_path / "fixed", tmp_path / "dynamic"):
        trainer(1e-3, "float32", run_dir).fit(blobs(), steps=5)
    try:
        resumed = trainer(1e-5, PrecisionConfig(policy="mixed_float16", loss_scale=1024.0), tmp_path / "fixed")
        resumed.fit(blobs(), steps=10)
        # A dynamic scale keeps its saved value, except float32's 1: it restarts at its initial value.
        dynamic = trainer(1e-3, PrecisionConfig(policy="mixed_float16", initial_scale=256.0), tmp_path / "dynamic")
        dynamic.fit(blobs(), steps=6)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert float(resumed.optimizer.learning_rate) == pytest.approx(1e-5)
    assert float(resumed.loss_scale.scale.numpy()) == 1024.0
    assert int(resumed.step.numpy()) == 10
    assert float(dynamic.loss_scale.scale.numpy()) == 256.0 and int(dynamic.step.numpy()) == 6

    # A rate a callback set during the run is state, not configuration: the same config keeps it.
    class Lower(Callback):
        def on_loop_end(self, trainer, step):
            if step == 3:
                trainer.optimizer.learning_rate = 1e-4

    lowered = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-3), run_dir=tmp_path / "callback", progress_bar=False,
                      callbacks=[Lower()])
    lowered.fit(blobs(), steps=5)
    again = trainer(1e-3, "float32", tmp_path / "callback")
    again.fit(blobs(), steps=8)
    assert float(again.optimizer.learning_rate) == pytest.approx(1e-4)

    # A run that changed the rate but stopped before saving anything: the next start still applies it.
    class FailAtStart(Callback):
        def on_train_begin(self, trainer):
            raise RuntimeError("stopped before the first save")

    failed = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path / "callback", progress_bar=False,
                     callbacks=[FailAtStart()])
    with pytest.raises(RuntimeError, match="before the first save"):
        failed.fit(blobs(), steps=10)
    changed = trainer(1e-2, "float32", tmp_path / "callback")
    changed.fit(blobs(), steps=10)
    assert float(changed.optimizer.learning_rate) == pytest.approx(1e-2)


def test_init_from_reports_restored_missing_mismatched(tmp_path):
    source = Trainer(model=_net(2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                     optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path / "a", progress_bar=False)
    source.fit(blobs(), steps=10)
    target = _net(3)()  # same backbone, a new head of another shape
    report = warm_start(target, str(tmp_path / "a"))
    assert len(report["restored"]) == 2 and len(report["mismatched"]) == 2 and not report["missing"]
    np.testing.assert_array_equal(target.layers[0].kernel.numpy(), source.model.layers[0].kernel.numpy())

    # Through the trainer: init_from loads weights only, the step starts at 0.
    tuned = Trainer(model=_net(2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    optimizer=lambda: keras.optimizers.SGD(0.0), run_dir=tmp_path / "b", progress_bar=False,
                    init_from=str(tmp_path / "a" / "checkpoints"))
    tuned.fit(blobs(), steps=1)
    assert int(tuned.step.numpy()) == 1
    np.testing.assert_array_equal(tuned.model.layers[1].kernel.numpy(), source.model.layers[1].kernel.numpy())


def test_a_warm_start_that_restores_under_half_of_the_model_is_a_warning_naming_the_mismatched(tmp_path, caplog):
    """init_from a run of another width: 1 of 4 variables loaded, at INFO before, and exit 0."""
    def net(width):
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, name="hidden"),
                                 keras.layers.Dense(2, name="head")])

    Trainer(model=lambda: net(8), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path / "a",
            progress_bar=False).fit(blobs(), steps=2)
    caplog.set_level(logging.INFO, logger="trainer.load_weights")
    warm_start(net(16), str(tmp_path / "a"))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "restored 1 variables" in warned[0].getMessage()
    assert "hidden/kernel [4, 8] vs [4, 16]" in warned[0].getMessage()  # by its layer: not _operations/1/_kernel
    assert "_operations" not in warned[0].getMessage()
    assert ("Only 1 of this model's 4 variables loaded: the others keep their initial values, as if untrained; the "
            "checkpoint's model has other shapes") in warned[0].getMessage()
    assert f"or drop warm_start(model, {str(tmp_path / 'a')!r}) to train from scratch" in warned[0].getMessage()
    caplog.clear()
    warm_start(net(8), str(tmp_path / "a"))  # all of it: INFO, as before
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # export/evaluate's restore ("Loading weights") refuses any gap after this line: no warm-start advice before it
    warm_start(net(16), str(tmp_path / "a"), purpose="Loading weights")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    # from Python, the fix names the Trainer's argument
    Trainer(model=lambda: net(16), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.SGD(0.1), init_from=tmp_path / "a", progress_bar=False,
            verbose=False).fit(blobs(), steps=1)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "or drop Trainer(init_from=...) to train from scratch" in warned[0], warned


def test_init_from_nonexistent_path_is_a_clear_error(tmp_path):
    result = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"trainer.init_from={tmp_path / 'nope'}")
    assert result.returncode == 2 and "trainer.init_from" in result.stdout + result.stderr


def test_export_saved_model_and_keras_predict_like_the_trained_model(tmp_path):
    run_dir = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run_dir}").returncode == 0
    saved, keras_out = tmp_path / "saved", tmp_path / "keras"
    r1 = run_cli(str(run_dir), "--format", "saved_model", "--out", str(saved), module="trainer.export")
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = run_cli(str(run_dir), "--format", "keras", "--out", str(keras_out), module="trainer.export")
    assert r2.returncode == 0, r2.stderr[-2000:]
    refused = run_cli(str(run_dir), "--format", "keras", "--out", str(keras_out), module="trainer.export")
    assert refused.returncode == 2 and "not empty" in refused.stderr

    from trainer.export import load_trained_model

    model, sample = load_trained_model(str(run_dir))
    expected = model(sample, training=False).numpy()
    loaded = tf.saved_model.load(str(saved))  # keep a reference: its variables live as long as it does
    served = loaded.serve(sample).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)
    reloaded = keras.saving.load_model(keras_out / "model.keras")
    np.testing.assert_allclose(reloaded(sample).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_a_best_metric_the_eval_does_not_report_is_a_warning(tmp_path, caplog):
    """The default, `accuracy`, on a model whose metric has another name: not asked for, so a warning (once)."""
    trainer = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), metrics=[keras.metrics.SparseCategoricalAccuracy()],
                      run_dir=tmp_path, progress_bar=False, eval_every=5)  # the default best_metric
    with caplog.at_level("WARNING", logger="trainer"):
        trainer.fit(blobs(), blobs(), steps=10)
    warnings = [r.getMessage() for r in caplog.records if "best_metric" in r.getMessage()]
    assert len(warnings) == 1 and "sparse_categorical_accuracy" in warnings[0]  # once, naming what there is
    assert not (tmp_path / "checkpoints" / "best").exists()


def test_a_misspelt_best_metric_is_an_error_before_training_not_a_warning_after(tmp_path, caplog):
    """A best_metric no eval result has (a typo) stops the run before the first step, naming the results and the
    close spelling (it was a warning after the first evaluation: with eval_every=0, the run's end). An
    overridden test_step's names are known once it runs: at its first evaluation the same error, after that
    step is saved (nothing trained is lost). The CLI exits 2."""
    from trainer.config import ConfigError

    def make(run_dir, **options):
        return Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1),
                       metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()}, run_dir=run_dir,
                       progress_bar=False, eval_every=0, checkpoint_every=5, **options)

    trainer = make(tmp_path / "py", best_metric="acuracy")
    with pytest.raises(ConfigError, match=r"Trainer\(best_metric='acuracy'\) is not among the eval results "
                                          r"\['accuracy', 'loss'\] \(did you mean 'accuracy'\?\)"):
        trainer.fit(blobs(), blobs(), steps=10)
    assert int(trainer.step.numpy()) == 0 and not list_checkpoints(tmp_path / "py" / "checkpoints")
    with pytest.raises(ConfigError, match=r"\['val/accuracy', 'val/loss', 'ood/accuracy', 'ood/loss'\] "
                                          r"\(did you mean 'val/accuracy'\?\)"):
        make(tmp_path / "sets", best_metric="acuracy").fit(blobs(), {"val": blobs(), "ood": blobs()}, steps=10)

    class Scored(Trainer):
        def test_step(self, data):
            x, y = data
            predicted = tf.argmax(self.model(x, training=False), axis=-1, output_type=tf.int32)
            return {"score": tf.reduce_mean(tf.cast(predicted == y, tf.float32))}

    scored = Scored(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path / "scored", progress_bar=False,
                    eval_every=4, checkpoint_every=100, best_metric="scor", best_mode="max")  # auto: cannot judge
    with pytest.raises(ConfigError, match=r"^Trainer\(best_metric='scor'\) is not among the eval results "
                                          r"\['score'\] \(did you mean 'score'\?\).* Step 4 is saved"):
        scored.fit(blobs(), blobs(), steps=10)
    assert [s for s, _ in list_checkpoints(tmp_path / "scored" / "checkpoints")] == [4]  # saved, then stopped

    run_dir = tmp_path / "cli"
    result = run_cli(*TINY, "trainer.best_metric=acuracy", f"hydra.run.dir={run_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "did you mean 'accuracy'" in output and "Traceback" not in output
    assert not run_dir.exists()  # a failed start leaves no run folder (nothing was trained)

    # trainer.best_metric=accuracy given on the command line is asked for, as Trainer(best_metric="accuracy") is:
    # on a model without that metric an error, not the default's switch to ranking by the eval loss
    result = run_cli(*TINY, "~metrics.accuracy", "trainer.best_metric=accuracy", f"hydra.run.dir={run_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "trainer.best_metric='accuracy' is not among the eval results ['loss']" in output
    assert "ranked by the eval loss" not in output and not run_dir.exists()


def _best_of(run_dir):
    return json.loads((Path(run_dir) / "checkpoints" / "best" / "best.json").read_text())[0]


def _evals(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "eval"]


def _ranked(run_dir, **options):
    trainer = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], run_dir=run_dir,
                      progress_bar=False, tensorboard=False, verbose=False, eval_every=5, log_every=5,
                      checkpoint_every=5, keep_best=1, **options)
    return trainer


@pytest.mark.parametrize("name", ["loss", "val_loss", "accuracy"])
def test_best_mode_auto_keeps_the_lowest_loss_and_the_highest_accuracy(tmp_path, name, caplog):
    """best_mode's default was max: trainer.best_metric=loss kept the worst checkpoint (the first evaluation's).
    auto decides from the name as EarlyStopping's mode=auto does: a loss is kept by its smallest value."""
    trainer = _ranked(tmp_path, best_metric=name)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs().repeat(), blobs(64), steps=30)
    evals, key = _evals(tmp_path), name.replace("val_", "")  # best.json names the eval record's key
    best = (min if "loss" in name else max)(r[key] for r in evals)
    kept = _best_of(tmp_path)
    assert kept[key] == pytest.approx(best) and float(trainer.best.numpy()) == pytest.approx(best)
    if "loss" in name:
        assert kept["step"] != 5 and evals[0]["loss"] > kept[key]  # not the worst, as before
    assert f"the {'smallest' if 'loss' in name else 'largest'} {name} (trainer.best_mode=auto" in caplog.text


def test_best_mode_max_and_min_given_are_kept(tmp_path):
    _ranked(tmp_path, best_metric="loss", best_mode="max").fit(blobs().repeat(), blobs(64), steps=20)
    assert _best_of(tmp_path)["loss"] == pytest.approx(max(r["loss"] for r in _evals(tmp_path)))


def test_best_mode_auto_refuses_a_name_it_cannot_judge_before_training(tmp_path):
    from trainer.config import ConfigError

    trainer = Trainer(model=_net(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1),
                      metrics={"dice": keras.metrics.SparseCategoricalAccuracy()}, run_dir=tmp_path,
                      progress_bar=False, verbose=False, best_metric="dice")
    with pytest.raises(ConfigError) as raised:
        trainer.fit(blobs(), blobs(64), steps=5)
    assert ("Trainer(best_mode='auto') cannot tell whether a larger 'dice' is better. Fix: Trainer(best_mode='min') or "
            "Trainer(best_mode='max').") in str(raised.value)
    assert int(trainer.step.numpy()) == 0 and not list_checkpoints(tmp_path / "checkpoints")
    trainer.config = trainer.config.__class__(**{**vars(trainer.config), "best_mode": "max"})  # the fix works
    trainer.fit(blobs(), blobs(64), steps=5)
    assert _best_of(tmp_path)["step"] == 5


@pytest.mark.parametrize("recorded", ["max", "before auto"])
def test_a_resumed_run_keeps_the_best_mode_it_began_with_and_says_so(tmp_path, recorded, caplog):
    """A run that kept its best by max (given, or max as the default before auto: a checkpoint without the
    record) goes on so when resumed with auto: best/ is ranked so; the warning names the fix."""
    from trainer.callbacks import Checkpointing

    first = _ranked(tmp_path, best_metric="loss", best_mode="max")
    if recorded == "before auto":  # a checkpoint saved before the record existed: no Checkpointing state
        first.checkpointing.state_dict = lambda: {}
    first.fit(blobs().repeat(), blobs(64), steps=10)
    assert isinstance(first.checkpointing, Checkpointing)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        _ranked(tmp_path, best_metric="loss").fit(blobs().repeat(), blobs(64), steps=20)
    assert _best_of(tmp_path)["loss"] == pytest.approx(max(r["loss"] for r in _evals(tmp_path)))
    said = [r.getMessage() for r in caplog.records if "began with best_mode=max" in r.getMessage()]
    assert len(said) == 1 and "Fix: Trainer(best_mode='min') keeps the smallest from here" in said[0], caplog.text
    assert ("(the default before best_mode=auto)" in said[0]) == (recorded == "before auto")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # the fix: min from here, best/ ranked again
        _ranked(tmp_path, best_metric="loss", best_mode="min").fit(blobs().repeat(), blobs(64), steps=25)
    assert _best_of(tmp_path)["step"] == 25 and "began with" not in caplog.text
