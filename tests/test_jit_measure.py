"""trainer.jit_compile=measure: the first loop times real train steps with XLA on and off, keeps the
faster, logs both figures, and a resumed run keeps the choice (bit-exact resume)."""
import logging
import math
import re
import shutil
from types import SimpleNamespace

import keras
import pytest

from conftest import blobs, read_metrics, run_cli
import tensorflow as tf

from trainer import Trainer
from trainer.callbacks.profiler import Profiler
from trainer.xla_measure import AUTO_MEASURE_STEPS, measures_in_run
from trainer.config import ConfigError

FIGURES = re.compile(r"XLA on ([\d.]+) ms/step, off ([\d.]+) ms/step \(median of 3 rounds of (\d+) steps; "
                     r"XLA on faster in (\d) of 3 rounds[^)]*\): (on|off)")


def make(run_dir=None, jit_compile="measure", **options):
    def model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])

    options = {"log_every": 10, "checkpoint_every": 10, "deterministic": True, **options}
    return Trainer(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, jit_compile=jit_compile,
                   progress_bar=False, seed=3, **options)


def test_measured_steps_count_the_choice_is_applied_and_resume_is_exact(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    first = make(tmp_path / "a")
    first.fit(blobs(), steps=10)  # 8 measured steps (1 per call: the run is short), then 2 with the choice
    found = FIGURES.search(caplog.text)
    assert found, caplog.text[-2000:]
    measured = first.xla_measurement
    assert measured.steps_taken == 8 and measured.steps == int(found[3]) == 1
    assert float(found[1]) == pytest.approx(1e3 * measured.on_seconds, abs=0.01)
    assert float(found[2]) == pytest.approx(1e3 * measured.off_seconds, abs=0.01)
    assert found[5] == ("on" if measured.jit_compile else "off") and int(found[4]) == measured.on_wins
    # auto (XLA off for float32 on a CPU) is left only when every round says XLA on is faster
    assert measured.jit_compile is (measured.on_wins == 3) and measured.auto is False
    assert first.jit_compile is measured.jit_compile and first.plan_xla().jit_compile is measured.jit_compile
    assert int(first.step.numpy()) == 10 and first.traces["train"] == 2  # the measured steps count
    row = next(r for r in read_metrics(tmp_path / "a") if r["split"] == "train")
    assert row["step"] == 10 and row["jit_compile"] == float(measured.jit_compile)
    assert row["xla_on_ms_per_step"] == pytest.approx(1e3 * measured.on_seconds)
    assert "Step functions were traced more than once" not in caplog.text  # the second trace is by design

    # Resumed from the checkpoint at step 10 in a new Trainer: no new measurement, the same choice, and
    # the same weights at step 20 as the measured Trainer going on in memory.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    first.fit(blobs(), steps=20)
    caplog.clear()
    resumed = make(tmp_path / "b")
    resumed.fit(blobs(), steps=20)
    assert "Resuming from" in caplog.text and "train steps)" not in caplog.text  # measure_in_run's line
    assert resumed.xla_measurement == measured and resumed.jit_compile is measured.jit_compile
    assert resumed.traces["train"] == 1 and int(resumed.step.numpy()) == 20
    assert resumed.weights_fingerprint() == first.weights_fingerprint()


def test_too_short_to_measure_keeps_auto_and_bad_values_name_the_choices(caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    short = make()
    short.fit(blobs(), steps=3)
    assert "fewer than the 8 it takes; XLA off (auto)" in caplog.text
    assert short.xla_measurement is None and int(short.step.numpy()) == 3
    assert make(jit_compile=True).jit_compile is True  # the old spellings still work
    assert make(jit_compile="false").config.jit_compile is False
    # auto (null) measures long runs on a CPU, except mixed_float16 (XLA is ~100x faster there)
    auto = make(jit_compile=None, deterministic=False)
    assert measures_in_run(auto, AUTO_MEASURE_STEPS) and not measures_in_run(auto, AUTO_MEASURE_STEPS - 1)
    assert not measures_in_run(make(jit_compile=None), AUTO_MEASURE_STEPS)  # trainer.deterministic: no timing
    assert not measures_in_run(make(jit_compile=None, precision="mixed_float16", deterministic=False),
                               AUTO_MEASURE_STEPS)
    assert not measures_in_run(make(jit_compile=False), AUTO_MEASURE_STEPS)
    with pytest.raises(ConfigError, match=r"Trainer\(jit_compile='maybe'\) is not one of true\|false\|null\|measure"):
        make(jit_compile="maybe")


@pytest.mark.slow
def test_cli_measures_on_two_replicas_and_rejects_a_bad_value(tmp_path):
    common = ["trainer.max_steps=16", "trainer.log_every=8", "trainer.checkpoint_every=0", "trainer.eval_every=0",
              "trainer.eval_steps=2", "trainer.progress_bar=false", "data.batch_size=32", "model.hidden_units=[16]"]
    result = run_cli(*common, "trainer.jit_compile=measure", "strategy=mirrored", "strategy.logical_cpus=2",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "2 replicas" in out and FIGURES.search(out), out[-3000:]
    rows = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in rows] == [16] and rows[0]["jit_compile"] == (FIGURES.search(out)[5] == "on")

    bad = run_cli(*common, "trainer.jit_compile=maybe", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert "trainer.jit_compile='maybe' is not one of true|false|null|measure" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_events_due_while_measuring_happen_at_its_end_and_the_next_ones_on_time(tmp_path, caplog):
    """The 40 measured steps jump over step 15 and 30 (eval, log) and 25 (checkpoint): each happens once,
    at step 40, then on its cadence again; that log row's examples/s is not timed (both compiles)."""
    caplog.set_level(logging.INFO, logger="trainer")
    t = make(tmp_path, log_every=15, eval_every=15, checkpoint_every=25, keep_checkpoints=10)
    t.fit(blobs().repeat(), blobs(), steps=60)
    assert t.xla_measurement.steps_taken == 40
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if r["split"] == "eval"] == [40, 45, 60]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    assert sorted(train) == [40, 45, 60]
    untimed = train[40].get("examples_per_sec")  # nan, written as null
    assert (untimed is None or math.isnan(untimed)) and "xla_on_ms_per_step" in train[40]
    assert train[45]["examples_per_sec"] > 0
    saved = sorted(int(p.stem.split("-")[1]) for p in (tmp_path / "checkpoints").glob("ckpt-*.index"))
    assert saved == [40, 50, 60]


def test_profile_within_the_measuring_steps_is_kept_and_measuring_is_left_out(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="trainer")
    t = make(tmp_path, profile_steps=(5, 9))
    t.fit(blobs().repeat(), steps=40)
    assert "trainer.profile_steps=[5, 9] starts within the 40 steps measuring takes" in caplog.text
    assert "not measured. Fix: profile steps after 40" in caplog.text
    assert t.xla_measurement is None and int(t.step.numpy()) == 40
    assert "Profile of train steps 5..9 written" in caplog.text
    assert len(list((tmp_path / "tensorboard").rglob("*.xplane.pb"))) == 1


def test_profiler_warns_when_a_loop_went_past_its_start(tmp_path, caplog):
    """Any loop that jumps over step N-1 (none of the loop's own cuts do) gets a warning, not a trace of
    other steps."""
    caplog.set_level(logging.INFO, logger="trainer")
    profiler = Profiler(5, 9, tmp_path)
    run = SimpleNamespace(step=tf.Variable(0, dtype=tf.int64), total=100)
    profiler.on_train_begin(run)
    profiler.on_save_point(run, 3, "loop")
    profiler.on_save_point(run, 40, "loop")
    profiler.on_save_point(run, 45, "loop")
    assert "one loop ran steps 4..40, past step 4 where the trace had to start: no trace" in caplog.text
    assert caplog.text.count("no trace") == 1 and not profiler.active and profiler.folder is None
    assert not (tmp_path / "plugins").exists()
