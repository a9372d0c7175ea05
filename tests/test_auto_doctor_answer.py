"""`python -m trainer.doctor --set-auto` keys its answer by machine AND recipe/model config, and keeps the
verified configuration's XLA setting: precision=auto follows it for runs of that model only (another
model, or a Trainer from Python, gets the probe's rule and the start-up log says why), and applies the
XLA part only where trainer.jit_compile was left at its default. Timings are injected (the doctor's
measuring is replaced by a report built from given per-round times)."""
from __future__ import annotations

import json
import logging

import keras
import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from trainer import auto_precision

RUN = ("model.hidden_units=[8]", "data.batch_size=16", "trainer.max_steps=1", "trainer.eval_every=0",
       "trainer.checkpoint_every=0", "trainer.progress_bar=false", "trainer.log_every=1")


@pytest.fixture(autouse=True)
def mocked_plain_cpu(tmp_path, monkeypatch):
    """A CPU without fast bfloat16 (auto alone: float32, no probe) and a private cache."""
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto_precision, "_gpu_capabilities", lambda: [])
    monkeypatch.setattr(auto_precision, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(auto_precision, "cpu_model", lambda: "Mocked CPU")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def _no_probe(policy):
    raise AssertionError("a plain CPU is not probed")


def test_the_answer_is_followed_for_its_model_only_and_keeps_its_xla_part():
    mlp8 = auto_precision.model_identity("mnist", {"kind": "mlp", "hidden_units": [8]})
    mlp16 = auto_precision.model_identity("mnist", {"kind": "mlp", "hidden_units": [16]})
    assert mlp8["key"] != mlp16["key"] and "recipe=mnist" in mlp8["label"] and "hidden_units=[8]" in mlp8["label"]
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.6,
                                      model=mlp8, jit_compile=True)
    choice = auto_precision.choose(measure=_no_probe, model=mlp8)
    assert (choice.policy, choice.jit_compile) == ("mixed_bfloat16", True) and "XLA on" in choice.why
    other = auto_precision.choose(measure=_no_probe, model=mlp16)
    assert (other.policy, other.jit_compile) == ("float32", None)
    assert "for other models" in other.why and mlp8["label"] in other.why and mlp16["label"] in other.why
    python = auto_precision.choose(measure=_no_probe)  # a Trainer from Python: no recipe, no stored answer
    assert python.policy == "float32" and "names no recipe" in python.why
    auto_precision.save_doctor_answer("float32", "python -m trainer precision=float32", 1.1, model=mlp16)
    assert auto_precision.choose(model=mlp8).policy == "mixed_bfloat16"  # two models, two answers


def test_an_answer_stored_per_machine_only_is_not_followed_and_said():
    """...until --set-auto is run again, as the log advises: storing an answer drops the old one."""
    key = auto_precision.machine_key(auto_precision.machine())
    auto_precision.write_json_atomically(auto_precision.cache_path(), {key: {"doctor": {
        "policy": "mixed_bfloat16", "command": "x", "speedup": 1.5, "when": "2025-01-01 00:00"}}})
    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    policy, why = auto_precision.decide(measure=_no_probe, model=model)
    assert policy == "float32" and "stored before answers were kept per model" in why
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.5, model=model)
    assert "doctor" not in json.loads(auto_precision.cache_path().read_text())[key]
    other = auto_precision.model_identity("mnist", {"hidden_units": [16]})
    policy, why = auto_precision.decide(measure=_no_probe, model=other)
    assert policy == "float32" and "stored before" not in why and model["label"] in why


def test_malformed_answers_are_ignored_with_one_warning(caplog):
    """A hand-edited answer whose values choose() cannot use (a speed-up that is text, an XLA setting that is
    no boolean, a policy that is none of the three, a missing key) is left out, with one warning; a good
    answer beside them is still followed."""
    key = auto_precision.machine_key(auto_precision.machine())
    good = {"policy": "mixed_bfloat16", "command": "x", "speedup": 1.5, "when": "2025-01-01 00:00", "model": "good"}
    bad = {"a": {**good, "speedup": "fast", "model": "a"}, "b": {**good, "jit_compile": "yes", "model": "b"},
           "c": {**good, "policy": "float64", "model": "c"}, "d": {k: v for k, v in good.items() if k != "speedup"}}
    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    answers = {**{k: {**v, "model": f"model {k}"} if k == "d" else v for k, v in bad.items()}, model["key"]: good}
    auto_precision.write_json_atomically(auto_precision.cache_path(), {key: {
        "doctor": {**good, "jit_compile": "yes"}, auto_precision.BY_MODEL: answers}})
    for k in bad:  # each bad answer, as the only one for its model: the probe's rule, no crash
        with caplog.at_level(logging.WARNING, logger="trainer.auto_precision"):
            caplog.clear()
            choice = auto_precision.choose(measure=_no_probe, model={"key": k, "label": f"recipe=x ({k})"})
        assert (choice.policy, choice.jit_compile) == ("float32", None)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "not in the expected form" in warnings[0].getMessage()
        said = warnings[0].getMessage()
        assert "'fast' is not a number" in said and "'yes' is not true, false or null" in said
        assert "'float64' is not one of" in said and "missing speedup" in said and "stored before" in said
    assert auto_precision.choose(measure=_no_probe, model=model).policy == "mixed_bfloat16"


def test_the_xla_part_applies_only_where_jit_compile_was_left_at_its_default():
    assert auto_precision.xla_applies(None, ["precision=auto", "model.hidden_units=[8]"])
    assert not auto_precision.xla_applies(False, [])  # a recipe's or a Python config's own setting
    assert not auto_precision.xla_applies("measure", [])
    assert not auto_precision.xla_applies(None, ["trainer.jit_compile=null"])  # given, even as the default


def _injected_report(overrides):
    """What diagnose_parts returns, from injected per-round times: mixed_bfloat16 with XLA on won every
    grid round and --verify's rounds over float32 XLA off (what the run uses now)."""
    from trainer.doctor import recommend
    from trainer.doctor.verify import verify_outcome

    def row(policy, xla, per_example):
        return {"name": f"{policy} XLA {'on' if xla else 'off'} batch 16", "policy": policy, "xla": xla, "batch": 16,
                "examples_per_sec": 1 / per_example[0], "steps_per_sec": 1 / per_example[0] / 16,
                "seconds_per_example": per_example, "memory_mb": 100.0, "memory_kind": "process_rss", "spread": 1.05,
                "steps_per_call": [40] * len(per_example), "first_call_seconds": 1.0, "xla_layout": "-"}

    current, fast = row("float32", False, [1.0] * 10), row("mixed_bfloat16", True, [0.5 + 0.01 * i for i in range(10)])
    report = {"meta": {"command": "python -m trainer.doctor", "wall_seconds": 1.0},
              "numerics": {"float16": {"safe": True, "blockers": []}, "bfloat16": {"safe": True, "blockers": []}},
              "speed": {"rounds": 10, "configs": [current, fast], "skipped": [], "memory_means": "RSS growth"}}
    rec = recommend(report, overrides, baseline_xla=False, batch=16)
    report["recommendation"] = verify_outcome(rec, [0.6, 0.61, 0.62, 0.6, 0.59], [1.0] * 5)
    del report["numerics"]  # the picture's float16 panel needs the full section
    return report


def test_set_auto_through_the_cli_then_an_auto_run_of_that_model(monkeypatch, tmp_path):
    import trainer.doctor

    # the doctor's measuring, replaced: python -m trainer.doctor's main composes the config and renders,
    # writes and stores (--set-auto) this report as it would a measured one
    monkeypatch.setattr(trainer.doctor, "diagnose_parts", lambda parts, data, **kw: _injected_report(kw["overrides"]))
    done = run_cli("--set-auto", "--verify", "20", *RUN[:2], "--out", str(tmp_path / "doctor"), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision=auto now chooses mixed_bfloat16 with XLA on" in done.stdout and "hidden_units=[8]" in done.stdout
    stored = next(iter(json.loads(auto_precision.cache_path().read_text()).values()))["doctor_by_model"]
    assert [(a["jit_compile"], a["batch"]) for a in stored.values()] == [(True, 16)]

    same = tmp_path / "same"
    done = run_cli("precision=auto", *RUN, f"hydra.run.dir={same}")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "precision=auto chose mixed_bfloat16" in out and "trainer.jit_compile=true with it" in out
    recorded = OmegaConf.load(same / ".hydra" / "config.yaml")
    assert recorded.precision.policy == "mixed_bfloat16" and recorded.trainer.jit_compile is True
    assert json.loads((same / auto_precision.RUN_RECORD).read_text())["jit_compile"] is True


def _cli_model(*overrides):
    from trainer.assemble import compose_config

    return auto_precision.model_identity_of(compose_config(list(overrides)))


def test_another_model_and_a_given_jit_compile_at_unit_level(tmp_path, caplog):
    """What `python -m trainer` resolves for another width (the probe's rule), and with trainer.jit_compile
    given (the answer's policy, the user's XLA setting, recorded as not applied: a resume without the
    override does not turn XLA on)."""
    from trainer.config import PrecisionConfig

    ours, wider = _cli_model(*RUN[:2]), _cli_model("model.hidden_units=[16]", *RUN[1:2])
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.6,
                                      model=ours, jit_compile=True, batch=16)
    auto = PrecisionConfig(policy="auto")
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        precision, xla = auto_precision.resolve_run(auto, measure=_no_probe, model=wider, overrides=[])
    assert ((precision.policy, xla) == ("float32", None)
            and "stored answers on this machine are for other models" in caplog.text)
    run = tmp_path / "given"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        precision, xla = auto_precision.resolve_run(auto, measure=_no_probe, model=ours, run_dir=run, jit_compile=False,
                                                    overrides=["trainer.jit_compile=false"])
    assert (precision.policy, xla) == ("mixed_bfloat16", None)
    assert "trainer.jit_compile=false, as set, is kept" in caplog.text and "batch 16" in caplog.text
    assert json.loads((run / auto_precision.RUN_RECORD).read_text())["jit_compile"] is None  # not applied
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-1.index").write_text("")
    precision, xla = auto_precision.resolve_run(auto, measure=_no_probe, model=ours, run_dir=run, overrides=[])
    assert (precision.policy, xla) == ("mixed_bfloat16", None)  # the resume keeps what ran: XLA as it was


def test_set_auto_stores_no_gain_and_a_changed_xla_setting(capsys, caplog):
    """The measured answer "keep what you run" (no significant gain, or --verify withdrew the change) is
    stored too: auto follows it for that model instead of the probe's rule. An XLA setting is stored only
    where it differs from the run's."""
    from trainer.config import PrecisionConfig
    from trainer.doctor.__main__ import _set_auto
    from trainer.doctor.verify import verify_outcome

    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    rec = _injected_report([])["recommendation"]
    withdrawn = verify_outcome({**rec, "notes": []}, [1.0] * 5, [1.0] * 5)  # not faster through fit(): withdrawn
    assert not withdrawn["changed"] and withdrawn["batch"] == 16
    _set_auto(withdrawn, model)
    said = capsys.readouterr().out
    assert "--verify did not confirm mixed_bfloat16 XLA on batch 16 (1.00x, won 0 of 5 rounds" in said
    assert "no gain over float32" in said and "stored that answer, with float32" in said
    assert "nothing stored" not in said.lower()
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        precision, xla = auto_precision.resolve_run(PrecisionConfig(policy="auto"), measure=_no_probe, model=model)
    assert (precision.policy, xla) == ("float32", None)
    assert "the doctor measured no faster alternative to float32 for this model" in caplog.text
    _set_auto(rec, model)  # mixed_bfloat16 XLA on, over float32 XLA off: both stored
    choice = auto_precision.choose(model=model)
    assert (choice.policy, choice.jit_compile) == ("mixed_bfloat16", True) and "no gain" not in choice.why
    assert "It replaces the answer stored for this model on " in capsys.readouterr().out  # float32 (no gain) before
    _set_auto({**rec, "current": {**rec["current"], "xla": True}}, model)  # XLA as the run has it: not stored
    assert auto_precision.choose(model=model).jit_compile is None


def test_a_resume_keeps_the_recorded_xla_part(tmp_path, caplog):
    from trainer.config import PrecisionConfig

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    auto_precision.write_json_atomically(run / auto_precision.RUN_RECORD,
                                         {"policy": "mixed_bfloat16", "why": "x", "jit_compile": True})
    (run / "checkpoints" / "ckpt-1.index").write_text("")  # what list_checkpoints reads: a checkpoint to resume
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        precision, xla = auto_precision.resolve_run(PrecisionConfig(policy="auto"), run_dir=run, measure=_no_probe)
    assert (precision.policy, xla) == ("mixed_bfloat16", True) and "precision=auto kept mixed_bfloat16" in caplog.text


def _trial_rounds(speedup_per_round):
    """Per-round seconds per example of a candidate whose speed-up over a baseline of 1.0 is given per round."""
    return [1.0 / r for r in speedup_per_round]


def test_an_inconclusive_verify_stores_nothing_and_says_so(capsys):
    """The trial's ResNet: the grid found mixed_bfloat16 1.45x faster, --verify measured 1.24x with a 95% interval
    of about 0.88-1.60x (8 of 9 rounds): not "no gain" (the interval holds a gain of 1.05x or more) but
    inconclusive: nothing is stored (a stored answer stays), and the message says what was measured, why it
    cannot tell and the fix. A real no gain (every interval below 1.05x) is stored."""
    from trainer.doctor.__main__ import _set_auto
    from trainer.doctor.render import render_text
    from trainer.doctor.verify import verify_outcome

    model = auto_precision.model_identity("resnet", {"name": "resnet20"})
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.58,
                                      model=model, batch=16)
    report = _injected_report([])
    rec = report["recommendation"] = verify_outcome(
        {**report["recommendation"], "notes": []},
        _trial_rounds([1.9, 1.7, 1.3, 1.1, 0.35, 1.6, 1.8, 1.2, 1.15]), [1.0] * 9)
    assert rec["verify"]["withdrawn"] and rec["verify"]["interval"][1] > 1.05
    assert "inconclusive (not measured faster, and its interval does not rule out a gain of 1.05x" in rec["notes"][0]
    assert "(inconclusive: --verify's interval does not rule out a gain" in render_text(report)
    _set_auto(rec, model)
    said = capsys.readouterr().out
    assert said.startswith("--set-auto: NOTHING STORED: the measurement is inconclusive.")
    assert "--verify measured mixed_bfloat16 XLA on batch 16 at " in said and "won 8 of 9 rounds" in said
    assert "no such interval rules out a gain of 1.05x or more" in said and "larger --verify N" in said
    assert "it keeps following the answer stored for this model on " in said
    assert auto_precision.choose(model=model).policy == "mixed_bfloat16"  # the answer stored before stays

    no_gain = verify_outcome({**_injected_report([])["recommendation"], "notes": []},
                             _trial_rounds([1.0, 0.98, 1.01, 0.99, 1.0] * 2), [1.0] * 10)
    assert no_gain["verify"]["interval"][1] < 1.05 and not no_gain["gain_unsettled"]
    _set_auto(no_gain, model)
    said = capsys.readouterr().out
    assert "so the measured answer is no gain over float32" in said
    assert "It replaces the answer stored for this model on " in said and ": mixed_bfloat16 (faster, 1.58x)" in said
    assert auto_precision.choose(model=model).policy == "float32"


def test_a_grid_too_noisy_to_tell_stores_nothing_through_the_cli(monkeypatch, tmp_path):
    """No configuration significantly faster, but the closest's interval (the trial's MNIST: 0.89x, 0.76-1.07x)
    does not exclude a gain: --set-auto stores nothing, exits 0 as its other non-answers, and, the machine
    measured noisy, says to rerun when it is quieter or with a larger --verify N."""
    import trainer.doctor
    from trainer.doctor import recommend

    def report(**_):
        rows = [{"name": f"{p} XLA off batch 16", "policy": p, "xla": False, "batch": 16, "examples_per_sec": 1.0,
                 "steps_per_sec": 1 / 16, "seconds_per_example": t, "memory_mb": 100.0, "memory_kind": "process_rss",
                 "spread": 1.9, "steps_per_call": [40] * 10, "first_call_seconds": 1.0, "xla_layout": "-"}
                for p, t in (("float32", [1.0] * 10), ("mixed_bfloat16", _trial_rounds(
                    [0.6, 1.35, 0.7, 1.3, 0.75, 0.95, 1.25, 0.8, 0.9, 0.65])))]
        out = {"meta": {"command": "python -m trainer.doctor", "wall_seconds": 1.0},
               "speed": {"rounds": 10, "configs": rows, "skipped": [], "memory_means": "RSS growth"}}
        out["recommendation"] = recommend({**out, "numerics": {"float16": {"safe": True, "blockers": []},
                                                               "bfloat16": {"safe": True, "blockers": []}}},
                                          [], baseline_xla=False, batch=16)
        out["recommendation"]["verify"] = {"skipped": "nothing to compare"}
        return out

    monkeypatch.setattr(trainer.doctor, "diagnose_parts", lambda parts, data, **kw: report())
    done = run_cli("--set-auto", "--verify", "20", *RUN[:2], "--out", str(tmp_path / "doctor"), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--set-auto: NOTHING STORED: the measurement is inconclusive." in done.stdout
    assert "inconclusive. The grid measured mixed_bfloat16 XLA off batch 16 at " in done.stdout
    assert "Meanwhile, train with precision=float32 (what you run now)" in done.stdout
    assert ("Fix: rerun when the machine is quieter (its rounds varied up to 1.9x), or rerun with a larger --verify N"
            in done.stdout)
    assert "its rounds' speed-ups ranged 0.60-1.35x" in done.stdout and "it keeps its own rule" in done.stdout
    assert not auto_precision.cache_path().exists()


def test_verify_settles_what_a_quiet_grid_left_unsettled(monkeypatch, capsys):
    """A true 1.03x on a quiet machine (the docs' MNIST: closest 1.03x, interval 0.98-1.08x) is neither
    "faster" nor "no gain", and the grid keeps what you run now: --verify N trains the unsettled row whose
    interval reaches highest against it, so --set-auto can store the no gain it measures. Still unsettled,
    the fix on a quiet machine is a larger --verify N, not a quieter machine, and names what to train with."""
    import trainer.doctor.verify as verify_module
    from trainer.doctor import recommend
    from trainer.doctor.__main__ import _set_auto

    def row(policy, xla, per_example):
        return {"name": f"{policy} XLA {'on' if xla else 'off'} batch 16", "policy": policy, "xla": xla, "batch": 16,
                "examples_per_sec": 1.0, "steps_per_sec": 1 / 16, "seconds_per_example": per_example,
                "memory_mb": 100.0, "memory_kind": "process_rss", "spread": 1.1, "steps_per_call": [40] * 10,
                "first_call_seconds": 1.0, "xla_layout": "-"}

    near = _trial_rounds([1.08, 0.99, 1.06, 1.0, 1.07, 0.98, 1.05, 1.01, 1.08, 1.0])  # 1.03x, reaching 1.05x
    rows = [row("float32", False, [1.0] * 10), row("mixed_bfloat16", False, near),
            row("float32", True, _trial_rounds([1.0, 0.99, 1.01, 1.0, 1.02, 0.98, 1.03, 1.0, 1.01, 0.99]))]
    report = {"numerics": {"float16": {"safe": True, "blockers": []}, "bfloat16": {"safe": True, "blockers": []}},
              "speed": {"configs": rows}}
    rec = recommend(report, [], baseline_xla=False, batch=16)
    assert not rec["changed"] and [u["name"] for u in rec["gain_unsettled"]][:1] == ["mixed_bfloat16 XLA off batch 16"]
    trained = []

    def pair(make_trainer, data_for_batch, configs, steps, progress, rounds=None):
        trained.append({k: r["name"] for k, r in configs.items()})
        return {"unsettled": rounds, "current": [1.0] * 9}

    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    monkeypatch.setattr(verify_module, "_train_pair", lambda *a: pair(*a, rounds=_trial_rounds(
        [1.02, 1.0, 1.01, 1.03, 1.0, 1.02, 1.01, 1.02, 1.0])))
    settled = verify_module.verify(None, None, rec, rows, 90, print)
    assert trained[-1] == {"unsettled": "mixed_bfloat16 XLA off batch 16", "current": "float32 XLA off batch 16"}
    assert not settled["gain_unsettled"] and "settled: keep what you run now" in settled["notes"][0]
    _set_auto(settled, model)
    assert "the doctor measured no gain over float32" in capsys.readouterr().out
    assert auto_precision.choose(model=model).policy == "float32"

    monkeypatch.setattr(verify_module, "_train_pair", lambda *a: pair(*a, rounds=_trial_rounds(
        [1.08, 0.99, 1.06, 1.0, 1.07, 0.98, 1.05, 1.01, 1.08])))
    still = verify_module.verify(None, None, rec, rows, 90, print)
    assert [u["by"] for u in still["gain_unsettled"]] == ["--verify"] and "still unsettled" in still["notes"][0]
    _set_auto(still, model)
    said = capsys.readouterr().out
    assert said.startswith("--set-auto: NOTHING STORED") and "Meanwhile, train with precision=float32" in said
    assert "Fix: rerun with a larger --verify N" in said and "the machine was quiet" in said and "quieter" not in said


def _noisy_grid_then_verify(monkeypatch, unsettled_rounds, current_rounds):
    """python -m trainer.doctor's measuring replaced: a noisy grid (spread 1.9x) that leaves mixed_bfloat16
    unsettled against float32 (the trial's MNIST), then the real --verify (verify.verify), whose training rounds
    are the given seconds per example."""
    import trainer.doctor
    import trainer.doctor.verify as verify_module
    from trainer.doctor import recommend

    rows = [{"name": f"{p} XLA off batch 16", "policy": p, "xla": False, "batch": 16, "examples_per_sec": 1.0,
             "steps_per_sec": 1 / 16, "seconds_per_example": t, "memory_mb": 100.0, "memory_kind": "process_rss",
             "spread": 1.9, "steps_per_call": [40] * 10, "first_call_seconds": 1.0, "xla_layout": "-"}
            for p, t in (("float32", [1.0] * 10), ("mixed_bfloat16", _trial_rounds(
                [0.6, 1.35, 0.7, 1.3, 0.75, 0.95, 1.25, 0.8, 0.9, 0.65])))]

    def diagnose_parts(parts, data, **kw):
        out = {"meta": {"command": "python -m trainer.doctor", "wall_seconds": 1.0},
               "speed": {"rounds": 10, "configs": rows, "skipped": [], "memory_means": "RSS growth"}}
        rec = recommend({**out, "numerics": {"float16": {"safe": True, "blockers": []},
                                             "bfloat16": {"safe": True, "blockers": []}}},
                        kw["overrides"], baseline_xla=False, batch=16)
        assert "too noisy to tell; rerun when the machine is quieter, or with --verify N" in rec["noise_note"]
        out["recommendation"] = verify_module.verify(None, None, rec, rows, kw["verify_steps"], lambda _: None)
        return out

    monkeypatch.setattr(trainer.doctor, "diagnose_parts", diagnose_parts)
    monkeypatch.setattr(verify_module, "_train_pair", lambda *a: {"unsettled": unsettled_rounds,
                                                                  "current": current_rounds})


def test_once_verify_trained_its_noise_replaces_the_grids_in_the_report_json_and_set_auto(monkeypatch, tmp_path):
    """The grid's noise note ("too noisy to tell; rerun ... or with --verify N") and its spread stayed in the
    report after --verify had trained the unsettled configuration: a report advising --verify beside a
    --set-auto that stored --verify's answer, or quoting the grid's 1.9x beside --set-auto's 2.6x. --verify's
    rounds now replace the grid's: one noise verdict in doctor.txt, doctor.json and --set-auto's words."""
    out = tmp_path / "quiet"
    _noisy_grid_then_verify(monkeypatch, _trial_rounds([1.0, 0.98, 1.01, 0.99, 1.0, 1.0, 0.99, 1.01, 1.0]), [1.0] * 9)
    done = run_cli("--set-auto", "--verify", "20", *RUN[:2], "--out", str(out), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    text, rec = (out / "doctor.txt").read_text(), json.loads((out / "doctor.json").read_text())["recommendation"]
    assert "settled: keep what you run now" in text and "the machine was noisy" not in text  # quiet under --verify
    assert "spread of --verify's rounds 1.03x (mixed_bfloat16 XLA off batch 16), 1.00x (current)" in text
    assert rec["spread"]["by"] == "--verify" and rec["spread"]["largest"] < 1.5 and rec["noise_note"] is None
    assert "the doctor measured no gain over float32" in done.stdout
    assert auto_precision.choose(model=_cli_model(*RUN[:2])).policy == "float32"

    out = tmp_path / "noisy"
    current = [1.0, 2.0, 1.0, 1.5, 1.0, 2.2, 1.0, 1.2, 1.0]  # bursts of load in --verify's rounds too
    _noisy_grid_then_verify(monkeypatch, [c / r for c, r in zip(current, [0.7, 1.3, 0.8, 1.25, 0.75, 1.2, 0.9, 1.3,
                                                                           0.85])], current)
    done = run_cli("--set-auto", "--verify", "20", *RUN[:2], "--out", str(out), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    text, rec = (out / "doctor.txt").read_text(), json.loads((out / "doctor.json").read_text())["recommendation"]
    spread = rec["spread"]["largest"]
    assert rec["spread"]["by"] == "--verify" and spread == pytest.approx(2.2)  # the current's rounds
    (note,) = [n for n in rec["notes"] if n.startswith("the machine was noisy")]
    assert note == rec["noise_note"] and f"varied up to {spread:.1f}x between --verify's rounds" in note
    assert note.endswith("too noisy to tell; rerun when the machine is quieter, or with a larger --verify N: longer "
                         "rounds average more of the noise out")
    assert "1.9x" not in text and "or with --verify N" not in text  # the grid's note is gone
    assert "NOTHING STORED" in done.stdout and f"rerun when the machine is quieter (its rounds varied up to " \
        f"{spread:.1f}x)" in done.stdout

    out = tmp_path / "faster_by_verify_only"  # the grid did not find it faster; --verify, noisy, did
    _noisy_grid_then_verify(monkeypatch, [c / 1.4 for c in current], current)
    done = run_cli("--verify", "20", *RUN[:2], "--out", str(out), module="trainer.doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    rec = json.loads((out / "doctor.json").read_text())["recommendation"]
    assert rec["noise_note"].endswith("measured faster by --verify only (the grid did not find it faster): rerun "
                                      "the doctor, on a quieter machine if you can")
    assert "held through the noise" not in (out / "doctor.txt").read_text()


def test_an_answer_an_older_doctor_stored_as_no_gain_is_followed_with_the_advice_to_measure(caplog):
    """Before, an inconclusive measurement was stored as "no significant difference" too: auto still follows
    such an answer, says so, and names the doctor command that measures it again."""
    from trainer.config import PrecisionConfig

    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    auto_precision.save_doctor_answer("float32", "python -m trainer precision=float32", 1.0, model=model,
                                      verdict=auto_precision.OLD_NO_GAIN)
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        precision, _ = auto_precision.resolve_run(PrecisionConfig(policy="auto"), measure=_no_probe, model=model,
                                                  overrides=["model.hidden_units=[8]"])
    assert precision.policy == "float32"
    assert "an earlier doctor stored \"no significant gain\"" in caplog.text and "too wide to tell" in caplog.text
    assert "`python -m trainer.doctor 'model.hidden_units=[8]' --verify --set-auto`" in caplog.text


def _kept_bfloat16(per_example_float32):
    """The recommendation when the run used mixed_bfloat16 (precision=auto's stored answer) and float32 took
    `per_example_float32` per example in its rounds (mixed_bfloat16: 1.0)."""
    from trainer.doctor import recommend

    def row(policy, per_example):
        return {"name": f"{policy} XLA off batch 16", "policy": policy, "xla": False, "batch": 16,
                "examples_per_sec": 1 / per_example[0], "steps_per_sec": 1 / per_example[0] / 16,
                "seconds_per_example": per_example, "memory_mb": 100.0, "memory_kind": "process_rss", "spread": 1.05,
                "first_call_seconds": 1.0, "xla_layout": "-"}

    report = {"meta": {"command": "python -m trainer.doctor", "wall_seconds": 1.0},
              "numerics": {"float16": {"safe": True, "blockers": []}, "bfloat16": {"safe": True, "blockers": []}},
              "speed": {"rounds": 10, "skipped": [], "memory_means": "RSS growth",
                        "configs": [row("mixed_bfloat16", [1.0] * 10), row("float32", per_example_float32)]}}
    report["recommendation"] = recommend(report, [], baseline_xla=False, batch=16, policy="mixed_bfloat16")
    del report["numerics"]
    return report


def test_a_confirmed_stored_answer_is_kept_and_every_slower_alternative_is_said(capsys, caplog):
    """The run used precision=auto's stored "faster" answer and every alternative measured slower: the report
    says so (not "no significant difference"), and --set-auto keeps the stored answer instead of overwriting
    it with "no gain"; a "no gain" answer is logged as no faster alternative, and a replaced answer is said,
    also when only its verdict and speed-up change."""
    from trainer.config import PrecisionConfig
    from trainer.doctor.__main__ import _set_auto
    from trainer.doctor.render import render_text

    model = auto_precision.model_identity("mnist", {"hidden_units": [8]})
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.31,
                                      model=model, batch=16)
    report = _kept_bfloat16([1.45 + 0.01 * i for i in range(10)])  # float32: ~0.68x, lost every round
    rec = report["recommendation"]
    text = render_text(report)
    assert "keep it: every alternative measured slower" in text and "no significant difference" not in text
    _set_auto(rec, model)
    said = capsys.readouterr().out
    assert "confirmed the answer stored for" in said and "every alternative measured slower" in said
    kept = auto_precision.stored_answer(model)
    assert (kept["policy"], kept["verdict"], kept["speedup"]) == ("mixed_bfloat16", "faster", 1.31)

    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer", 1.31, model=model, batch=32)
    _set_auto(rec, model)  # stored at another batch: measured anew at this one, and the replacement said
    said = capsys.readouterr().out
    assert "stored that answer" in said and "It replaces the answer stored for this model on " in said
    assert "mixed_bfloat16 (faster, 1.31x)" in said
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        auto_precision.resolve_run(PrecisionConfig(policy="auto"), measure=_no_probe, model=model)
    assert "the doctor measured no faster alternative to mixed_bfloat16 for this model" in caplog.text


def test_an_answer_measured_at_another_batch_is_followed_and_the_batch_said():
    """The gain of bfloat16 depends on the batch (the doctor measured ResNet's at one size): a run of another
    batch follows the stored answer (same model) and is told it was measured at the stored batch."""
    cfg = OmegaConf.create({"recipe": "mnist", "model": {"hidden_units": [8]}, "data": {"batch_size": 32}})
    at_32 = auto_precision.model_identity_of(cfg)
    cfg.data.batch_size = 128
    at_128 = auto_precision.model_identity_of(cfg)
    assert at_32["key"] == at_128["key"] and (at_32["batch"], at_128["batch"]) == (32, 128)
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.31,
                                      model=at_128, batch=128)
    same = auto_precision.choose(measure=_no_probe, model=at_128)
    other = auto_precision.choose(measure=_no_probe, model=at_32)
    assert same.policy == other.policy == "mixed_bfloat16"
    assert "this run's batch" not in same.why
    assert "measured at batch 128; this run's batch is 32" in other.why and "data.batch_size=32" in other.why
