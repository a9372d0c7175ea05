"""precision=auto on mocked hardware: an AMX CPU, a plain CPU, a CPU whose bfloat16 probe is slow, GPUs of
compute capability 7.0 and 8.0; the probe is cached per machine, the doctor's stored answer wins for the
model it was measured on (tests/test_auto_doctor_answer.py: per model, its XLA part), and the CLI logs the
choice and records the chosen policy."""
from __future__ import annotations

import logging
import re

import keras
import pytest
import tensorflow as tf
from omegaconf import OmegaConf

from conftest import run_cli
from trainer import auto_precision
from trainer.config import PrecisionConfig

MODEL = auto_precision.model_identity("mnist", {"kind": "mlp", "hidden_units": [8]})


def _cli_model(*overrides):
    """The model identity `python -m trainer OVERRIDES` resolves precision=auto for."""
    from trainer.assemble import compose_config

    return auto_precision.model_identity_of(compose_config(list(overrides)))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_CACHE_DIR", str(tmp_path / "cache"))
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def _probe(speedup, calls):
    def measure(policy):
        calls.append(policy)
        return {"speedup": speedup, "rounds": 5, "side": 1024, "float32_gflops": 80.0,
                "reduced_gflops": 80.0 * speedup, "when": "now"}
    return measure


def _cpu(monkeypatch, flags):
    monkeypatch.setattr(auto_precision, "_gpu_capabilities", lambda: [])
    monkeypatch.setattr(auto_precision, "cpu_flags", lambda: set(flags) | {"avx2"})
    monkeypatch.setattr(auto_precision, "cpu_model", lambda: "Mocked CPU")


def test_amx_cpu_picks_bfloat16_when_the_probe_confirms_and_caches_it(monkeypatch):
    _cpu(monkeypatch, {"amx_bf16", "avx512_bf16"})
    calls = []
    policy, why = auto_precision.decide(measure=_probe(3.5, calls))
    assert policy == "mixed_bfloat16" and "AMX" in why and "3.50x" in why and calls == ["mixed_bfloat16"]
    policy, why = auto_precision.decide(measure=_probe(0.1, calls))  # cached: not probed again
    assert policy == "mixed_bfloat16" and "cached" in why and calls == ["mixed_bfloat16"]


def test_plain_cpu_picks_float32_without_a_probe(monkeypatch):
    _cpu(monkeypatch, set())
    calls = []
    policy, why = auto_precision.decide(measure=_probe(5.0, calls))
    assert policy == "float32" and "without AVX-512 BF16 or AMX" in why and calls == []


def test_cpu_whose_bfloat16_is_not_fast_picks_float32(monkeypatch):
    """AVX-512 BF16 without AMX (this machine, an AMD EPYC): float32, no probe. An AMX flag whose probe
    measures 0.56x: the measurement turns the candidate down."""
    _cpu(monkeypatch, {"avx512_bf16"})
    calls = []
    policy, why = auto_precision.decide(measure=_probe(3.0, calls))
    assert policy == "float32" and "no AMX" in why and calls == []
    # true for both vendors (slower on an Intel Xeon, faster for the ResNet recipe on a Zen 4): no claim of a
    # measured step, no figures
    assert "depends on the CPU and the model" in why and "without a measurement of this model" in why
    assert "measured no faster" not in why and not re.search(r"\d\.?\d*x", why)
    _cpu(monkeypatch, {"amx_bf16", "avx512_bf16", "avx2", "sse4_2"})  # another machine key: not the cache above
    policy, why = auto_precision.decide(measure=_probe(0.56, calls))
    assert policy == "float32" and "0.56x" in why and "under the 2x" in why and calls == ["mixed_bfloat16"]


@pytest.mark.parametrize("cc, expected", [((7, 0), "mixed_float16"), ((8, 0), "mixed_bfloat16"), ((6, 1), "float32")])
def test_gpus_by_compute_capability(monkeypatch, cc, expected):
    monkeypatch.setattr(auto_precision, "_gpu_capabilities", lambda: [cc])
    calls = []
    policy, why = auto_precision.decide(measure=_probe(4.0, calls))
    assert policy == expected and f"{cc[0]}.{cc[1]}" in why
    assert calls == ([] if expected == "float32" else [expected])  # a reduced policy is measured before it is chosen


def test_doctor_answer_overrides_the_probe_and_resolve_logs(monkeypatch, caplog):
    _cpu(monkeypatch, {"amx_bf16"})
    auto_precision.save_doctor_answer("float32", "python -m trainer precision=float32", 1.0, model=MODEL)
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        resolved, xla = auto_precision.resolve_run(PrecisionConfig(policy="auto"), measure=_probe(3.5, []), model=MODEL)
    assert resolved.policy == "float32" and xla is None
    assert "precision=auto chose float32" in caplog.text and "--set-auto" in caplog.text
    assert auto_precision.resolve(PrecisionConfig(policy="mixed_float16")).policy == "mixed_float16"  # explicit wins


@pytest.mark.parametrize("flags, expected", [({"amx_bf16"}, "mixed_bfloat16"), (set(), "float32")])
def test_cli_logs_the_choice_and_records_the_chosen_policy(monkeypatch, tmp_path, flags, expected):
    _cpu(monkeypatch, flags)
    monkeypatch.setattr(auto_precision, "measure_speedup", _probe(3.5, []))
    run = tmp_path / "run"
    done = run_cli("precision=auto", "model.hidden_units=[8]", "data.batch_size=16", "trainer.max_steps=2",
                   "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.progress_bar=false",
                   "trainer.log_every=1", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"precision=auto chose {expected}" in done.stdout + done.stderr
    assert OmegaConf.load(run / ".hydra" / "config.yaml").precision.policy == expected


def test_doctor_set_auto_stores_the_recommended_policy(monkeypatch, capsys):
    """`python -m trainer.doctor --set-auto`: a verified change of policy at the run's batch is what
    precision=auto then picks; an unverified one, a simpler one not faster, or one at another batch is not."""
    from trainer.doctor.__main__ import _set_auto

    _cpu(monkeypatch, set())  # a plain CPU: auto alone would pick float32
    rec = {"policy": "mixed_bfloat16", "command": "python -m trainer precision=mixed_bfloat16", "speedup": 1.4,
           "changed": True, "verdict": "faster", "xla": False, "batch": 16, "current_policy": "float32",
           "current": {"policy": "float32", "xla": False, "batch": 16, "timed": True},
           "current_command": "python -m trainer precision=float32"}
    _set_auto({**rec, "unverified": True}, MODEL)  # the grid alone: a candidate, not stored
    assert "nothing stored (the change is not verified faster" in capsys.readouterr().out
    verified = {**rec, "verify": {"verdict": "faster", "speedup": 1.3}}
    _set_auto({**verified, "verdict": "no significant difference"}, MODEL)  # simpler, not faster
    assert "nothing stored (the change is simpler" in capsys.readouterr().out
    _set_auto({**verified, "batch": 32}, MODEL)  # its gain was measured at another batch
    assert "nothing stored (the recommendation changes the batch size, 16 -> 32" in capsys.readouterr().out
    assert auto_precision.decide(measure=_probe(0.5, []), model=MODEL)[0] == "float32"
    assert not auto_precision.cache_path().exists()
    _set_auto(verified, MODEL)
    # XLA as now: not stored
    assert "precision=auto now chooses mixed_bfloat16 on this machine" in capsys.readouterr().out
    policy, why = auto_precision.decide(measure=_probe(0.5, []), model=MODEL)
    assert policy == "mixed_bfloat16" and "1.30x" in why and "batch 16" in why  # --verify's speed-up, the batch
    assert auto_precision.choose(model=MODEL).jit_compile is None


def test_cli_resume_keeps_the_policy_the_run_trained_in(monkeypatch, tmp_path):
    """A resume on precision=auto computes in the run's recorded policy, not this machine's new answer
    (the cache changed between the runs), says so, and the run's config record keeps it."""
    _cpu(monkeypatch, set())
    run = tmp_path / "run"
    common = ("precision=auto", "model.hidden_units=[8]", "data.batch_size=16", "trainer.eval_every=0",
              "trainer.checkpoint_every=1", "trainer.progress_bar=false", f"hydra.run.dir={run}")
    model = _cli_model(*common[:3])
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.5, model=model)
    done = run_cli(*common, "trainer.max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "precision=auto chose mixed_bfloat16" in done.stdout + done.stderr
    auto_precision.save_doctor_answer("float32", "python -m trainer precision=float32", 1.0, model=model)
    done = run_cli(*common, "trainer.max_steps=4")
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout + done.stderr
    assert "precision=auto kept mixed_bfloat16" in out and "precision=auto chose" not in out
    assert OmegaConf.load(run / ".hydra" / "config.yaml").precision.policy == "mixed_bfloat16"


def test_python_api_resume_keeps_the_policy_the_run_trained_in(monkeypatch, tmp_path, caplog):
    import numpy as np
    import tensorflow as tf

    from trainer import Trainer

    _cpu(monkeypatch, {"amx_bf16"})
    monkeypatch.setattr(auto_precision, "measure_speedup", _probe(3.5, []))
    data = tf.data.Dataset.from_tensor_slices((np.zeros((32, 4), "float32"), np.zeros(32, "int64"))).batch(8)

    def model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])

    def trainer():
        return Trainer(model=model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=keras.optimizers.SGD(0.1), precision="auto", run_dir=tmp_path, progress_bar=False,
                       checkpoint_every=1, tensorboard=False, max_steps=2)

    first = trainer()
    assert first.precision.policy == "mixed_bfloat16"
    first.fit(data)
    _cpu(monkeypatch, set())  # this machine's answer is now float32
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        assert trainer().precision.policy == "mixed_bfloat16"
    assert "precision=auto kept mixed_bfloat16" in caplog.text
    fresh = Trainer(model=model, loss="mse", optimizer=keras.optimizers.SGD(), precision="auto", run_dir=tmp_path / "x")
    assert fresh.precision.policy == "float32"  # no checkpoints there: this machine's current answer


@pytest.mark.parametrize("content", ["[]", '{"k": 1}', '{"k": {"doctor": {"policy": "float32"}}}', "{not json"])
def test_a_cache_of_the_wrong_shape_is_ignored_with_a_warning(monkeypatch, caplog, content):
    """Valid JSON of another shape (or no JSON) is no cache: said, then replaced by the next answer (atomically)."""
    _cpu(monkeypatch, {"amx_bf16"})
    auto_precision.cache_path().parent.mkdir(parents=True, exist_ok=True)
    auto_precision.cache_path().write_text(content)
    calls = []
    with caplog.at_level(logging.WARNING, logger="trainer.auto_precision"):
        policy, _ = auto_precision.decide(measure=_probe(3.5, calls))
    assert policy == "mixed_bfloat16" and len(calls) == 1 and "ignoring it" in caplog.text
    auto_precision.decide(measure=_probe(3.5, calls))
    assert len(calls) == 1  # the replaced cache is read back
    assert not list(auto_precision.cache_path().parent.glob(".*.tmp"))


def test_the_start_up_line_names_the_doctor_command_of_this_run_and_no_figures(monkeypatch, caplog):
    """AVX-512 BF16 without AMX: the log says how to measure this model (the doctor with the run's overrides,
    --verify --set-auto); once the doctor's answer is stored, it says it follows that answer, without
    the advice to measure again; from Python (no overrides), how to measure there."""
    from trainer import precision as precision_lib

    _cpu(monkeypatch, {"avx512_bf16"})
    auto = PrecisionConfig(policy="auto")
    overrides = ["recipe=resnet", "trainer.max_steps=10", "precision=auto", "trainer.eval_every=1000",
                 "model.hidden_units=[8]", "hydra.run.dir=/tmp/x"]  # the run's length and folder: not the doctor's;
    # its events are (the doctor's timed windows end at them)
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        auto_precision.resolve_run(auto, measure=_probe(3.0, []), model=MODEL, overrides=overrides)
    said = caplog.text
    assert ("`python -m trainer.doctor recipe=resnet precision=auto trainer.eval_every=1000 'model.hidden_units=[8]' "
            "--verify --set-auto` "
            "measures this model" in said) and "an explicit precision=... overrides it" in said
    assert not re.search(r"\d\.?\d*x", said)
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: {"avx512_bf16", "avx2"})
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    hardware = precision_lib.hardware_report("float32", tf.distribute.get_strategy())
    assert "depends on the CPU and the model" in hardware and not re.search(r"\d\.?\d*x float32", hardware)
    auto_precision.save_doctor_answer("mixed_bfloat16", "python -m trainer precision=mixed_bfloat16", 1.6, model=MODEL)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        auto_precision.resolve_run(auto, model=MODEL, overrides=overrides)
    assert "--set-auto measured it on this machine for this model" in caplog.text
    assert "measures this model" not in caplog.text and "an explicit precision=... overrides" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.auto_precision"):
        assert auto_precision.resolve(auto).policy == "float32"  # a Trainer from Python: no stored answer applies
    assert "trainer.doctor.diagnose(...) measures this model" in caplog.text and "--set-auto`" not in caplog.text


def test_the_doctor_says_what_auto_resolves_to_and_compares_against_it(monkeypatch):
    """The doctor with precision=auto: the report names the policy auto resolves to on this machine for this
    model, why, and that it is the baseline ("what you run now"); it used to be float32 without a word."""
    import numpy as np
    import tensorflow as tf

    from trainer.doctor import diagnose, render_text

    _cpu(monkeypatch, {"avx512_bf16"})
    data = tf.data.Dataset.from_tensor_slices((np.zeros((32, 4), "float32"), np.zeros(32, "int64"))).batch(8)

    def model():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2, dtype="float32")])

    report = diagnose(model, data, keras.losses.SparseCategoricalCrossentropy(from_logits=True), precision="auto",
                      sections=("model",), quick=True, progress=lambda _: None)
    assert report["meta"]["auto"]["policy"] == "float32" and "no AMX" in report["meta"]["auto"]["why"]
    line = render_text(report).splitlines()[1]
    assert line.startswith("precision=auto resolves to float32 on this machine for this model (a CPU with AVX-512 "
                           "BF16 but no AMX")
    assert line.endswith("the report compares every configuration against it, as what you run now")
    plain = diagnose(model, data, keras.losses.SparseCategoricalCrossentropy(from_logits=True), sections=("model",),
                     quick=True, progress=lambda _: None)
    assert "auto" not in plain["meta"] and "precision=auto" not in render_text(plain)


def test_the_doctor_schedules_its_own_steps_not_the_runs_max_steps(caplog):
    """The doctor trains its own count of steps: a short run's trainer.max_steps (shorter than its warmup)
    does not make the doctor's optimizers warn that the warmup outlasts the run."""
    from omegaconf import OmegaConf

    from trainer.doctor.__main__ import schedule_steps
    from trainer.optim import build_optimizer

    cfg = OmegaConf.create({"trainer": {"max_steps": 10}, "optimizer": {"warmup_steps": 40}})
    assert schedule_steps(cfg) >= 1000
    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        build_optimizer({"_target_": "keras.optimizers.SGD", "lr": 0.1, "warmup_steps": 40}, schedule_steps(cfg))
    assert "not shorter than the run" not in caplog.text
    cfg = OmegaConf.create({"trainer": {"max_steps": None}, "optimizer": {"warmup_steps": 5000}})
    assert schedule_steps(cfg) == 5001
