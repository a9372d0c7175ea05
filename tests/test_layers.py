"""trainer.layers.BatchNormalization: Keras' layer computed with TensorFlow's fused kernel. It must give what
Keras' own layer gives (outputs, gradients, moving statistics, inference), take the same weights in both
directions, and fall back to Keras' computation where the fused kernel does not apply."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.layers import BatchNormalization

SHAPE = (8, 5, 5, 6)


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _inputs(shape=SHAPE, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(2.0, 3.0, shape).astype("float32"))


def _pair(**kwargs):
    """Keras' layer and ours, built alike, with the same non-trivial gamma and beta."""
    keras_bn, fused_bn = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    for layer in (keras_bn, fused_bn):
        layer.build(SHAPE)
    rng = np.random.default_rng(1)
    weights = [w.astype("float32")
               for w in (rng.normal(size=6), rng.normal(size=6), rng.normal(size=6), rng.uniform(0.5, 2, 6))]
    keras_bn.set_weights(weights)
    fused_bn.set_weights(weights)
    return keras_bn, fused_bn


def _train_calls(layer, x, calls=3):
    """Outputs and input/gamma/beta gradients of `calls` training-mode calls, then an inference call."""
    upstream = tf.constant(np.random.default_rng(2).normal(size=SHAPE).astype("float32"))
    results = []
    for _ in range(calls):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
        results += [y, *tape.gradient(loss, [x, layer.gamma, layer.beta])]
    results += [layer.moving_mean, layer.moving_variance, layer(x, training=False)]
    return [np.asarray(tf.cast(r, tf.float32)) for r in results]


def _graph_ops(layer, x, training):
    graph = tf.function(lambda t: layer(t, training=training)).get_concrete_function(x).graph
    return {op.type for op in graph.get_operations()}


@pytest.mark.parametrize("policy, rtol", [("float32", 1e-5), ("mixed_bfloat16", 2e-2), ("mixed_float16", 5e-3)],
                         indirect=["policy"])
def test_fused_layer_equals_keras_batch_normalization(policy, rtol):
    keras_bn, fused_bn = _pair(momentum=0.9, epsilon=1e-3)
    x = _inputs()
    for ours, theirs in zip(_train_calls(fused_bn, x), _train_calls(keras_bn, x)):
        scale = np.max(np.abs(theirs))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=rtol * scale)
    assert (fused_bn(x, training=True).dtype == keras_bn(x, training=True).dtype
            == keras.mixed_precision.global_policy().compute_dtype)
    assert "FusedBatchNormV3" in _graph_ops(fused_bn, x, training=True)
    assert "FusedBatchNormV3" in _graph_ops(fused_bn, x, training=False)


def test_a_frozen_layer_normalizes_with_its_moving_statistics():
    keras_bn, fused_bn = _pair()
    keras_bn.trainable = fused_bn.trainable = False
    x = _inputs()
    np.testing.assert_allclose(fused_bn(x, training=True), keras_bn(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fused_bn.moving_mean, keras_bn.moving_mean)


@pytest.mark.parametrize(
    "kwargs, shape",
    [({"axis": 1}, SHAPE), ({}, (8, 6)), ({"renorm": True}, SHAPE), ({"center": False, "scale": False}, SHAPE)],
    ids=["channels-first", "2-d", "renorm", "no-center-no-scale"],
)
def test_what_the_fused_kernel_does_not_take_is_computed_as_keras_does(kwargs, shape, caplog):
    caplog.set_level("INFO", logger="trainer.layers")
    x = _inputs(shape)
    keras_bn, fused_bn = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    for training in (True, False):
        np.testing.assert_allclose(fused_bn(x, training=training), keras_bn(x, training=training), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_variance, keras_bn.moving_variance, rtol=1e-6)
    fused = "FusedBatchNormV3" in _graph_ops(fused_bn, x, training=True)
    assert fused == (kwargs == {"center": False, "scale": False})  # only the last is still fused (with 1 and 0)
    said = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert len(said) == (0 if fused else 1), said  # once per layer, naming the cause
    assert fused or any(word in said[0] for word in ("axis=1", "2-D", "renorm"))


def test_a_mask_is_computed_as_keras_does():
    x, mask = _inputs(), tf.constant(np.random.default_rng(3).uniform(size=SHAPE[:3]) > 0.3)
    keras_bn, fused_bn = _pair()
    np.testing.assert_allclose(fused_bn(x, training=True, mask=mask), keras_bn(x, training=True, mask=mask), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(fused_bn.moving_mean, keras_bn.moving_mean, rtol=1e-6)


def _small_resnet(batch_norm):
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = batch_norm(momentum=0.9, epsilon=1e-5, name="bn")(x)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inputs, outputs)


def test_checkpoints_of_keras_layers_load_into_fused_ones_and_back(tmp_path):
    """A run folder written before the recipes used the fused layer resumes with it (and the reverse)."""
    old = _small_resnet(keras.layers.BatchNormalization)
    old(_inputs((4, 8, 8, 3)), training=True)  # moves the statistics off their initial values
    path = tf.train.Checkpoint(model=old).write(str(tmp_path / "ckpt"))
    new = _small_resnet(BatchNormalization)
    tf.train.Checkpoint(model=new).read(path).assert_consumed()
    assert [v.path for v in new.weights] == [v.path for v in old.weights]
    for a, b in zip(new.weights, old.weights):
        np.testing.assert_array_equal(a, b)
    new.save_weights(tmp_path / "new.weights.h5")
    back = _small_resnet(keras.layers.BatchNormalization)
    back.load_weights(tmp_path / "new.weights.h5")
    x = _inputs((4, 8, 8, 3))
    np.testing.assert_allclose(back(x), new(x), rtol=1e-5, atol=1e-6)


def test_a_saved_keras_model_loads_with_the_fused_layer(tmp_path):
    model = _small_resnet(BatchNormalization)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(loaded.get_layer("bn"), BatchNormalization)
    x = _inputs((4, 8, 8, 3))
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6)


@pytest.mark.parametrize("policy, rtol", [("float32", 1e-5), ("mixed_bfloat16", 3e-2)], indirect=["policy"])
def test_xla_compiles_the_fused_training_step(policy, rtol):
    """Gradients and moving statistics of a compiled training step equal Keras' layer's (not compiled)."""
    keras.utils.set_random_seed(0)
    keras_model, fused_model = _small_resnet(keras.layers.BatchNormalization), _small_resnet(BatchNormalization)
    fused_model.set_weights(keras_model.get_weights())
    x = _inputs((4, 8, 8, 3))
    upstream = tf.constant(np.random.default_rng(4).normal(size=(4, 2)).astype("float32"))

    def gradients(model):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.cast(model(x, training=True), tf.float32) * upstream)
        return tape.gradient(loss, model.trainable_variables)

    compiled = tf.function(gradients, jit_compile=True)
    ours, theirs = ([np.asarray(tf.cast(g, tf.float32)) for g in grads]
                    for grads in (compiled(fused_model), gradients(keras_model)))
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.max(np.abs(b)))
    for name in ("moving_mean", "moving_variance"):
        ours, theirs = (getattr(m.get_layer("bn"), name).numpy() for m in (fused_model, keras_model))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5 if policy == "float32" else 1e-2)


@pytest.mark.slow
def test_the_projects_tools_load_a_keras_file_of_the_fused_layer_in_a_fresh_process(tmp_path):
    """trainer.convert / predict / evaluate read .keras files through trainer.runs, which must know the class
    without the user importing trainer.layers first."""
    import subprocess
    import sys

    _small_resnet(BatchNormalization).save(tmp_path / "model.keras")
    code = ("from trainer.runs import load_trained_model; "
            f"model, sample = load_trained_model({str(tmp_path / 'model.keras')!r}); "
            "print(type(model.get_layer('bn')).__module__, tuple(model(sample).shape))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer.layers (2, 2)" in result.stdout
