"""trainer.fused_elementwise: GELU and LayerNormalization as one XLA kernel each way. They must give what
Keras' own give (values, gradients, second derivatives), keep Keras' computation where they do not apply,
and `fuse_elementwise` must swap them into a keras-hub encoder without changing its outputs or its config."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer.fused_elementwise import LayerNormalization, fuse_elementwise, gelu

SHAPE = (4, 7, 48)


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _normal(shape=SHAPE, seed=0, scale=3.0):
    return tf.constant(np.random.default_rng(seed).normal(0.0, scale, shape).astype("float32"))


def _as_f32(values):
    return [np.asarray(tf.cast(v, tf.float32)) for v in values]


def _value_and_input_gradient(fn, x):
    upstream = _normal(x.shape, seed=5, scale=1.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return _as_f32([y, tape.gradient(loss, x)])


@pytest.mark.parametrize("approximate", [True, False])
@pytest.mark.parametrize("dtype, atol", [("float32", 2e-5), ("bfloat16", 6e-2)])
def test_gelu_equals_keras_values_and_gradients(approximate, dtype, atol):
    x = tf.cast(_normal(), dtype)
    ours = _value_and_input_gradient(lambda t: gelu(t, approximate=approximate), x)
    theirs = _value_and_input_gradient(lambda t: keras.activations.gelu(t, approximate=approximate), x)
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol)
    assert ours[0].shape == SHAPE


def test_gelu_second_derivative_as_a_gradient_penalty_needs():
    x = _normal(scale=1.5)

    def penalty(fn):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = tf.reduce_sum(fn(x))
            slope = inner.gradient(y, x)
            norm = tf.reduce_sum(slope * slope)
        return outer.gradient(norm, x).numpy()

    np.testing.assert_allclose(penalty(lambda t: gelu(t, approximate=True)),
                               penalty(lambda t: keras.activations.gelu(t, approximate=True)), atol=1e-4)


def test_gelu_of_float64_is_keras_own():
    x = tf.cast(_normal(), tf.float64)
    np.testing.assert_array_equal(gelu(x).numpy(), keras.activations.gelu(x).numpy())


def _layer_pair(**kwargs):
    theirs, ours = keras.layers.LayerNormalization(**kwargs), LayerNormalization(**kwargs)
    for layer in (theirs, ours):
        layer.build(SHAPE)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=w.shape).astype("float32") for w in theirs.weights]
    theirs.set_weights(weights)
    ours.set_weights(weights)
    return theirs, ours


def _layer_results(layer, x):
    upstream = _normal(seed=3, scale=1.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    return _as_f32([y, *tape.gradient(loss, [x, *layer.trainable_weights])])


@pytest.mark.parametrize("policy, atol", [("float32", 2e-5), ("mixed_bfloat16", 3e-2)], indirect=["policy"])
@pytest.mark.parametrize("kwargs", [{"epsilon": 1e-3}, {"center": False}, {"scale": False}], ids=str)
def test_layer_normalization_equals_keras(policy, atol, kwargs):
    theirs, ours = _layer_pair(**kwargs)
    x = tf.cast(_normal() + 2.0, keras.mixed_precision.global_policy().compute_dtype)
    expected, got = _layer_results(theirs, x), _layer_results(ours, x)
    assert len(got) == len(expected) == 2 + len(theirs.trainable_weights)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol)
    assert ours(x).dtype == theirs(x).dtype
    assert {**ours.get_config(), "name": None} == {**theirs.get_config(), "name": None}


def _traced_op_names(fn, x, with_tape):
    """Names of the ops in `fn`'s graph, traced inside a recording tape (a train step) or without one."""

    def body(t):
        if not with_tape:
            return fn(t)
        with tf.GradientTape() as tape:
            tape.watch(t)
            y = fn(t)
        return y, tape.gradient(tf.reduce_sum(tf.cast(y, tf.float32)), t)

    return " ".join(op.name for op in tf.function(body).get_concrete_function(x).graph.get_operations())


@pytest.mark.parametrize("kwargs", [{"axis": 1}, {"axis": [1, 2]}, {"rms_scaling": True}], ids=str)
def test_layer_normalization_keeps_keras_computation_where_not_fusable(kwargs):
    theirs, ours = _layer_pair(**kwargs)
    x = _normal()
    assert "PartitionedCall" not in _traced_op_names(ours, x, with_tape=True)
    for a, b in zip(_layer_results(ours, x), _layer_results(theirs, x)):
        np.testing.assert_array_equal(a, b)


def test_without_a_recording_tape_keras_ops_run_and_results_are_keras_own():
    """Evaluation, predict and export trace no XLA call (tf2onnx cannot convert one) and give Keras' values."""
    theirs, ours = _layer_pair()
    x = tf.cast(_normal(), tf.bfloat16)

    def block(layer, activation):
        return lambda t: activation(layer(t), approximate=True)

    assert "PartitionedCall" in _traced_op_names(block(ours, gelu), x, with_tape=True)
    assert "PartitionedCall" not in _traced_op_names(block(ours, gelu), x, with_tape=False)
    np.testing.assert_array_equal(block(ours, gelu)(x).numpy(), block(theirs, keras.activations.gelu)(x).numpy())


def test_fused_step_compiles_under_xla():
    _, ours = _layer_pair()
    x = _normal()

    @tf.function(jit_compile=True)
    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(gelu(ours(t), approximate=True))
        return loss, tape.gradient(loss, t)

    loss, grad = step(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        eager = tf.reduce_sum(gelu(ours(x), approximate=True))
    np.testing.assert_allclose(loss.numpy(), eager.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grad.numpy(), tape.gradient(eager, x).numpy(), atol=1e-5)


@pytest.fixture
def float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_fuse_elementwise_swaps_a_keras_hub_encoder_keeping_outputs_and_config(tiny_bert_dir, float32_policy):
    from trainer.recipes import transformer

    def build(fused):
        return transformer.build_model(str(tiny_bert_dir), num_classes=3, pretrained=False, fused_elementwise=fused)

    unfused, fused, swapped_later = build(False), build(True), build(False)
    fused.set_weights(unfused.get_weights())
    # The embeddings' LayerNormalization and 2 per encoder layer; one GELU Dense per layer (2 layers).
    assert fuse_elementwise(swapped_later) == {"LayerNormalization": 5, "gelu": 2}
    assert fuse_elementwise(swapped_later) == {"LayerNormalization": 0, "gelu": 0}  # nothing left to swap
    assert unfused.get_config() == fused.get_config()  # the encoder's config still names keras-hub's gelu
    modules = {type(layer).__module__ for layer in fused._flatten_layers() if type(layer).__name__ == "LayerNormalization"}
    assert modules == {"trainer.fused_elementwise"}
    batch = {"token_ids": tf.constant([[2, 5, 9, 3, 0, 0]] * 2), "padding_mask": tf.constant([[1] * 4 + [0] * 2] * 2),
             "segment_ids": tf.zeros((2, 6), tf.int32)}
    expected, got = _with_gradients(unfused, batch), _with_gradients(fused, batch)
    assert len(got) == 1 + len(fused.trainable_weights)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _with_gradients(model, batch):
    with tf.GradientTape() as tape:
        logits = model(batch, training=False)
        loss = tf.reduce_sum(logits * tf.constant([[1.0, -2.0, 0.5]]))
    return [logits.numpy()] + [np.asarray(tf.convert_to_tensor(g)) for g in tape.gradient(loss, model.trainable_weights)]
