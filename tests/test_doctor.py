"""python -m trainer.doctor: the numbers are real (a layer that overflows float16 by construction is named,
a 1001-unit hidden layer gets 1008, underflow falls as the loss scale rises), the CLI writes its report
for a trained run, and the command it recommends trains."""
from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest

from conftest import blobs, run_cli

TRAIN_FEW_STEPS = ["trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=0", "trainer.eval_steps=2",
                   "trainer.checkpoint_every=0", "trainer.progress_bar=false"]


def _overflowing_model():
    """A 1001-unit hidden Dense (not a multiple of 8), a Lambda that multiplies by 1e6 (float16's max is
    65504), and a 10-unit output layer left in the policy's dtype (an output: its size is the task's)."""
    import keras

    inputs = keras.Input((4,))
    x = keras.layers.Dense(1001, activation="relu", name="wide")(inputs)
    x = keras.layers.Lambda(lambda v: v * 1e6, name="amplifier")(x)
    x = keras.layers.Dense(16, activation="relu", name="narrow")(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="head")(x))


def test_overflow_is_flagged_by_layer_name_and_x8_fix_is_given():
    import keras

    from trainer.doctor import diagnose

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report = diagnose(_overflowing_model, blobs(n=64), loss, sections=("model", "numerics"), quick=True,
                      progress=lambda message: None)
    f16 = report["numerics"]["float16"]
    assert "amplifier" in f16["overflowing_layers"]
    assert "wide" not in f16["overflowing_layers"]  # its activations are small: only the layers after the Lambda
    assert (f16["float32_layers_override"].startswith("precision.float32_layers=[")
            and "Lambda" in f16["float32_layers_override"])
    assert not f16["safe"] and any("amplifier" in b for b in f16["blockers"])
    amplifier = next(r for r in report["numerics"]["layers"] if r["layer"] == "amplifier")
    assert amplifier["max_activation"] > 65504 and amplifier["headroom"] < 1
    fixes = {f["layer"]: f for f in report["model"]["multiple_of_8_fixes"]}
    assert fixes["wide"]["value"] == 1001 and fixes["wide"]["fix"] == 1008
    assert "head" not in fixes  # 10 output units: fine for an output layer
    head = next(r for r in report["model"]["layers"] if r["name"] == "head")
    assert head["output_layer"] and "output layer" in head["not_multiple_of_8"][0]
    assert report["model"]["outputs_float32"] is False  # the head computes in the reduced dtype: said so
    # bfloat16 has float32's range: no overflow, and its error against float32 is measured
    assert report["numerics"]["bfloat16"]["error_vs_float32"]["finite"]


def test_underflow_falls_when_the_loss_scale_rises():
    """Inputs scaled by 1e-7 make the first layer's weight gradients ~1e-9, below float16's smallest
    subnormal (2^-24 ~ 6e-8) unscaled, and above it at a scale of 2^12."""
    import keras
    import tensorflow as tf

    from trainer.doctor.numerics import numerics_section

    def build():
        inputs = keras.Input((4,))
        x = keras.layers.Lambda(lambda v: v * 1e-7, name="shrink")(inputs)
        x = keras.layers.Dense(8, name="first")(x)
        return keras.Model(inputs, keras.layers.Dense(2, dtype="float32", name="logits")(x))

    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(32, 4)), tf.float32), tf.constant(rng.integers(0, 2, 32), tf.int32))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    f16 = numerics_section(build, loss, [batch], progress=lambda m: None)["float16"]
    by_scale = {row["scale"]: row["weight_gradients"] for row in f16["underflow_by_scale"]}
    assert by_scale[1.0] > 0.1  # the first kernel's gradients (32 of 50 values) flush unscaled
    assert by_scale[2.0**12] < by_scale[1.0]  # strictly fewer flushed values at the higher scale
    assert f16["underflow"]["weight_gradients"]["at_scale"] <= f16["underflow"]["weight_gradients"]["unscaled"]
    assert f16["loss_scale"] >= 2.0**12


def test_bad_arguments_exit_2_without_traceback(capsys):
    from trainer.doctor.__main__ import main

    assert main(["--quick", "notanoverride"]) == 2
    assert "is not a config override" in capsys.readouterr().err
    assert main(["--run", "nowhere", "recipe=mnist"]) == 2
    assert "either --run" in capsys.readouterr().err
    assert main(["data.no_such_key=1"]) == 2  # as python -m trainer says it (trainer/argv_check.py)
    assert "data.no_such_key=1: data has no key 'no_such_key'. Fix:" in capsys.readouterr().err
    assert main(["--verify", "5"]) == 2
    assert "give at least 9 steps (one per interleaved round)" in capsys.readouterr().err
    assert main(["--set-auto", "model.hidden_units=[8]"]) == 2  # refused before anything is measured
    err = capsys.readouterr().err
    assert "--set-auto stores what --verify measured: add --verify [N]" in err and "[doctor" not in err


@pytest.mark.slow
def test_doctor_on_a_trained_run_and_its_recommended_command_trains(tmp_path):
    run = tmp_path / "run"
    trained = run_cli("recipe=mnist", "model.hidden_units=[16]", "data.batch_size=32", *TRAIN_FEW_STEPS,
                      f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())

    doctor = run_cli("--run", str(run), "--quick", module="trainer.doctor")
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    report = json.loads((run / "doctor.json").read_text())
    assert {"meta", "hardware", "model", "numerics", "speed", "recommendation"} <= set(report)
    assert report["hardware"]["matmul"] and all(r["gflops"] > 0 for r in report["hardware"]["matmul"])
    timed = [r for r in report["speed"]["configs"] if "steps_per_sec" in r]
    assert {r["policy"] for r in timed} == {"float32", "mixed_float16", "mixed_bfloat16"}
    assert all(r["batch"] == 32 for r in timed)  # --quick: the given batch only
    assert "speed: timing" in doctor.stderr and "train with:" in doctor.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints  # the run is left as it was

    command = shlex.split(report["recommendation"]["command"])
    assert command[:3] == ["python", "-m", "trainer"] and "model.hidden_units=[16]" in command
    again = run_cli(*command[3:], *TRAIN_FEW_STEPS, f"hydra.run.dir={tmp_path / 'recommended'}")
    assert again.returncode == 0, again.stderr[-2000:]


def test_trainer_epochs_on_the_command_line_is_the_run_length_python_m_trainer_makes(tmp_path, monkeypatch):
    """`python -m trainer recipe=mnist trainer.epochs=1` trains one epoch: the recipe's max_steps=1500 is replaced
    (assemble.run_length_of_command_line; tests/test_run_length.py). The doctor composed the recipe's max_steps
    beside it; both given, both stand, as in the run. The measuring is replaced (the composed parts are read)."""
    import trainer.doctor
    from trainer.errors import UserError

    composed = []

    def diagnose_parts(parts, data, **kw):
        composed.append((parts.config.max_steps, parts.config.epochs))
        raise UserError("composed")  # nothing to measure here: the doctor stops with exit 2

    monkeypatch.setattr(trainer.doctor, "diagnose_parts", diagnose_parts)
    for given, length in ((["trainer.epochs=1"], (None, 1)), (["trainer.epochs=1", "trainer.max_steps=7"], (7, 1))):
        done = run_cli("recipe=mnist", *given, "--out", str(tmp_path / "doctor"), module="trainer.doctor")
        assert done.returncode == 2 and "composed" in done.stderr, done.stderr[-3000:]
        assert composed[-1] == length


@pytest.mark.slow
def test_the_grid_times_a_trainer_config_with_epochs(monkeypatch):
    """With trainer.epochs given (`python -m trainer.doctor trainer.epochs=1`, or diagnose(trainer_config=...)),
    every configuration of the grid failed ("epochs needs a training set of known size"): the doctor's Trainers
    train their own count of steps (fit(steps=...)), not the run's epochs (on data of known size, one epoch cut
    their calls short). One configuration is timed (the grid's plan cut to it), on a tiny model and data of
    unknown size, as a recipe's."""
    import keras

    from trainer import TrainerConfig
    from trainer.doctor import diagnose, speed

    monkeypatch.setattr(speed, "plan_grid", lambda batch, quick, on_cpu: ([speed.GridConfig("float32", False, batch)],
                                                                         []))
    unknown_size = blobs(n=256, batch=16).repeat()
    report = diagnose(lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), unknown_size,
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      lambda: keras.optimizers.SGD(0.1), trainer_config=TrainerConfig(epochs=1, max_steps=None),
                      sections=("speed",), quick=True, progress=lambda _: None)
    (row,) = report["speed"]["configs"]
    assert "error" not in row and row["examples_per_sec"] > 0


@pytest.mark.slow
def test_examples_per_sec_counts_every_batch_a_step_reads(tmp_path):
    """A run with trainer.grad_accum_steps=2 reads 2 batches per step: its examples/s is steps/s x 2 x the batch."""
    run = tmp_path / "run"
    trained = run_cli("recipe=mnist", "model.hidden_units=[16]", "data.batch_size=32", "trainer.grad_accum_steps=2",
                      *TRAIN_FEW_STEPS, f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    doctor = run_cli("--run", str(run), "--quick", module="trainer.doctor")
    assert doctor.returncode == 0, doctor.stderr[-3000:]
    timed = [r for r in json.loads((run / "doctor.json").read_text())["speed"]["configs"] if "steps_per_sec" in r]
    assert timed and all(r["examples_per_sec"] == pytest.approx(r["steps_per_sec"] * 2 * 32) for r in timed)


def test_unwritable_out_exits_2_before_measuring_and_options_may_come_between_overrides(tmp_path, capsys):
    """The --out check runs before the minutes of measuring (no report lost at the end); `--quick` and
    `--out` between overrides parse (parse_intermixed_args)."""
    from trainer.doctor.__main__ import main

    regular_file = tmp_path / "a_file"
    regular_file.write_text("")
    argv = ["recipe=mnist", "--quick", "data.batch_size=32", "--out", str(regular_file / "sub"),
            "model.hidden_units=[16]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot be written" in err and str(regular_file / "sub") in err and "Traceback" not in err
    assert main(["--out", str(regular_file), "recipe=mnist"]) == 2
    assert "is a file" in capsys.readouterr().err


def test_run_given_as_a_checkpoint_resolves_to_its_run_folder(tmp_path, capsys):
    from trainer.doctor.__main__ import load_run, main

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    import tensorflow as tf

    tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(run / "checkpoints" / "ckpt-20"))  # a readable one
    for given in (run / "checkpoints" / "ckpt-20", run / "checkpoints", run):
        _, _, prefix, folder = load_run(str(given))
        assert folder == run and prefix.endswith("ckpt-20")  # doctor.* go to the run, not checkpoints/
    assert main(["--run", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "is not a run folder" in err and "a .keras file has none" in err


def _row(policy, batch, per_example, memory=130.0, xla=False):
    name = f"{policy} XLA {'on' if xla else 'off'} batch {batch}"
    median = sorted(per_example)[len(per_example) // 2]
    return {"name": name, "policy": policy, "xla": xla, "batch": batch, "examples_per_sec": 1 / median,
            "steps_per_sec": 1 / median / batch, "seconds_per_example": list(per_example), "memory_mb": memory,
            "memory_kind": "process_rss", "spread": max(per_example) / min(per_example),
            "first_call_seconds": 1.0, "xla_layout": "XLA off"}


SAFE = {"float16": {"safe": True, "blockers": []}, "bfloat16": {"safe": True, "blockers": []}}


def _report(*rows):
    return {"meta": {"command": "", "wall_seconds": 1.0}, "numerics": SAFE,
            "speed": {"rounds": 3, "configs": list(rows), "skipped": [], "memory_means": "RSS growth"}}


def test_recommendation_needs_a_significant_paired_win_and_claims_no_memory_within_noise():
    """A faster median that lost a round by a lot is not significant; a memory difference within the RSS
    noise is not called a saving; the printed report gives the ratio, its interval and the load."""
    from trainer.doctor import recommend
    from trainer.doctor.render import render_text

    baseline = _row("float32", 32, [1.0] * 8, 150.0)
    lucky = _row("mixed_bfloat16", 32, [0.5, 0.6, 1.1] * 2 + [0.5, 0.6], 40.0)  # much faster median, lost 2 rounds
    report = _report(baseline, lucky)
    rec = recommend(report, [], baseline_xla=False, batch=32)
    assert rec["config"] == baseline["name"] and rec["verdict"] == "no significant difference"
    assert rec["notes"][0].startswith("no significant difference")

    bigger = _row("float32", 64, [0.8, 0.9, 0.85, 0.82] * 2, 130.0)  # won every round; 20 MiB apart is RSS noise
    report["speed"]["configs"].append(bigger)
    rec = recommend(report, [], baseline_xla=False, batch=32)
    assert (rec["config"] == bigger["name"] and rec["verdict"] == "faster"
            and rec["memory_difference_measurable"] is False)
    low, high = rec["interval"]
    assert 1 < low <= rec["speedup"] <= high
    report["recommendation"] = rec
    del report["numerics"]  # rendered from its full section only; the recommendation is what is checked here
    text = render_text(report)
    assert "no difference beyond the measurement's noise" in text and "MiB less" not in text
    assert "95% interval" in text and "load average" in text and "spread of the rounds" in text
    assert text.splitlines()[0] == "python -m trainer.doctor report"  # no empty "()"


def test_prefer_simpler_is_checked_against_the_other_winners():
    """The simpler winner is kept when the faster one does not beat it significantly, and not when it does
    (issue 30: float32 XLA on was substituted although six configurations beat it)."""
    from trainer.doctor import recommend

    baseline = _row("float32", 32, [1.0] * 8)
    simple = _row("float32", 32, [0.85, 0.86, 0.84, 0.85] * 2, xla=True)  # a win over the baseline
    tie = _row("mixed_bfloat16", 32, [0.84, 0.87, 0.83, 0.86] * 2, xla=True)  # as fast as `simple`, two changes
    rec = recommend(_report(baseline, simple, tie), [], baseline_xla=False, batch=32)
    assert rec["config"] == simple["name"] and tie["name"] in " ".join(rec["notes"])
    fast = _row("mixed_bfloat16", 32, [0.5, 0.52, 0.49, 0.51] * 2)  # beats `simple` in every round, by far
    rec = recommend(_report(baseline, simple, fast), [], baseline_xla=False, batch=32)
    assert rec["config"] == fast["name"] and rec["verdict"] == "faster"
    assert "trainer.jit_compile=false" in rec["command"] and "precision=mixed_bfloat16" in rec["command"]


def test_the_baseline_is_what_the_user_runs_now():
    """Against a user already on mixed_bfloat16, float32 as fast is 'no significant difference' and is
    recommended as the simpler one; a slower float32 is not."""
    from trainer.doctor import recommend

    bf16 = _row("mixed_bfloat16", 32, [0.5, 0.51, 0.5, 0.49, 0.5])
    f32_same = _row("float32", 32, [0.5, 0.49, 0.51, 0.5, 0.5])
    rec = recommend(_report(f32_same, bf16), [], baseline_xla=False, batch=32, policy="mixed_bfloat16")
    assert rec["baseline"] == bf16["name"] and rec["config"] == f32_same["name"]
    assert rec["verdict"] == "no significant difference" and "simpler" in rec["notes"][0]
    f32_slow = _row("float32", 32, [1.0, 1.1, 0.9, 1.0, 1.05])
    rec = recommend(_report(f32_slow, bf16), [], baseline_xla=False, batch=32, policy="mixed_bfloat16")
    assert rec["config"] == bf16["name"] and rec["changed"] is False
    assert rec["current"]["timed"] and "not timed" not in " ".join(rec["notes"])
    # the user's configuration (XLA on) was not timed: the closest row is labelled as such, not as theirs,
    # and the current command (what --verify trains) is the user's own
    from trainer.doctor.render import _recommendation_lines

    rec = recommend(_report(f32_slow, bf16), [], baseline_xla=True, batch=32, policy="mixed_bfloat16")
    assert not rec["current"]["timed"] and rec["baseline"] == bf16["name"]
    assert "mixed_bfloat16 XLA on batch 32) was not timed" in rec["notes"][0]
    assert "trainer.jit_compile=true" in rec["current_command"] and rec["current"]["xla"] is True
    assert "closest timed to what you run now" in _recommendation_lines(rec)[1]


def _noisy_rounds(rng, true_seconds, rounds=12):
    """Timings of a shared, loaded machine: bursts that slow a whole round (hitting each configuration
    alike) times independent per-call noise (10%, log-normal)."""
    bursts = np.exp(rng.normal(0, 0.4, rounds))
    return {name: list(t * bursts * np.exp(rng.normal(0, 0.1, rounds))) for name, t in true_seconds.items()}


def _candidates(**speed_of_first):
    """A float32 XLA-off baseline and nine candidates (policies x XLA x batches), all equally fast unless
    `speed_of_first` names one's true seconds."""
    rows = [("float32", False, 32)] + [(p, x, b) for p, x, b in [
        ("float32", True, 32), ("mixed_bfloat16", False, 32), ("mixed_bfloat16", True, 32),
        ("float32", False, 64), ("float32", True, 64), ("mixed_bfloat16", False, 64),
        ("mixed_bfloat16", True, 64), ("mixed_float16", False, 32), ("mixed_float16", False, 64)]]
    return {(p, x, b): speed_of_first.get(f"{p}_{'xla' if x else 'off'}_{b}", 1.0) for p, x, b in rows}


def _recommend_from(rng, truth):
    from trainer.doctor import recommend

    timings = _noisy_rounds(rng, {f"{p} {x} {b}": t for (p, x, b), t in truth.items()})
    rows = [_row(p, b, timings[f"{p} {x} {b}"], xla=x) for (p, x, b) in truth]
    rec = recommend(_report(*rows), [], baseline_xla=False, batch=32)
    return rec["config"] if rec["verdict"] == "faster" else "no significant difference"


def test_nine_equal_candidates_rarely_give_a_false_faster():
    """The family-wise error: 200 simulated doctor runs where nine candidates are truly as fast as the
    baseline (noisy bursts); a false "faster" in at most 5% of them (the bootstrap alone gave 36-54%)."""
    false_faster = sum(_recommend_from(np.random.default_rng(seed), _candidates()) != "no significant difference"
                       for seed in range(200))
    assert false_faster <= 10, false_faster


def test_paired_rule_is_stable_across_noisy_repeats():
    """Two timing sets drawn from the same distributions (nine candidates, independent per-call noise and
    bursts) give the same recommendation or both say no significant difference: a clear win, a tie and a
    small (2%) gain, over several pairs of seeds."""
    scenarios = {"clear win": _candidates(mixed_bfloat16_off_32=0.6), "tie": _candidates(),
                 "small gain": _candidates(mixed_bfloat16_off_32=0.98)}
    for scenario, truth in scenarios.items():
        for seeds in ((1, 2), (3, 4), (5, 6)):
            answers = [_recommend_from(np.random.default_rng(seed), truth) for seed in seeds]
            assert answers[0] == answers[1], (scenario, answers)
            assert answers[0] == ("mixed_bfloat16 XLA off batch 32" if scenario == "clear win"
                                  else "no significant difference"), (scenario, answers)


def test_paired_verdict_and_the_sign_test():
    from trainer.doctor.decide import paired_verdict, sign_test_p

    assert sign_test_p(5, 5) == pytest.approx(1 / 32) and sign_test_p(0, 5) == 1.0
    win = paired_verdict([0.5] * 5, [1.0] * 5)
    assert win["verdict"] == "faster" and win["speedup"] == pytest.approx(2.0) and win["wins"] == 5
    assert paired_verdict([1.0] * 5, [0.5] * 5)["verdict"] == "slower"
    assert paired_verdict([1.0, 0.9, 1.1], [1.0, 1.0, 1.0])["verdict"] == "no significant difference"
    assert paired_verdict([0.5, 0.6], [1.0, 1.0]) == paired_verdict([0.5, 0.6], [1.0, 1.0])  # a fixed seed
    # 4 of 5 rounds won by a lot: the bootstrap interval excludes 1, the sign test (p = 0.19) does not
    four_of_five = paired_verdict([1 / 1.5, 1 / 1.6, 1 / 1.4, 1 / 1.7, 1 / 0.9], [1.0] * 5)
    assert four_of_five["interval"][0] > 1 and four_of_five["verdict"] == "no significant difference"
    # a correction for nine candidates: 5 of 5 rounds (p = 1/32) is not enough at 0.05 / 9
    assert paired_verdict([0.5] * 5, [1.0] * 5, alpha=0.05 / 9)["verdict"] == "no significant difference"
    assert paired_verdict([0.5] * 8, [1.0] * 8, alpha=0.05 / 9)["verdict"] == "faster"


def test_calls_are_resized_every_round_and_timed_as_the_loop_trains():
    """A burst that makes one call 10x slower shrinks the next call only, and the one after grows back;
    a call is a whole number of the loop's windows (steps_per_loop) and goes through the loop's path."""
    import types

    from trainer.doctor.speed import resized, run_as_trained, timed_rounds

    assert resized(100, 0.2, 0.2) == 100 and resized(100, 0.02, 0.2) == 500 and resized(100, 2.0, 0.2) == 10
    assert resized(7, 0.2, 0.2, multiple=4) == 8 and resized(1, 1.0, 0.2, multiple=4) == 4
    assert resized(500, 0.01, 0.2, multiple=3) == 498  # at most MOST_STEPS_PER_CALL, whole windows
    load = iter([1, 1, 10, 1, 1, 1, 1, 1])  # the third call hits a burst

    def timed_call(trainer, steps):
        return steps, steps * 0.002 * next(load)  # 2 ms a step

    def trainer(name):  # what timed_rounds reads of a Trainer: its steps_per_loop
        return types.SimpleNamespace(name=name, config=types.SimpleNamespace(steps_per_loop=1))

    calls = timed_rounds({"a": trainer("a"), "b": trainer("b")}, {"a": 100, "b": 100}, rounds=3, call_seconds=0.2,
                         timed_call=timed_call)
    assert [s for s, _ in calls["a"]] == [100, 10, 100]  # re-sized from the burst, and back
    assert all(seconds / steps == pytest.approx(0.002) or seconds / steps == pytest.approx(0.02)
               for s in calls.values() for steps, seconds in s)
    failed = {}

    def b_fails_in_round_2(trainer, steps, count=iter(range(100))):
        if trainer.name == "b" and next(count) == 2:
            raise RuntimeError("stopping at step 9: non-finite")
        return steps, 0.2

    calls = timed_rounds({"a": trainer("a"), "b": trainer("b")}, {"a": 10, "b": 10}, rounds=3, call_seconds=0.2,
                         timed_call=b_fails_in_round_2, failed=failed)
    assert len(calls["a"]) == 3 and len(calls["b"]) == 1 and "non-finite" in failed["b"]  # left the rounds

    class FakeTrainer:
        def __init__(self):
            self.calls, self.config = [], types.SimpleNamespace(steps_per_loop=1)
            variable = type("V", (), {"numpy": lambda self: 0})()
            self.models = {"model": type("M", (), {"trainable_variables": [variable]})()}

        def run_steps(self, n, loop=False):
            self.calls.append((n, loop))
            return min(n, 4)  # a guard stopped it after 4 steps

    fake = FakeTrainer()
    assert run_as_trained(fake, 10) == 4
    assert fake.calls == [(10, True)]  # through the loop's windows, not the compiled steps alone
    calls = timed_rounds({"a": fake}, {"a": 10}, rounds=1, call_seconds=0.2,
                         timed_call=lambda t, n: (t.run_steps(n, loop=True), 0.008))
    assert calls["a"] == [(4, 0.008)]  # the steps trained, not the steps asked, divide the time


def test_the_grid_times_the_loops_per_window_function(monkeypatch):
    """Injected clock: every window of the Trainer's loop (loop.Loop.window, counted by a spy) takes 10 ms
    and nothing else does. The grid's timed calls are exactly those windows: with steps_per_loop=2 a call
    of 0.1 s is 10 windows of 2 steps, each followed by the loop's host work (the numerics guard's
    on_loop_end) and, every log_every=4 steps, the train logs."""
    import types

    import keras

    from trainer import Trainer, TrainerConfig
    from trainer.callbacks.numerics import NumericsGuard
    from trainer.doctor import speed
    from trainer.loop import Loop

    clock, windows, guarded, logged = [0.0], [], [], []
    window, on_loop_end, collect = Loop.window, NumericsGuard.on_loop_end, Trainer.collect_train_logs

    def spy_window(self, *args):
        before = self.step
        window(self, *args)
        windows.append(self.step - before)
        clock[0] += 0.01

    monkeypatch.setattr(Loop, "window", spy_window)
    monkeypatch.setattr(NumericsGuard, "on_loop_end",
                        lambda self, t, step: (guarded.append(step), on_loop_end(self, t, step)))
    monkeypatch.setattr(Trainer, "collect_train_logs", lambda self, *a: (logged.append(a[0]), collect(self, *a))[1])
    monkeypatch.setattr(speed, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(speed, "_add_phases", lambda *args: None)  # real clocks; tested on their own

    def make_trainer(policy, xla):
        return Trainer(lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.01), precision=policy,
                       config=TrainerConfig(jit_compile=xla, steps_per_loop=2, log_every=4, progress_bar=False,
                                            verbose=False, tensorboard=False))

    section = speed.speed_section(make_trainer, lambda batch: blobs(n=64, batch=batch).repeat(),
                                  [speed.GridConfig("float32", False, 16)], [], rounds=3, call_seconds=0.1,
                                  progress=lambda message: None)
    row = section["configs"][0]
    assert "error" not in row, row
    assert row["steps_per_call"] == [20, 20, 20] and row["seconds_per_call"] == pytest.approx([0.1] * 3)
    assert row["steps_per_sec"] == pytest.approx(200.0) and section["steps_per_loop"] == 2
    timed = windows[-30:]  # the three timed calls: 10 windows each, of steps_per_loop steps
    assert timed == [2] * 30 and len(guarded) == len(windows)  # every window ran the loop's host work
    after_fit = [step for step in logged if step > 1]  # fit(steps=1) ends its run with a log at step 1
    assert after_fit and all(step % 4 == 0 for step in after_fit)  # train logs when log_every is due, as a run


def test_help_and_bad_arguments_answer_before_tensorflow_loads():
    """The doctor parses its own arguments first: -h, a bad --verify and --set-auto without --verify
    answer without the seconds TensorFlow takes to load."""
    import subprocess
    import sys

    script = ("import sys\nfrom trainer.doctor.__main__ import main\n"
              "codes = [main(['--set-auto']), main(['--verify', '3'])]\n"
              "for argv in (['--verify', 'abc'], ['-h']):\n"
              "    try:\n        main(argv)\n    except SystemExit as e:\n        codes.append(e.code)\n"
              "print(codes, 'tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "[2, 2, 2, 0] False", done.stdout[-2000:] + done.stderr[-2000:]
    assert "add --verify [N]" in done.stderr and "'abc' is not a number of steps" in done.stderr
    assert "--set-auto" in done.stdout  # the help


@pytest.mark.slow
def test_tensorflow_warnings_are_printed_once():
    """main() configures logging; TensorFlow's logger has its own handler and must not also reach the root's."""
    import subprocess
    import sys

    script = ("import sys, tensorflow as tf; from trainer.doctor.__main__ import main; "
              "code = main(['--quick', 'notanoverride']); tf.get_logger().warning('retracing, say'); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("retracing, say") == 1, done.stderr[-2000:]


def test_the_grid_drops_tensorflows_retracing_warning_and_only_that(monkeypatch):
    """Each configuration of the grid is a new Trainer whose train loop traces again: TensorFlow's
    "triggered tf.function retracing" warning is expected there and dropped; other warnings still show,
    and after the doctor the retracing warning shows again."""
    import logging

    import keras
    import tensorflow as tf

    import trainer.doctor
    from trainer.doctor import speed

    retracing = ("5 out of the last 11 calls to <function make_train_function.<locals>.train_loop at 0x1> "
                 "triggered tf.function retracing. Tracing is expensive")

    def grid(*args, **kwargs):
        tf.get_logger().warning(retracing)
        tf.get_logger().warning("something else")
        return {"configs": [_row("float32", 16, [1.0] * 3)], "skipped": [], "rounds": 3, "memory_means": "RSS growth"}

    monkeypatch.setattr(speed, "speed_section", grid)
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        report = trainer.doctor.diagnose(
            lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), blobs(n=32, batch=16),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), lambda: keras.optimizers.SGD(0.01),
            sections=("speed",), progress=lambda _: None)
        assert report["recommendation"]["config"] == "float32 XLA off batch 16"
        assert seen == ["something else"]
        tf.get_logger().warning(retracing)
        assert seen == ["something else", retracing]
    finally:
        logger.removeHandler(handler)


def test_no_fitting_loss_scale_blocks_float16_and_weightless_layers_get_their_gradient():
    """A loss scaled by 1e5 makes the largest gradient too big for any scale (>= 1) with 8x headroom:
    said so, and a blocker. A Rescaling of the inputs has no weights upstream: its output gradient is
    measured (watched), not shown as 0."""
    import keras
    import tensorflow as tf

    from trainer.doctor.numerics import numerics_section
    from trainer.doctor.render import _numerics_lines

    def build():
        inputs = keras.Input((4,))
        x = keras.layers.Rescaling(2.0, name="pre")(inputs)
        x = keras.layers.Dense(8, name="hidden")(x)
        return keras.Model(inputs, keras.layers.Dense(2, dtype="float32", name="logits")(x))

    def huge_loss(y, logits):
        return 1e5 * keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(16, 4)), tf.float32), tf.constant(rng.integers(0, 2, 16), tf.int32))
    numerics = numerics_section(build, huge_loss, [batch], progress=lambda m: None)
    f16 = numerics["float16"]
    assert f16["largest_gradient"] * 8 > 65504 and f16["scale_fits"] is False and not f16["safe"]
    assert any("no loss scale keeps the largest gradient" in b for b in f16["blockers"])
    text = "\n".join(_numerics_lines(numerics))
    assert "float16 would overflow" in text and "<= 65504" not in text
    pre = next(r for r in numerics["layers"] if r["layer"] == "pre")
    assert pre["max_gradient"] is not None and pre["max_gradient"] > 0


@pytest.mark.slow
def test_resnet_recipe_model_table_and_numerics_at_a_tiny_size():
    """Issue 21's acceptance on the resnet recipe: its own builder (a ResNet-8, 8 filters, 32x32 images)
    through diagnose's model and numerics sections: nested backbone layers are listed, BatchNormalization
    is kept in float32, every conv's output gradient is measured and the logits are float32."""
    import functools

    import keras
    import tensorflow as tf

    from trainer.doctor import diagnose
    from trainer.recipes.resnet import build_model

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, size=(16, 32, 32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, rng.integers(0, 10, 16).astype("int32"))).batch(8)
    builder = functools.partial(build_model, name="resnet8", base_filters=8, num_classes=10, image_size=32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report = diagnose(builder, data, loss, sections=("model", "numerics"), progress=lambda message: None)
    rows = {r["name"]: r for r in report["model"]["layers"]}
    assert "stage1_block1_1_conv" in rows or any(name.startswith("stage1_block1_1") for name in rows)
    batch_norms = [r for r in rows.values() if r["class"] == "BatchNormalization"]
    assert batch_norms and all(r["float32_reason"] for r in batch_norms)
    assert report["model"]["outputs_float32"] is True  # the recipe's float32 logits head
    numerics = report["numerics"]
    assert numerics["batches"] == 2 and math.isfinite(numerics["reference_loss"])
    convs = [r for r in numerics["layers"] if r["class"] == "Conv2D"]
    assert convs and all(r["max_gradient"] is not None and r["max_gradient"] > 0 for r in convs)
    assert numerics["float16"]["loss_scale"] >= 1 and numerics["bfloat16"]["error_vs_float32"]["finite"]


@pytest.mark.slow
def test_quick_under_mirrored_on_two_logical_cpus(tmp_path):
    """Issue 21's acceptance: `--quick` under strategy=mirrored strategy.logical_cpus=2 through the CLI,
    options between overrides; every configuration is a two-replica Trainer, the recommended command keeps
    the strategy, and TensorFlow's warnings are not doubled by the root logger."""
    out = tmp_path / "doctor"
    done = run_cli("strategy=mirrored", "--quick", "strategy.logical_cpus=2", "model.hidden_units=[16]",
                   "data.batch_size=32", "--out", str(out), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "doctor.json").read_text())
    assert report["hardware"]["replicas"] == 2
    timed = [r for r in report["speed"]["configs"] if "steps_per_sec" in r]
    # rounds: --quick runs 10
    assert timed and all(len(r["steps_per_call"]) == len(r["seconds_per_example"]) >= 5 for r in timed)
    assert all(steps >= 1 for r in timed for steps in r["steps_per_call"])  # re-sized every round
    command = shlex.split(report["recommendation"]["command"])
    assert "strategy=mirrored" in command and "strategy.logical_cpus=2" in command
    assert "warm-up (not measured)" in done.stderr and "WARNING tensorflow:" not in done.stderr
    assert (out / "doctor.txt").read_text().strip() in done.stdout


def test_verify_withdraws_a_recommendation_that_does_not_train_faster():
    from trainer.doctor import recommend
    from trainer.doctor.verify import verify_outcome

    baseline = _row("float32", 32, [1.0] * 5)
    fast = _row("mixed_bfloat16", 32, [0.5, 0.52, 0.49, 0.51, 0.5])
    rec = recommend(_report(baseline, fast), ["model.hidden_units=[8]"], baseline_xla=False, batch=32)
    assert rec["changed"] and "precision=mixed_bfloat16" in rec["command"]
    kept = verify_outcome(rec, [0.6, 0.61, 0.59, 0.6, 0.62], [1.0, 1.02, 0.99, 1.0, 1.01])
    assert kept["config"] == fast["name"] and not kept["verify"]["withdrawn"]
    assert kept["verify"]["speedup"] == pytest.approx(1.66, abs=0.02) and "stands" in kept["notes"][0]
    withdrawn = verify_outcome(rec, [1.0, 0.98, 1.03, 1.01, 0.99], [1.0, 1.0, 1.0, 1.0, 1.0])  # no faster in training
    assert withdrawn["verify"]["withdrawn"] and withdrawn["config"] == baseline["name"]
    assert withdrawn["command"] == rec["current_command"] and "precision=float32" in withdrawn["command"]
    assert withdrawn["policy"] == "float32" and "withdrawn" in withdrawn["notes"][0]
    from trainer.doctor.render import _recommendation_lines

    head = _recommendation_lines(withdrawn)[1]
    assert head.startswith(f"  {baseline['name']} (what you run now): keep it") and "not confirmed by --verify" in head
    assert "model.hidden_units=[8]" in withdrawn["command"]
    from trainer.doctor.verify import mark_unverified

    candidate = mark_unverified(rec)  # no --verify: the grid's winner is a candidate, said so
    assert (candidate["unverified"] and "per-window path" in candidate["notes"][0]
            and "--verify N" in candidate["notes"][0])
    assert _recommendation_lines(candidate)[1].startswith("  candidate, not yet verified: ")
    assert mark_unverified(withdrawn) == withdrawn  # nothing changed: nothing to verify


def test_verify_trains_both_in_interleaved_rounds_of_the_next_steps():
    """--verify's rounds on fake trainers: the recommended and the current configuration each train one
    untimed step, then take turns, each fit() asking for its run's next N / 5 steps."""
    from types import SimpleNamespace

    from trainer.doctor import recommend
    from trainer.doctor.verify import verify

    baseline = _row("float32", 32, [1.0] * 5)
    fast = _row("mixed_bfloat16", 32, [0.5, 0.52, 0.49, 0.51, 0.5])
    rec = recommend(_report(baseline, fast), [], baseline_xla=False, batch=32)
    fits = []

    def make_trainer(policy, xla):
        config = SimpleNamespace(grad_accum_steps=1, batches_per_step=1)
        return SimpleNamespace(config=config, fit=lambda data, steps: fits.append((policy, steps)))

    checked = verify(make_trainer, lambda batch: None, rec, [baseline, fast], steps=20, progress=lambda _: None)
    assert fits == [("mixed_bfloat16", 1), ("float32", 1)] + [
        (policy, 1 + r * 2) for r in range(1, 10) for policy in ("mixed_bfloat16", "float32")]
    assert checked["verify"]["rounds"] == 9 and len(checked["verify"]["current_seconds_per_example"]) == 9


def test_verify_with_nothing_to_compare_says_so_in_the_text_report():
    from trainer.doctor import recommend, render_text
    from trainer.doctor.verify import verify

    baseline = _row("float32", 32, [1.0] * 5)
    report = _report(baseline, _row("mixed_bfloat16", 32, [1.0, 0.99, 1.01, 1.0, 1.02]))
    rec = recommend(report, [], baseline_xla=False, batch=32)
    assert not rec["changed"]
    del report["numerics"]  # the text's numerics section needs the full one

    def make_trainer(policy, xla):
        raise AssertionError("nothing to compare: nothing is built")

    report["recommendation"] = verify(make_trainer, lambda batch: None, rec, report["speed"]["configs"], steps=20,
                                      progress=lambda _: None)
    assert "  --verify: nothing to compare: the recommendation is what you run now" in render_text(report).splitlines()
    report["recommendation"] = rec  # no --verify asked: no such line
    assert "--verify: nothing to compare" not in render_text(report)


def test_verify_confirms_a_gain_that_lost_one_round_of_nine():
    """On a noisy machine a real gain loses a round now and then: 8 of 9 rounds won with the interval
    above 1 confirms it (5 rounds needed 5 of 5); 7 of 9 does not, and the note says what is needed."""
    from trainer.doctor import recommend
    from trainer.doctor.decide import wins_needed
    from trainer.doctor.verify import verify_outcome

    assert (wins_needed(9), wins_needed(5), wins_needed(4)) == (8, 5, 5)
    baseline = _row("float32", 32, [1.0] * 5)
    rec = recommend(_report(baseline, _row("mixed_bfloat16", 32, [0.5, 0.52, 0.49, 0.51, 0.5])), [],
                    baseline_xla=False, batch=32)
    one_lost = [0.45, 0.47, 0.5, 0.44, 1.3, 0.46, 0.48, 0.45, 0.47]  # a burst of load in round 5
    kept = verify_outcome(rec, one_lost, [1.0] * 9)
    assert not kept["verify"]["withdrawn"] and kept["verify"]["wins"] == 8 and "stands" in kept["notes"][0]
    two_lost = [0.45, 1.3, 0.5, 0.44, 1.3, 0.46, 0.48, 0.45, 0.47]
    withdrawn = verify_outcome(rec, two_lost, [1.0] * 9)
    assert withdrawn["verify"]["withdrawn"] and "won 7 of 9 rounds" in withdrawn["notes"][0]
    assert "confirming needs at least 8 of 9 rounds won" in withdrawn["notes"][0]


@pytest.mark.slow
def test_quick_verify_through_the_cli_on_a_tiny_config(tmp_path):
    """One real run: --quick --verify on a tiny MLP writes the verify result (a measured ratio, and a
    withdrawal exactly when the measured verdict is not a win), or says there was nothing to compare."""
    out = tmp_path / "doctor"
    done = run_cli("--quick", "model.hidden_units=[8]", "data.batch_size=16", "--out", str(out), "--verify", "10",
                   module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((out / "doctor.json").read_text())["recommendation"]
    verified = rec["verify"]
    if "skipped" in verified:
        assert rec["changed"] is False and "verify:" not in done.stderr
    else:
        assert verified["rounds"] == 9 and verified["speedup"] > 0
        assert verified["withdrawn"] == (verified["verdict"] != "faster" and rec.get("withdrawn_config") is not None)
        assert "--verify:" in done.stdout and ("withdrawn" in done.stdout) == verified["withdrawn"]
    assert "load average" in done.stdout
    meta = json.loads((out / "doctor.json").read_text())["meta"]
    assert meta["command_seconds"] > meta["wall_seconds"]  # start-up counted: what the user waited
    assert f"{meta['command_seconds']:.0f} s since the command started" in done.stdout


def test_the_wall_time_says_what_it_covers():
    """"wall time: 84 s" was read as the command's time, which /usr/bin/time measured at 105 s: the line names the
    measuring's time, and the command's since its process started where the command recorded it."""
    from trainer.doctor.render import render_text

    report = {"meta": {"command": "", "wall_seconds": 1.0}}
    assert render_text(report).splitlines()[-1] == "wall time: 1 s measuring"  # diagnose() from Python
    report["meta"]["command_seconds"] = 9.4
    assert render_text(report).splitlines()[-1].startswith("wall time: 1 s measuring; 9 s since the command started")


def test_picture_marks_the_recommended_configuration_with_a_legend_and_the_rounds(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.doctor import recommend
    from trainer.doctor.plot import _speed_panel, plot_report

    baseline = _row("float32", 32, [1.0, 1.1, 0.9, 1.0, 1.05])
    fast = _row("mixed_bfloat16", 32, [0.5, 0.52, 0.49, 0.51, 0.5])
    report = _report(baseline, fast)
    report["recommendation"] = rec = recommend(report, [], baseline_xla=False, batch=32)
    fig, ax = plt.subplots()
    _speed_panel(ax, [baseline, fast], ["f32", "bf16"], rec)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "recommended (faster)" in labels and "what you run now" in labels and "each round" in labels
    bars = ax.patches
    assert bars[1].get_edgecolor()[:3] == matplotlib.colors.to_rgb("red") and bars[0].get_hatch() == "//"
    dots = [line for line in ax.get_lines() if line.get_marker() == "."]
    assert sum(len(line.get_ydata()) for line in dots) == 10  # every round of both configurations
    plt.close(fig)
    del report["numerics"]  # injected verdicts only: the float16 panel needs the full section
    assert plot_report(report, tmp_path / "doctor.png") is None and (tmp_path / "doctor.png").stat().st_size > 0


def test_phase_breakdown_of_a_real_tiny_trainer_adds_up_to_its_step():
    """The pieces of a real Trainer's step (tiny MLP): every phase is a non-negative share, forward +
    backward + update add up to the step, and the input is timed on the given pipeline."""
    import keras

    from trainer import Trainer, TrainerConfig
    from trainer.doctor.phases import phase_breakdowns, phase_pieces
    from trainer.doctor.speed import run_as_trained

    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])

    data = blobs(n=64)
    trainer = Trainer(build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-3),
                      config=TrainerConfig(progress_bar=False, verbose=False, tensorboard=False))
    trainer.fit(data, steps=1)
    phases = phase_breakdowns({"tiny": phase_pieces(trainer, data, lambda n: run_as_trained(trainer, n))})["tiny"]
    seconds = phases["seconds"]
    assert all(v >= 0 for v in seconds.values()) and seconds["input (pipeline alone)"] > 0
    assert (seconds["forward"] + seconds["backward"] + seconds["update and the rest"]
            == pytest.approx(phases["step_seconds"]))


def _quick_grid(candidate_ratios, bursts=(1.0, 2.2, 1.1, 1.6, 1.0, 2.4, 1.3, 1.0, 1.8, 1.2), batch_64=False):
    """A --quick grid on a CPU (a float32 XLA-off baseline and four candidates, five with `batch_64`: a float32
    batch 64 row) timed on a loaded machine: every call of a round slowed alike by that round's burst (a spread
    of 2.4x), the first candidate at the given per-round speed-ups, the others as fast as the baseline."""
    base = list(bursts)
    first = [b / r for b, r in zip(base, candidate_ratios)]
    rows = [_row("float32", 32, base)]
    configs = [("mixed_float16", True, 32), ("float32", True, 32), ("mixed_bfloat16", False, 32),
               ("mixed_bfloat16", True, 32)] + ([("float32", False, 64)] if batch_64 else [])
    rows += [_row(p, n, first if i == 0 else [b * (1.02 if j % 2 else 0.98) for j, b in enumerate(base)], xla=x)
             for i, (p, x, n) in enumerate(configs)]
    return rows


def test_a_narrow_pass_on_a_noisy_machine_is_a_lead_and_a_clear_win_stays_a_candidate():
    """The trial: on a machine whose calls varied 2.4x, --quick named mixed_float16 XLA on (a CPU) 1.31x
    "faster", 9 of 10 rounds won (p = 0.011 under 0.05 / 4), in 2 of 6 identical runs. Such a narrow pass is
    reported as a lead to verify (the train-with command stays what you run now); the statistics are the same
    (its verdict is still the test's). A 1.6x win in 10 of 10 rounds on the same machine stays a candidate, and
    the noise note says how noisy and what it means in each case."""
    from trainer.doctor import recommend
    from trainer.doctor.decide import wins_needed
    from trainer.doctor.render import _recommendation_lines
    from trainer.doctor.verify import mark_unverified

    narrow = [1.35, 1.3, 1.25, 1.4, 0.95, 1.3, 1.35, 1.3, 1.28, 1.3]  # lost round 5
    rec = mark_unverified(recommend(_report(*_quick_grid(narrow)), ["model.hidden_units=[16]"],
                                    baseline_xla=False, batch=32))
    assert rec["config"] == "mixed_float16 XLA on batch 32" and rec["verdict"] == "faster"  # the test is unchanged
    assert rec["lead"] and "won 9 of 10 rounds, the fewest that pass" in rec["lead"]
    lines = _recommendation_lines(rec)
    assert lines[1].startswith("  lead to verify, not called faster: mixed_float16 XLA on batch 32: 1.27x")
    assert "faster)" not in lines[1] and "keep what you run now until --verify N confirms it" in lines[1]
    train = next(line for line in lines if line.startswith("  train with:"))
    assert "precision=float32" in train and "trainer.jit_compile=false" in train
    assert any(line.startswith("  the lead:    python -m trainer") and "precision=mixed_float16" in line
               for line in lines)
    note = next(n for n in rec["notes"] if n.startswith("the machine was noisy"))
    assert "varied up to 2.5x between rounds" in note and "passed only narrowly" in note
    assert "a lead, not a finding by itself; --verify N settles it" in note

    clear = [1.6, 1.55, 1.65, 1.6, 1.5, 1.62, 1.58, 1.6, 1.7, 1.6]
    rec = mark_unverified(recommend(_report(*_quick_grid(clear)), [], baseline_xla=False, batch=32))
    assert rec["verdict"] == "faster" and rec["lead"] is None
    assert _recommendation_lines(rec)[1].startswith("  candidate, not yet verified: mixed_float16 XLA on batch 32")
    note = next(n for n in rec["notes"] if n.startswith("the machine was noisy"))
    assert "ran at 1.50-1.70x" in note and "won 10 of 10 rounds: its gain held through the noise" in note

    # six rows compared: alpha 0.05 / 5 = 0.01, which only 10 of 10 rounds pass; a sweep is still not narrow
    rec = mark_unverified(recommend(_report(*_quick_grid(clear, batch_64=True)), [], baseline_xla=False, batch=32))
    assert wins_needed(10, 0.05 / 5) == 10 and len(rec["versus_baseline"]) == 6
    assert rec["verdict"] == "faster" and rec["lead"] is None

    quiet = _quick_grid(narrow, bursts=[1.0] * 10)  # the same narrow pass on a quiet machine: a candidate, no note
    rec = recommend(_report(*quiet), [], baseline_xla=False, batch=32)
    assert rec["verdict"] == "faster" and rec["lead"] is None
    assert not any(n.startswith("the machine was noisy") for n in rec["notes"])


def test_the_noise_note_tells_a_no_gain_that_held_from_an_interval_too_wide():
    from trainer.doctor import recommend

    tie = [1.0, 0.99, 1.01, 1.0, 0.98, 1.0, 1.01, 0.99, 1.0, 1.0]
    rec = recommend(_report(*_quick_grid(tie)), [], baseline_xla=False, batch=32)
    assert not rec["changed"]
    note = next(n for n in rec["notes"] if n.startswith("the machine was noisy"))
    assert "still rules out a gain of 1.05x or more: the answer holds" in note and "rerun" not in note
    wide = [0.6, 1.35, 0.7, 1.3, 0.75, 0.95, 1.25, 0.8, 0.9, 1.6]
    rec = recommend(_report(*_quick_grid(wide)), [], baseline_xla=False, batch=32)
    note = next(n for n in rec["notes"] if n.startswith("the machine was noisy"))
    assert not rec["changed"] and "does not rule out a gain of 1.05x or more: too noisy to tell; rerun when" in note
    assert "mixed_float16 XLA on batch 32 ran at 0.60-1.60x float32 XLA off batch 32" in note


def test_an_override_after_a_bare_verify_is_an_override(capsys):
    """`python -m trainer.doctor --verify precision=auto` failed in argparse ("invalid int value:
    'precision=auto'"): --verify is given without N (100 steps) and the override is one; a word that is
    neither says how to write --verify."""
    from trainer.doctor.__main__ import parse_args

    args = parse_args(["--verify", "precision=auto", "--set-auto"])
    assert (args.verify, args.overrides, args.set_auto) == (100, ["precision=auto"], True)
    assert parse_args(["--verify", "18", "model.hidden_units=[8]"]).verify == 18
    with pytest.raises(SystemExit) as stopped:
        parse_args(["--verify", "many"])
    assert stopped.value.code == 2
    assert "'many' is not a number of steps: give --verify N (e.g. --verify 100), or --verify alone" in \
        capsys.readouterr().err


def test_a_phase_below_the_measurements_noise_is_said_so_not_a_clamped_zero(monkeypatch):
    """float32 ResNet's "update and the rest" read 0.00 (0%) in one run (the step minus forward with gradients
    was negative, clamped) and 9.65 ms in the next. A difference of two timed pieces smaller than their spread
    over the rounds is shown as "< noise (±x ms)"; one above it keeps its time. Timings are injected."""
    from trainer.doctor import phases
    from trainer.doctor.render import _phase_lines

    ms = {("f32", "step"): [6.2, 6.0, 6.4], ("f32", "forward"): [0.12, 0.1, 0.13],
          ("f32", "forward_backward"): [6.3, 5.9, 6.6], ("f32", "input"): [1.5, 1.4, 1.6],
          ("bf16", "step"): [10.0, 10.2, 9.8], ("bf16", "forward"): [1.0, 1.1, 0.9],
          ("bf16", "forward_backward"): [2.0, 2.1, 1.9], ("bf16", "input"): [1.0, 1.0, 1.0]}
    monkeypatch.setattr(phases, "seconds_of", lambda call: 0.0)
    monkeypatch.setattr(phases, "repeats_lasting", lambda timed, seconds, most: 1)
    monkeypatch.setattr(phases, "interleaved_seconds",
                        lambda calls, rounds, warmup: {key: [t / 1e3 for t in ms[key]] for key in calls})
    pieces = {config: {name: (lambda n: None) for name in ("step", "forward", "forward_backward", "input")}
              for config in ("f32", "bf16")}
    breakdown = phases.phase_breakdowns(pieces)
    assert breakdown["f32"]["below_noise"] == ["update and the rest"]
    assert breakdown["f32"]["noise_seconds"]["update and the rest"] == pytest.approx(0.55e-3)
    assert breakdown["bf16"]["below_noise"] == []
    rows = [{"name": "float32 XLA off batch 128", "phases": breakdown["f32"]},
            {"name": "mixed_bfloat16 XLA off batch 128", "phases": breakdown["bf16"]}]
    lines = _phase_lines(rows)
    f32 = next(line for line in lines if line.startswith("  float32"))
    bf16 = next(line for line in lines if line.startswith("  mixed_bfloat16"))
    assert "< noise (±0.55 ms)" in f32 and "0.00 (0%)" not in f32
    assert "8.00 (80%)" in bf16 and "noise" not in bf16
    assert '"< noise (±x ms)": a difference of two timed pieces smaller than their spread' in lines[-1]


@pytest.mark.slow  # a real doctor run, signalled once its speed grid is being built
def test_sigterm_during_the_speed_grid_stops_the_doctor_with_143_and_no_report(tmp_path):
    """SIGTERM while the grid's Trainers compiled (inside their fit()) was taken by them and the doctor ran on
    for a minute to a normal report and exit 0: it now stops there, says so in one line, writes no report."""
    import signal
    import subprocess
    import sys

    from conftest import wait_until

    out, err_file = tmp_path / "doctor", tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "trainer.doctor", "--quick", "model.hidden_units=[8]",
                                 "data.batch_size=16", "--out", str(out)], stdout=subprocess.PIPE, stderr=err,
                                text=True)
        wait_until(lambda: "speed: [1/" in err_file.read_text(), proc, "the speed grid started")
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=60)
    stderr = err_file.read_text()
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: the doctor wrote no report")
    assert "Traceback" not in stderr and "RECOMMENDATION" not in stdout
    assert not (out / "doctor.json").exists() and not (out / "doctor.txt").exists()
