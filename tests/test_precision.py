"""Mixed precision: policies, loss scaling order and state, faults, output checks, conversion."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_metrics, run_cli
from trainer import Callback, NumericalError, PrecisionConfig, Trainer, TrainerConfig
from trainer.xla_plan import decide_jit_compile
from trainer.convert import convert_model
from trainer.loss_scale import LossScale
from trainer import precision as precision_lib
from trainer.precision import PrecisionError


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def mlp(units=16, out_dtype="float32"):
    return lambda: keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(units, activation="relu"), keras.layers.Dense(2, dtype=out_dtype)]
    )


def batches(n_batches=40, batch=16, poison=None, seed=0):
    """Deterministic (x, y) batches; `poison` maps batch index -> value written into x (inf/NaN/huge)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_batches, batch, 8)).astype("float32")
    y = (x[..., 0] > 0).astype("int32")
    for i, value in (poison or {}).items():
        x[i] = value
    return tf.data.Dataset.from_tensor_slices((x, y))


def make(precision, model=None, **options):
    options.setdefault("progress_bar", False)
    options.setdefault("optimizer", lambda: keras.optimizers.SGD(0.05))
    return Trainer(
        model=model or mlp(),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        precision=precision,
        log_every=1,
        **options,
    )


def weights(trainer):
    return [v.numpy().copy() for v in trainer.model.trainable_variables]


@pytest.mark.parametrize("policy", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_policy_keeps_float32_variables_and_outputs(policy):
    # bfloat16 without XLA (auto would pick XLA on this CPU kind; test_resnet/test_transformer run auto)
    trainer = make(policy, jit_compile=False if policy == "mixed_bfloat16" else None)
    trainer.fit(batches(), steps=3)
    assert all(v.dtype == "float32" for v in trainer.model.trainable_variables)
    x, _ = next(iter(batches()))
    assert trainer.model(x).dtype == tf.float32
    expected = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}[policy]
    assert trainer.model.layers[0].compute_dtype == expected
    assert trainer.loss_scale.enabled == (policy == "mixed_float16")


def test_underflowing_gradient_is_recovered_by_scaling():
    """(a) A gradient below float16's smallest subnormal (6e-8) is zero unscaled, exact scaled."""

    class TinyLoss(Trainer):
        def compute_loss(self, x, y, y_pred, sample_weight=None):
            return tf.reduce_mean(tf.cast(y_pred, tf.float32)) * 1e-7

    results = {}
    for name, scale in (("unscaled", 1.0), ("scaled", 2.0**15)):
        trainer = TinyLoss(
            model=mlp(out_dtype=None), loss=keras.losses.MeanSquaredError(),
            optimizer=lambda: keras.optimizers.SGD(0.0),
            precision=PrecisionConfig(policy="mixed_float16", loss_scale=scale, strict_outputs=False),
            progress_bar=False,
        )
        batch = next(iter(batches()))
        trainer.build(batch)
        _, grads = trainer.compute_gradients(batch)
        results[name] = grads[0].numpy()  # first-layer kernel: flows back through float16 activations
    assert np.count_nonzero(results["unscaled"]) == 0
    assert np.count_nonzero(results["scaled"]) > 0


# XLA skips by select, not tf.cond (trainer/update.py Updater._apply_selected)
@pytest.mark.parametrize("jit_compile", [False, True])
def test_overflow_skips_exactly_that_update_and_halves_scale(jit_compile):
    """(b) An injected overflow (x = 1e5 > float16 max) skips its update only; training continues."""
    ds = batches(poison={2: 1e5})
    trainer = make(PrecisionConfig(policy="mixed_float16", initial_scale=1024.0), jit_compile=jit_compile,
                   optimizer=lambda: keras.optimizers.Adam(1e-3))
    trainer.fit(ds, steps=2)
    state = lambda: weights(trainer) + [v.numpy() for v in trainer.optimizer.variables
                                        if v is not trainer.optimizer.iterations]
    before = state()
    trainer.fit(ds, steps=3)  # batch 2: non-finite
    after_skip = state()
    assert all(np.array_equal(a, b) for a, b in zip(before, after_skip))  # weights and Adam's slots
    assert float(trainer.loss_scale.scale.numpy()) == 512.0
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1
    trainer.fit(ds, steps=6)
    assert not all(np.array_equal(a, b) for a, b in zip(after_skip, weights(trainer)))
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1
    assert int(trainer.step.numpy()) == 6 and int(trainer.optimizer.iterations.numpy()) == 6


def test_nan_batch_through_batchnorm_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    """A NaN input batch is skipped, but its forward pass already wrote NaN into BatchNormalization's
    moving statistics: the run stops with NumericalError instead of going on (and exiting 0) with
    weights that no checkpoint will take."""
    bn_mlp = lambda: keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(16), keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Dense(2, dtype="float32"),
    ])
    ended = []

    class RecordEnd(Callback):
        def on_train_end(self, trainer, summary):
            ended.append(summary)

    trainer = make("float32", model=bn_mlp, run_dir=tmp_path, checkpoint_every=3, callbacks=[RecordEnd()])
    with pytest.raises(NumericalError, match="BatchNormalization's moving statistics"):
        trainer.fit(batches(poison={4: np.nan}), steps=20)
    assert len(ended) == 1 and ended[0]["failed"].startswith("NumericalError")  # writers get to close
    assert int(trainer.step.numpy()) == 5 and int(trainer.loss_scale.skipped_steps.numpy()) == 1
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("ckpt-*.index"))] == ["ckpt-3.index"]


def test_weights_that_turn_non_finite_without_a_skip_stop_the_run_at_the_next_save(tmp_path):
    # A weight the training forward pass does not read (BatchNormalization's moving variance: training
    # uses the batch's statistics), so every step stays finite on every CPU's kernels and nothing is
    # skipped; poisoning a kernel instead gives inf*0 or inf-inf, NaN or not depending on the kernel.
    model = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                      keras.layers.BatchNormalization(), keras.layers.Dense(2)])

    class Poison(Callback):
        def on_loop_end(self, trainer, step):
            if step == 4:
                variance = next(w for w in trainer.model.weights if "moving_variance" in w.path)
                variance.assign(tf.fill(variance.shape, np.inf))

    trainer = make("float32", model=model, run_dir=tmp_path, checkpoint_every=3, callbacks=[Poison()])
    with pytest.raises(NumericalError, match="weights are no longer finite"):
        trainer.fit(batches(), steps=20)
    assert int(trainer.step.numpy()) == 6 and int(trainer.loss_scale.skipped_steps.numpy()) == 0  # the save caught it
    assert [p.name for p in sorted((tmp_path / "checkpoints").glob("ckpt-*.index"))] == ["ckpt-3.index"]


def test_scale_grows_after_growth_interval():
    """(c) ×2 after `growth_interval` finite steps in a row."""
    trainer = make(PrecisionConfig(policy="mixed_float16", initial_scale=8.0, growth_interval=3))
    trainer.fit(batches(), steps=7)
    assert float(trainer.loss_scale.scale.numpy()) == 32.0  # doubled at steps 3 and 6
    assert int(trainer.loss_scale.good_steps.numpy()) == 1


def test_scale_trajectory_matches_keras_loss_scale_optimizer():
    """(d) Same finite/non-finite sequence -> same scale sequence as Keras 3's LossScaleOptimizer."""
    sequence = [True] * 5 + [False] + [True] * 7 + [False, False] + [True] * 9 + [False] + [True] * 4
    var = keras.Variable(np.zeros(3, "float32"))
    keras_opt = keras.mixed_precision.LossScaleOptimizer(keras.optimizers.SGD(0.0), initial_scale=64.0,
                                                         dynamic_growth_steps=4)
    keras_opt.build([var])
    ours = LossScale("dynamic", initial_scale=64.0, growth_interval=4)
    keras_scales, our_scales = [], []
    for finite in sequence:
        grad = np.ones(3, "float32") if finite else np.full(3, np.inf, "float32")
        keras_opt.apply([tf.constant(grad)], [var])
        ours.update(tf.constant(finite))
        keras_scales.append(float(keras_opt.dynamic_scale.numpy()))
        our_scales.append(float(ours.scale.numpy()))
    assert our_scales == keras_scales
    assert len(set(our_scales)) > 2  # the sequence exercised growth and backoff


def test_checkpoint_round_trip_restores_scale(tmp_path):
    """(e) The scale and good-step counter live in the checkpoint."""
    ds = batches(poison={1: 1e5})
    precision = PrecisionConfig(policy="mixed_float16", initial_scale=256.0, growth_interval=2)
    first = make(precision, run_dir=tmp_path)
    first.fit(ds, steps=6)
    saved = (float(first.loss_scale.scale.numpy()), int(first.loss_scale.good_steps.numpy()),
             int(first.loss_scale.skipped_steps.numpy()))
    assert saved[0] != 256.0 and saved[2] == 1
    second = make(precision, run_dir=tmp_path)
    second.fit(ds, steps=6)  # resumes at step 6: nothing left to train
    restored = (float(second.loss_scale.scale.numpy()), int(second.loss_scale.good_steps.numpy()),
                int(second.loss_scale.skipped_steps.numpy()))
    assert restored == saved


def test_fixed_scale_never_changes():
    trainer = make(PrecisionConfig(policy="mixed_float16", loss_scale=1024.0))
    trainer.fit(batches(poison={1: 1e5}), steps=5)
    assert float(trainer.loss_scale.scale.numpy()) == 1024.0
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_non_finite_loss_without_scaling_skips_and_counts(policy):
    trainer = make(policy, jit_compile=False)  # the tf.cond skip (XLA's select: test_xla_whole_step_skips_by_select...)
    ds = batches(poison={2: np.nan})
    trainer.fit(ds, steps=2)
    before = weights(trainer)
    trainer.fit(ds, steps=3)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(trainer)))
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1
    assert all(np.isfinite(w).all() for w in weights(trainer))


def test_without_skipping_the_first_non_finite_step_stops_the_run_unsaved(tmp_path):
    """precision.skip_nonfinite=false applies every update (no wait on the finite check), so a NaN step
    poisons the weights: the run stops there, and no checkpoint holds them."""
    ds = batches(n_batches=40, poison={12: np.nan})
    trainer = make(PrecisionConfig(policy="float32", skip_nonfinite=False), run_dir=tmp_path, checkpoint_every=5)
    with pytest.raises(NumericalError, match="skip_nonfinite=false"):
        trainer.fit(ds, steps=40)
    assert int(trainer.step.numpy()) == 13
    assert not all(np.isfinite(w).all() for w in weights(trainer))  # the NaN update was applied
    fresh = make("float32", run_dir=tmp_path)
    fresh.fit(ds, steps=10)  # resumes from ckpt-10, the newest: finite weights, nothing to train
    assert int(fresh.step.numpy()) == 10 and all(np.isfinite(w).all() for w in weights(fresh))


def test_consecutive_skips_stop_the_run_with_last_checkpoint_intact(tmp_path):
    ds = batches(n_batches=40, poison={i: np.nan for i in range(10, 40)})
    trainer = make("float32", run_dir=tmp_path, checkpoint_every=5)
    trainer.precision.max_consecutive_skips = 6
    with pytest.raises(NumericalError, match="consecutive steps had non-finite"):
        trainer.fit(ds, steps=40)
    assert int(trainer.step.numpy()) == 16
    stopped_weights = weights(trainer)  # every update after step 10 was skipped
    fresh = make("float32", run_dir=tmp_path)
    fresh.fit(ds, steps=15)  # resumes from the newest checkpoint (step 15), nothing to train
    assert int(fresh.step.numpy()) == 15
    assert all(np.array_equal(a, b) for a, b in zip(stopped_weights, weights(fresh)))


def test_scale_at_floor_still_overflowing_stops():
    ds = batches(n_batches=60, poison={i: np.inf for i in range(60)})
    trainer = make(PrecisionConfig(policy="mixed_float16", initial_scale=4.0, max_consecutive_skips=1000))
    with pytest.raises(NumericalError, match="floor of 1"):
        trainer.fit(ds, steps=60)
    assert int(trainer.step.numpy()) < 15


def test_learning_rate_schedule_sees_the_global_step_under_float16():
    schedule = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=10, end_learning_rate=0.0)
    trainer = Trainer(
        model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(schedule), precision="mixed_float16", progress_bar=False, log_every=1,
    )
    logs = []

    class Record(__import__("trainer").Callback):
        def on_log(self, trainer, step, row):
            logs.append((step, row["lr"]))

    trainer.callbacks.callbacks.append(Record())
    trainer.fit(batches(poison={3: 1e5}), steps=6)
    assert int(trainer.optimizer.iterations.numpy()) == 6  # the skipped step still advances it
    for step, lr in logs:
        assert lr == pytest.approx(float(schedule(step)), rel=1e-6)


def test_float16_outputs_are_wrapped_or_rejected(caplog):
    with caplog.at_level(logging.WARNING):
        trainer = make("mixed_float16", model=mlp(out_dtype=None))
        trainer.fit(batches(), steps=1)
    x, _ = next(iter(batches()))
    assert trainer.model(x).dtype == tf.float32
    assert "float32 linear activation" in caplog.text
    strict = make(PrecisionConfig(policy="mixed_float16", strict_outputs=True), model=mlp(out_dtype=None))
    with pytest.raises(PrecisionError, match="strict_outputs"):
        strict.fit(batches(), steps=1)


def test_conversion_round_trip_preserves_predictions():
    """(g) float32 -> mixed_float16 -> float32: close, then exactly the original weights' outputs."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(3, dtype="float32")]
    )
    x = tf.random.normal((16, 8), seed=1)
    half, report = convert_model(model, "mixed_float16", x)
    assert report.relative_error <= report.tolerance and report.output_dtypes == ["float32"]
    assert half.layers[0].compute_dtype == "float16"
    back, report_back = convert_model(half, "float32", x)
    np.testing.assert_allclose(back(x).numpy(), model(x).numpy(), rtol=1e-6, atol=1e-6)
    assert report_back.variable_bytes_after == report.variable_bytes_before


def test_conversion_of_subclassed_model_with_get_config():
    @keras.saving.register_keras_serializable(package="tests")
    class Net(keras.Model):
        def __init__(self, units=16, **kwargs):
            super().__init__(**kwargs)
            self.units = units
            self.hidden = keras.layers.Dense(units, activation="relu")
            self.out = keras.layers.Dense(2)

        def call(self, x, training=False):
            return self.out(self.hidden(x))

        def get_config(self):
            return {**super().get_config(), "units": self.units}

    model = Net()
    x = tf.random.normal((4, 8), seed=2)
    model(x)
    converted, report = convert_model(model, "mixed_bfloat16", x)
    assert report.output_dtypes == ["float32"] and report.relative_error <= report.tolerance


@pytest.mark.slow
def test_precisions_reach_the_same_accuracy(tmp_path):
    """(f) float32, mixed_bfloat16 and mixed_float16 MNIST runs of one length: within 1.5 points."""
    accuracy = {}
    for policy in ("float32", "mixed_bfloat16", "mixed_float16"):
        run_dir = tmp_path / policy
        result = run_cli(
            f"precision={policy}", "trainer.max_steps=600", "trainer.log_every=100", "trainer.progress_bar=false",
            "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        rows = read_metrics(run_dir)
        accuracy[policy] = [r for r in rows if r["split"] == "eval"][-1]["accuracy"]
        if policy == "mixed_float16":
            assert all("loss_scale" in r for r in rows if r["split"] == "train")
    assert max(accuracy.values()) - min(accuracy.values()) <= 0.015, accuracy
    assert min(accuracy.values()) > 0.8


def test_conversion_of_keras_applications_and_keras_hub_models():
    app = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, classes=4,
                                              include_preprocessing=False)
    images = tf.random.uniform((2, 32, 32, 3), seed=3)
    converted, report = convert_model(app, "mixed_bfloat16", images, measure_time=False)
    assert report.relative_error <= report.tolerance and report.output_dtypes == ["float32"]

    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16, intermediate_dim=32, max_sequence_length=8
    )
    tokens = {
        "token_ids": tf.constant([[2, 5, 7, 3, 0, 0, 0, 0]] * 2),
        "segment_ids": tf.zeros((2, 8), tf.int32),
        "padding_mask": tf.constant([[1, 1, 1, 1, 0, 0, 0, 0]] * 2),
    }
    converted, report = convert_model(backbone, "mixed_float16", tokens, measure_time=False)
    assert report.relative_error <= report.tolerance and report.output_dtypes == ["float32"]


def test_convert_cli_on_a_trained_run(tmp_path, tiny):
    run_dir = tmp_path / "run"
    assert run_cli(*tiny, f"hydra.run.dir={run_dir}").returncode == 0
    out = tmp_path / "converted"
    result = run_cli(str(run_dir), "--policy", "mixed_bfloat16", "--out", str(out), module="trainer.convert")
    assert result.returncode == 0, result.stderr[-2000:]
    report = __import__("json").loads((out / "conversion.json").read_text())
    assert report["target_policy"] == "mixed_bfloat16" and report["relative_error"] <= report["tolerance"]
    reloaded = keras.saving.load_model(out / "model.keras")
    dtypes = {layer.name: layer.compute_dtype for layer in reloaded.layers}
    assert dtypes["dense"] == "bfloat16" and dtypes["logits"] == "float32", dtypes
    bad = run_cli(str(tmp_path / "nothing"), "--policy", "mixed_float16", "--out", str(tmp_path / "x"),
                  module="trainer.convert")
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


def test_convert_warns_with_measured_numbers_when_inference_gets_slower(monkeypatch, caplog):
    """Issue 30: mixed_float16 on a CPU made inference 16x slower, silently. The timings are injected
    (the measured ones, 4.8 and 78.5 ms): the warning names both, the ratio and the fix; a converted model
    as fast as the source gets no warning."""
    from trainer import convert

    model = mlp()()
    x = tf.random.normal((4, 8))
    monkeypatch.setattr(convert, "_time_predicts", lambda before, after, inputs: (0.0048, 0.0785))
    with caplog.at_level(logging.WARNING, logger="trainer.convert"):
        _, report = convert_model(model, "mixed_float16", x)
    assert report.seconds_per_batch_after == 0.0785
    assert "16.4x slower" in caplog.text and "78.5 vs 4.8 ms per batch" in caplog.text
    assert "keep float32 for inference here" in caplog.text and "median of 5 interleaved calls" in caplog.text
    from types import SimpleNamespace  # back to float32: no claim about fast float32 matmuls

    to_float32 = convert.slowdown_warning(SimpleNamespace(seconds_per_batch_before=0.001, seconds_per_batch_after=0.01,
                                                          source_policy="mixed_bfloat16", target_policy="float32"),
                                          "CPU")
    assert "mixed_bfloat16 measured faster on this CPU" in to_float32 and "matmuls" not in to_float32
    caplog.clear()
    monkeypatch.setattr(convert, "_time_predicts", lambda before, after, inputs: (0.0048, 0.005))
    with caplog.at_level(logging.WARNING, logger="trainer.convert"):
        convert_model(model, "mixed_bfloat16", x)
    assert "slower" not in caplog.text


def test_debug_numerics_names_the_first_bad_op(tmp_path):
    # A healthy run passes the checks: saves, evaluation, and float16 (auto XLA is off: XLA cannot compile them).
    healthy = run_cli("precision=mixed_float16", "precision.debug_numerics=true", "trainer.max_steps=6",
                      "trainer.checkpoint_every=3", "trainer.eval_every=3", "trainer.eval_steps=2",
                      "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'healthy'}")
    assert healthy.returncode == 0, healthy.stderr[-3000:]
    assert "XLA: off (precision.debug_numerics=true" in healthy.stdout + healthy.stderr
    result = run_cli(
        "optimizer=sgd", "optimizer.lr=1e30", "precision.debug_numerics=true", "trainer.max_steps=20",
        "trainer.progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 3
    assert 'Detected Infinity or NaN in output 0 of graph op' in result.stdout + result.stderr
    with pytest.raises(PrecisionError, match="trainer.jit_compile=false"):
        make(PrecisionConfig(debug_numerics=True), jit_compile=True)
    tf.debugging.disable_check_numerics()


def test_xla_auto_setting_and_cpu_bfloat16_advice(caplog, monkeypatch):
    """jit_compile=None (auto) turns XLA on, on a CPU, for float16, and for bfloat16 only on Intel with
    AVX-512 BF16 and no AMX; an explicit XLA with bfloat16 on a CPU is kept, and warned about where XLA
    skips fast bfloat16 kernels (AMX, AMD Zen 4)."""
    assert not tf.config.list_physical_devices("GPU")  # this test describes the CPU behaviour
    assert make("mixed_float16").jit_compile is True
    assert make("float32").jit_compile is False
    assert make("mixed_float16", jit_compile=False).jit_compile is False
    for flags, vendor, auto in [({"amx_bf16", "avx512_bf16"}, "GenuineIntel", False),
                                ({"avx512_bf16"}, "AuthenticAMD", False),
                                ({"avx512_bf16"}, "GenuineIntel", True), ({"avx512_bf16"}, "HygonGenuine", False),
                                ({"avx2"}, "GenuineIntel", False)]:
        monkeypatch.setattr(precision_lib, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision_lib, "cpu_vendor", lambda: vendor)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert make("mixed_bfloat16").jit_compile is auto, (flags, vendor)
        assert ("XLA: on (trainer.jit_compile=null means auto)" in caplog.text) is auto
        assert make("mixed_bfloat16", jit_compile=False).jit_compile is False
        two_replicas = decide_jit_compile(TrainerConfig(), PrecisionConfig(policy="mixed_bfloat16"), on_cpu=True,
                                          replicas=2)
        assert two_replicas is False  # not measured there: stays off
    with caplog.at_level(logging.WARNING):
        assert make("float32", jit_compile=True).jit_compile is True
    assert "bfloat16" not in caplog.text
    for flags, vendor, warned in [({"amx_bf16", "avx512_bf16"}, "GenuineIntel", True),
                                  ({"avx512_bf16"}, "AuthenticAMD", True),
                                  ({"avx512_bf16"}, "GenuineIntel", False)]:
        monkeypatch.setattr(precision_lib, "cpu_flags", lambda: flags)
        monkeypatch.setattr(precision_lib, "cpu_vendor", lambda: vendor)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert make("mixed_bfloat16", jit_compile=True).jit_compile is True
        warnings = [r for r in caplog.records
                    if r.levelno == logging.WARNING and "XLA with mixed_bfloat16" in r.message]
        assert bool(warnings) is warned, (flags, vendor, caplog.text)
        if warned:
            assert "trainer.jit_compile=false is likely faster" in warnings[0].message
        else:
            assert "XLA with mixed_bfloat16 on a CPU without AMX" in caplog.text


@pytest.mark.parametrize(
    "flags, says",
    [({"avx512f", "amx_bf16", "avx512_bf16"}, "bfloat16 is fast here (AMX)"),
     ({"avx512f", "avx512_bf16"}, "whether it trains faster than float32 depends on the CPU and the model"),
     ({"avx2"}, "bfloat16 is emulated and slow here")],
)
def test_hardware_report_tells_amx_from_avx512_bf16(monkeypatch, flags, says):
    """AVX-512 BF16 alone is not a promise of speed: measured 0.56x float32 on an Intel Xeon without AMX."""
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: flags)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    text = precision_lib.hardware_report("mixed_bfloat16", tf.distribute.get_strategy())
    assert text.startswith("No GPU or TPU found") and says in text


@pytest.mark.parametrize(
    "flags, vendor, policy, says",
    [({"avx2"}, "GenuineIntel", "mixed_float16", "Use precision=float32 on this machine"),
     ({"avx2"}, "GenuineIntel", "mixed_bfloat16", "Use precision=float32 on this machine"),
     ({"avx2"}, "GenuineIntel", "float32", None),
     ({"avx512_bf16"}, "GenuineIntel", "mixed_float16", "Consider precision=float32 on this machine"),
     ({"avx512_bf16"}, "GenuineIntel", "mixed_bfloat16", "Consider precision=float32 on this machine"),
     ({"avx512_bf16"}, "AuthenticAMD", "mixed_float16", "Consider precision=mixed_bfloat16"),
     ({"avx512_bf16", "amx_bf16"}, "GenuineIntel", "mixed_float16", "Consider precision=mixed_bfloat16"),
     ({"avx512_bf16", "amx_bf16"}, "GenuineIntel", "mixed_bfloat16", None)],
)
def test_hardware_report_advice_follows_the_cpu(monkeypatch, flags, vendor, policy, says):
    """mixed_float16 on a CPU without bfloat16 hardware was told "bfloat16 is emulated and slow here" and
    then "Consider precision=mixed_bfloat16": the advice must follow from the CPU's flags."""
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision_lib, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    text = precision_lib.hardware_report(policy, tf.distribute.get_strategy())
    if says is None:
        assert "Consider" not in text and "Use precision" not in text, text
    else:
        assert says in text, text
    if not flags & {"avx512_bf16", "amx_bf16"}:
        assert "mixed_bfloat16" not in text, text  # never suggested where bfloat16 is emulated


@pytest.mark.parametrize("strategy", [None, "one_device"])
def test_xla_whole_step_skips_by_select_on_one_replica(strategy):
    """Inside XLA the skip is a select (no tf.cond), also under OneDeviceStrategy, whose replica context
    does not support the no-merge-call path."""
    trainer = Trainer(
        model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.Adam(1e-3), precision="float32", jit_compile=True, progress_bar=False,
        strategy=tf.distribute.OneDeviceStrategy("/cpu:0") if strategy else None,
    )
    ds = batches(poison={1: np.nan})
    trainer.fit(ds, steps=1)
    before = weights(trainer)
    trainer.fit(ds, steps=2)  # batch 1: non-finite
    assert trainer.plan_xla().whole_step and all(u.skip_by_select for u in trainer.updaters.values())
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(trainer)))
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1


@pytest.mark.parametrize("mode, scale", [("fixed", 1024.0), ("none", 1.0)])
def test_unscaled_gradients_are_the_gradients_of_the_loss_divided(mode, scale):
    """LossScale.unscaled_gradients: gradients of loss * scale / divide, then / scale (what scaling the
    loss inside the tape gives), for a per-example loss and with the scale off too."""
    w = tf.Variable([[0.5, -1.0], [2.0, 0.25]])
    x = tf.constant([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    with tf.GradientTape(persistent=True) as tape:
        loss = tf.reduce_sum(tf.square(x @ w), axis=1)  # one value per example
        scaled = loss * scale / 2
    got = LossScale(mode, 1024).unscaled_gradients(tape, loss, [w], divide=2)
    want = tape.gradient(scaled, [w])[0] / scale
    np.testing.assert_allclose(got[0].numpy(), want.numpy(), rtol=1e-6)
    assert got[0].dtype == tf.float32


def test_the_precision_argument_takes_a_keras_policy_and_a_dict_and_names_what_was_meant():
    """Trainer(precision=...) from Python: another tool's name is a ConfigError naming the policy meant as the
    CLI does, in the Python form; a Keras dtype policy (by its name) and a dict of PrecisionConfig's fields are
    taken; anything else is a TypeError naming what it takes (it was an AttributeError from deep inside)."""
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"did you mean mixed_bfloat16\? From Python: "
                                          r"Trainer\(precision=\"mixed_bfloat16\"\)"):
        make("bf16")
    with pytest.raises(ConfigError, match=r"did you mean mixed_float16\?"):
        PrecisionConfig(policy="fp16")
    assert make(keras.mixed_precision.Policy("mixed_bfloat16")).precision.policy == "mixed_bfloat16"
    taken = make({"policy": "mixed_float16", "loss_scale": 1024.0}).precision
    assert (taken.policy, taken.loss_scale) == ("mixed_float16", 1024.0)
    with pytest.raises(ConfigError, match=r"the dict's key 'loss_scal' is no field of PrecisionConfig. Fix: did you "
                                          r"mean 'loss_scale'\?"):
        make({"policy": "float32", "loss_scal": 8.0})
    with pytest.raises(ConfigError, match=r"did you mean mixed_bfloat16\?"):  # Keras' pure bfloat16 policy
        make(keras.mixed_precision.Policy("bfloat16"))
    assert make(None).precision.policy == "float32"  # None: the default (float32, or a ready-made model's policy)
    for wrong in (16, ["mixed_bfloat16"]):
        with pytest.raises(TypeError, match=r"Trainer\(precision=\.\.\.\) got .*it takes a policy name \(float32, "
                                            r"mixed_float16, mixed_bfloat16 or auto\), a trainer.PrecisionConfig, a "
                                            r"dict of PrecisionConfig's fields or a Keras dtype policy"):
            make(wrong)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float32"])
def test_a_loss_scale_without_loss_scaling_is_warned_about_once(policy, caplog):
    """precision.loss_scale=1024 under a policy that scales nothing was ignored with an INFO line only."""
    config = PrecisionConfig(policy=policy, loss_scale=1024.0)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer = make(config, jit_compile=False)
        trainer.fit(batches(n_batches=2), steps=2)
    records = [r for r in caplog.records if "precision.loss_scale" in r.getMessage()]
    said = [r.getMessage() for r in records]
    assert len(said) == 1 and records[0].levelno == logging.WARNING
    assert said[0].startswith(f"precision.loss_scale=1024 is ignored under precision={policy}: loss scaling applies "
                              "only to mixed_float16")
    assert "Fix: drop precision.loss_scale, or use precision=mixed_float16." in said[0]
    assert not trainer.loss_scale.enabled
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(PrecisionConfig(policy="mixed_float16", loss_scale=1024.0))
    assert "precision.loss_scale" not in caplog.text
