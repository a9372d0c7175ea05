"""trainer.jit_compile=measure: the first loop times real train steps with XLA on and off, keeps the
faster, logs both figures, and a resumed run keeps the choice (bit-exact resume)."""
import logging
import re
import shutil

import keras
import pytest

from conftest import blobs, read_metrics, run_cli
from trainer import Trainer
from trainer.compile import AUTO_MEASURE_STEPS, measures_in_run
from trainer.config import ConfigError

FIGURES = re.compile(r"XLA on ([\d.]+) ms/step, off ([\d.]+) ms/step \(median of 3 rounds of (\d+) steps; "
                     r"XLA on faster in (\d) of 3 rounds[^)]*\): (on|off)")


def make(run_dir=None, jit_compile="measure", **options):
    def model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])

    return Trainer(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, jit_compile=jit_compile,
                   progress_bar=False, log_every=10, checkpoint_every=10, deterministic=True, seed=3, **options)


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
    auto = make(jit_compile=None)
    assert measures_in_run(auto, AUTO_MEASURE_STEPS) and not measures_in_run(auto, AUTO_MEASURE_STEPS - 1)
    assert not measures_in_run(make(jit_compile=None, precision="mixed_float16"), AUTO_MEASURE_STEPS)
    assert not measures_in_run(make(jit_compile=False), AUTO_MEASURE_STEPS)
    with pytest.raises(ConfigError, match=r"trainer.jit_compile='maybe' is not one of true\|false\|null\|measure"):
        make(jit_compile="maybe")


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
