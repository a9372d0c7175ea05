"""The train step itself: gradient accumulation, clipping on unscaled gradients, grad multipliers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN
from trainer import PrecisionConfig, Trainer


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def data(n=320, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def make(**options):
    options.setdefault("progress_bar", False)
    return Trainer(
        model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                        keras.layers.Dense(2, dtype="float32")]),
        loss=options.pop("loss", keras.losses.SparseCategoricalCrossentropy(from_logits=True)),
        optimizer=options.pop("optimizer", lambda: keras.optimizers.SGD(0.1, momentum=0.9)),
        seed=0,
        log_every=1,
        **options,
    )


def test_accumulating_k_micro_batches_equals_one_large_batch():
    x, y = data()
    micro = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    large = tf.data.Dataset.from_tensor_slices((x, y)).batch(64, drop_remainder=True)
    accumulated = make(grad_accum_steps=4)
    accumulated.fit(micro, steps=5)
    reference = make()
    reference.fit(large, steps=5)
    for a, b in zip(accumulated.model.weights, reference.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert int(accumulated.optimizer.iterations.numpy()) == 5
    # An epoch is the data set once: its 20 micro-batches make 5 updates.
    by_epoch = make(grad_accum_steps=4)
    by_epoch.fit(micro, epochs=1)
    assert int(by_epoch.step.numpy()) == 5


def test_accumulation_composes_with_loss_scaling():
    """One non-finite micro-batch skips the whole accumulated update and halves the scale once."""
    x, y = data()
    x[16 * 5] = 1e5  # micro-batch 5 = second micro-batch of update 1 (float16 overflow)
    micro = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    trainer = make(grad_accum_steps=4, precision=PrecisionConfig(policy="mixed_float16", initial_scale=1024.0),
                   jit_compile=False)
    trainer.fit(micro, steps=1)
    before = [w.numpy().copy() for w in trainer.model.trainable_variables]
    trainer.fit(micro, steps=2)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, trainer.model.trainable_variables))
    assert float(trainer.loss_scale.scale.numpy()) == 512.0 and int(trainer.loss_scale.skipped_steps.numpy()) == 1
    trainer.fit(micro, steps=3)  # the accumulators were reset: the next update is finite and applied
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, trainer.model.trainable_variables))
    assert int(trainer.loss_scale.skipped_steps.numpy()) == 1


def test_clipping_acts_on_unscaled_gradients():
    """clipnorm bounds the update the same way with or without a loss scale of 2**15."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x * 50, y)).batch(32, drop_remainder=True)
    results = []
    for precision in ("float32", PrecisionConfig(policy="mixed_float16", loss_scale=2.0**15)):
        trainer = Trainer(
            model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, dtype="float32")]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.SGD(1.0),
            precision=precision, clipnorm=0.01, progress_bar=False, seed=0, jit_compile=False,
        )
        trainer.build(next(iter(ds)))
        start = [w.numpy().copy() for w in trainer.model.trainable_variables]
        trainer.fit(ds, steps=1)
        delta = np.sqrt(sum(np.sum((w.numpy() - s) ** 2) for w, s in zip(trainer.model.trainable_variables, start)))
        results.append(delta)
    assert results[0] == pytest.approx(0.01, rel=1e-3)  # SGD(1.0) moves exactly the clipped norm
    assert results[1] == pytest.approx(0.01, rel=2e-2)


def _clipvalue_step(precision, strategy=None):
    """One step of SGD(1.0, clipvalue=0.05) on a fixed batch: (weights before, after, the hand-computed
    gradient of the whole batch at the weights before)."""
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x * 5, y)).batch(32, drop_remainder=True)
    trainer = Trainer(
        model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, dtype="float32")]),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(1.0, clipvalue=0.05), strategy=strategy,
        precision=precision, progress_bar=False, seed=0, jit_compile=False,
    )
    batch = next(iter(ds))
    trainer.build(batch)
    start = [w.numpy().copy() for w in trainer.model.trainable_variables]
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(batch[1], trainer.model(batch[0]))
    grads = [g.numpy() for g in tape.gradient(loss, trainer.model.trainable_variables)]
    trainer.fit(ds, steps=1)
    return start, [w.numpy() for w in trainer.model.trainable_variables], grads


@pytest.mark.parametrize("precision", ["float32", PrecisionConfig(policy="mixed_float16", loss_scale=2.0**15)])
def test_clipvalue_bounds_each_unscaled_gradient_value(precision):
    """optimizer clipvalue (Keras' option) clips each value of the unscaled gradient: SGD(1.0) moves each
    weight by exactly -clip(g, -0.05, 0.05) of the hand-computed gradient; some values are under the bound
    (so a clip of the 2**15-scaled gradients, which would move every weight by 0.05, is ruled out)."""
    start, end, grads = _clipvalue_step(precision)
    for s, e, g in zip(start, end, grads):
        assert np.abs(s - e).max() <= 0.05 * (1 + 1e-6)
        np.testing.assert_allclose(s - e, np.clip(g, -0.05, 0.05), rtol=2e-2 if precision != "float32" else 1e-5,
                                   atol=1e-6)
    clipped = np.concatenate([np.abs(g).ravel() for g in grads])
    assert (clipped > 0.05).any() and (clipped < 0.04).any(), clipped  # both kinds of value in the test


@pytest.mark.slow
def test_clipvalue_with_two_replicas_clips_the_all_reduced_gradient(tmp_path):
    """On 2 logical CPUs (MirroredStrategy) the update is that of one device: clipped after the all-reduce."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "two.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n" % str(Path(__file__).parent)
        + "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        "import numpy as np\n"
        "from test_step import _clipvalue_step\n"
        "strategy = tf.distribute.MirroredStrategy(['/cpu:0', '/cpu:1'])\n"
        "start, end, grads = _clipvalue_step('float32', strategy)\n"
        "for s, e, g in zip(start, end, grads):\n"
        "    np.testing.assert_allclose(s - e, np.clip(g, -0.05, 0.05), rtol=1e-5, atol=1e-6)\n"
        "print('replicas', strategy.num_replicas_in_sync)\n" + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "replicas 2" in result.stdout, result.stderr[-3000:]


def test_grad_multipliers_scale_one_variable_group():
    x, y = data()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    frozen = make()
    frozen.build(next(iter(ds)))
    first_kernel = frozen.model.layers[0].kernel
    frozen.grad_multipliers = {first_kernel.path: 0.0}
    start = first_kernel.numpy().copy()
    other = frozen.model.layers[1].kernel.numpy().copy()
    frozen.fit(ds, steps=3)
    np.testing.assert_array_equal(first_kernel.numpy(), start)
    assert not np.array_equal(frozen.model.layers[1].kernel.numpy(), other)


def test_successive_fit_calls_continue_one_data_stream():
    """fit(steps=3) then fit(steps=7) trains on the same batches as one fit(steps=7): the second call
    keeps the first one's iterator (a new iterator over a seeded shuffle would draw a new order)."""
    x, y = data()

    def shuffled():
        return tf.data.Dataset.from_tensor_slices((x, y)).shuffle(320, seed=1).batch(32, drop_remainder=True)

    split = make()
    ds = shuffled()
    split.fit(ds, steps=3)
    first_iterator = split._kept_iterator.iterator
    split.fit(ds, steps=7)
    assert split._kept_iterator.iterator is first_iterator
    whole = make()
    whole.fit(shuffled(), steps=7)
    for a, b in zip(split.model.weights, whole.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_shape", [(6,), (6, 5), (6, 5, 1)])
def test_sample_weights_per_example_or_per_timestep_weigh_the_loss_as_keras_does(weight_shape):
    """A padding mask (batch, time) is a common per-element weight; Keras' fit accepts it, so must we."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, (6, 5)).astype("int32")
    logits = tf.constant(rng.normal(size=(6, 5, 3)).astype("float32"))
    weight = (rng.random(weight_shape) > 0.3).astype("float32")
    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((5, 3)), keras.layers.Dense(3)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False)
    ours = trainer.compute_loss(None, y, logits, weight)
    if weight.ndim == 1:  # per-example weights of a rank unknown when traced (from a generator, say)
        unknown = tf.function(lambda w: trainer.compute_loss(None, y, logits, w), input_signature=[tf.TensorSpec(None)])
        np.testing.assert_allclose(float(unknown(weight)), float(ours), rtol=1e-6)
    per_element = np.broadcast_to(weight[:, None], (6, 5)) if weight.ndim == 1 else weight  # Keras wants this
    expected = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits, sample_weight=per_element)
    np.testing.assert_allclose(float(ours), float(expected), rtol=1e-6)


@pytest.mark.parametrize("warmup", [0, 40])
def test_step_schedule_boundaries_are_global_steps_with_or_without_warmup(warmup):
    from trainer.optim import make_schedule

    schedule = make_schedule({"lr": 0.1, "schedule": "step", "boundaries": [100, 150], "decay_rate": 0.1,
                              "warmup_steps": warmup}, total_steps=200)
    lr = lambda step: float(schedule(step))  # noqa: E731
    # Keras' PiecewiseConstantDecay: the rate drops after each boundary
    assert lr(100) == pytest.approx(0.1) and lr(101) == pytest.approx(0.01) and lr(151) == pytest.approx(0.001)
    if warmup:
        assert lr(0) == pytest.approx(0.1 / warmup) and lr(warmup - 1) == pytest.approx(0.1)


def test_step_schedule_boundaries_out_of_order_or_inside_the_warmup_are_refused_and_late_ones_said(caplog):
    """Boundaries [50, 10] gave a rate above optimizer.lr between them (1.01e-3 for lr=1e-3), exit 0."""
    from trainer.config import ConfigError
    from trainer.optim import make_schedule

    def schedule(boundaries, warmup=0):
        return make_schedule({"lr": 0.1, "schedule": "step", "boundaries": boundaries, "warmup_steps": warmup},
                             total_steps=200)

    with pytest.raises(ConfigError, match=r"optimizer.boundaries=\[50, 10\] must increase.*Fix: optimizer.boundaries="
                                          r"\[10, 50\]"):
        schedule([50, 10])
    with pytest.raises(ConfigError, match=r"must increase"):
        schedule([10, 10])
    with pytest.raises(ConfigError, match=r"starts at or before the warmup's end \(optimizer.warmup_steps=40\)"):
        schedule([30, 100], warmup=40)
    with caplog.at_level("WARNING", logger="trainer"):
        schedule([100, 250])
    assert "optimizer.boundaries [250] are at or past the run's last step (200)" in caplog.text


def test_the_default_step_and_update_take_one_seam_and_the_step_functions_have_one_owner():
    """The default step (compute_gradients) and self.update(loss, tape) reach the unscaled gradients the same way
    (Updater.unscaled_gradients): under a loss scale of 1024 they train the same weights, and an overflowing
    batch skips and halves the scale in both, read through LossScale.status(). jit_compile is read-only (a
    Trainer's XLA choice changes only through trainer/step_functions.py); reset_step_functions() makes the next
    fit trace."""

    class ViaUpdate(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                logits = self.model(x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            self.update(loss, tape)

    x, y = data(n=128)
    x[64] = 1e5  # the third batch of 32 overflows float16
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    trained = {}
    for cls in (Trainer, ViaUpdate):
        t = cls(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                                                keras.layers.Dense(2, dtype="float32")]),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.SGD(0.1),
                seed=0, progress_bar=False, precision=PrecisionConfig(policy="mixed_float16", initial_scale=1024.0),
                jit_compile=False)
        t.fit(batches, steps=4)
        status = t.loss_scale.status()
        assert (status.scale, status.skipped_steps, status.consecutive_skips) == (512.0, 1, 0), (cls, status)
        trained[cls] = [w.numpy() for w in t.model.trainable_variables]
    for a, b in zip(trained[Trainer], trained[ViaUpdate]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    with pytest.raises(AttributeError):
        t.jit_compile = True
    assert t.jit_compile is False and t.traces["train"] == 1
    t.reset_step_functions()
    t.fit(batches, steps=5)
    assert t.traces["train"] == 2


def test_a_per_example_loss_under_loss_scaling_trains_as_its_sum():
    """With gradient accumulation compute_loss may return one loss per example: the backward pass starts
    from the loss scale at each element (as multiplying the loss by the scale did), so it trains exactly as
    the summed loss."""

    def trainer(reduce):
        class PerExample(Trainer):
            def compute_loss(self, x, y, y_pred, sample_weight=None):
                error = tf.cast(y_pred, tf.float32) - tf.one_hot(y, 2)
                return reduce(tf.reduce_sum(tf.square(error), axis=1) / 64.0)  # per example: shape (16,)

        return PerExample(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2, dtype="float32")]),
                          loss=None, optimizer=lambda: keras.optimizers.SGD(0.1), seed=0, progress_bar=False,
                          grad_accum_steps=2, jit_compile=False,
                          precision=PrecisionConfig(policy="mixed_float16", initial_scale=1024.0))

    x, y = data(n=128)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
    per_example, summed = trainer(lambda losses: losses), trainer(tf.reduce_sum)
    per_example.fit(ds, steps=3)
    summed.fit(ds, steps=3)
    for a, b in zip(per_example.model.weights, summed.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(per_example.loss_scale.skipped_steps.numpy()) == 0


def test_a_loss_reduction_the_trainer_replaces_is_said_once_naming_the_fix(caplog):
    """The Trainer averages per-example losses over the global batch (right on any number of replicas): a
    reduction giving another value is replaced, said once per loss object; Keras' default and 'mean' are that mean."""
    import logging

    x, y = data()
    summed = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        logs = make(loss=summed).fit(x, y, batch_size=32, steps=3)
        make(loss=summed)
        make(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean"))
        make(loss=keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"))
    said = [r.getMessage() for r in caplog.records if "the reduction is not used" in r.getMessage()]
    assert len(said) == 2, said
    assert said[0].startswith("Trainer(loss=SparseCategoricalCrossentropy(reduction='sum')): the reduction is not used")
    for part in ("averages them over the global batch", "the same on any number of replicas",
                 "the sum over the batch is replaced by that mean", "Fix: drop reduction='sum'"):
        assert part in said[0], said[0]
    assert "MeanSquaredError(reduction='mean_with_sample_weight')" in said[1] and "sum of the sample weights" in said[1]
    assert logs["loss"] == pytest.approx(make().fit(x, y, batch_size=32, steps=3)["loss"], rel=1e-6)  # the mean
