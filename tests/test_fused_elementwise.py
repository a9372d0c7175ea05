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


def _penalty_gradient(fn, x):
    """d/dx |d sum(fn(x)) / dx|^2: the second derivatives a gradient penalty (WGAN-GP) takes."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = tf.reduce_sum(fn(x) * _normal(x.shape, seed=7, scale=1.0))
        slope = inner.gradient(y, x)
        norm = tf.reduce_sum(slope * slope)
    return outer.gradient(norm, x).numpy()


@pytest.mark.parametrize("approximate", [True, False])
def test_second_derivatives_as_a_gradient_penalty_needs(approximate):
    x = _normal(scale=1.5)
    np.testing.assert_allclose(_penalty_gradient(lambda t: gelu(t, approximate=approximate), x),
                               _penalty_gradient(lambda t: keras.activations.gelu(t, approximate=approximate), x),
                               atol=1e-4, rtol=1e-4)
    theirs, ours = _layer_pair(epsilon=0.1)
    np.testing.assert_allclose(_penalty_gradient(ours, x), _penalty_gradient(theirs, x), atol=1e-4, rtol=1e-4)


def test_gelu_of_float64_and_ragged_inputs_is_keras_own():
    x = tf.cast(_normal(), tf.float64)
    ours, theirs = _value_and_input_gradient(gelu, x), _value_and_input_gradient(keras.activations.gelu, x)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    assert _xla_calls(gelu, x) == 0
    ragged = tf.ragged.constant([[1.0, -2.0], [0.5]])
    np.testing.assert_array_equal(gelu(ragged).flat_values.numpy(), keras.activations.gelu(ragged).flat_values.numpy())
    _, layer = _layer_pair()
    assert isinstance(layer(tf.RaggedTensor.from_row_lengths(tf.ones((3, 48)), [2, 1])), tf.RaggedTensor)


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
@pytest.mark.parametrize("kwargs", [{"epsilon": 0.5}, {"epsilon": 1e-12}, {"center": False}, {"scale": False}], ids=str)
def test_layer_normalization_equals_keras(policy, atol, kwargs):
    theirs, ours = _layer_pair(**kwargs)
    x = tf.cast(_normal() + 2.0, keras.mixed_precision.global_policy().compute_dtype)
    expected, got = _layer_results(theirs, x), _layer_results(ours, x)
    assert len(got) == len(expected) == 2 + len(theirs.trainable_weights)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol)
    with tf.GradientTape():
        assert ours(x).dtype == theirs(x).dtype == keras.mixed_precision.global_policy().compute_dtype
    assert {**ours.get_config(), "name": None} == {**theirs.get_config(), "name": None}


def _xla_calls(fn, x, with_tape=True) -> int:
    """How many XLA-compiled calls `fn`'s graph holds, traced as in a train step (forward and backward inside
    a recording tape) or as in evaluation (no tape)."""

    def body(t):
        if not with_tape:
            return fn(t)
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(tf.cast(tf.nest.flatten(fn(t))[0], tf.float32))
        return tape.gradient(loss, t)

    return _xla_calls_in(tf.function(body).get_concrete_function(x).graph)


def _xla_calls_in(graph) -> int:
    return sum(op.type.endswith("PartitionedCall") and _must_compile(op) for op in graph.get_operations())


def _must_compile(op) -> bool:
    try:
        return bool(op.get_attr("_XlaMustCompile"))
    except ValueError:
        return False


@pytest.mark.parametrize("kwargs", [{"axis": 1}, {"axis": [1, 2]}, {"rms_scaling": True}], ids=str)
def test_layer_normalization_keeps_keras_computation_where_not_fusable(kwargs):
    theirs, ours = _layer_pair(**kwargs)
    x = _normal()
    assert _xla_calls(ours, x) == 0
    for a, b in zip(_layer_results(ours, x), _layer_results(theirs, x)):
        np.testing.assert_array_equal(a, b)


def test_without_a_recording_tape_keras_ops_run_and_results_are_keras_own():
    """Evaluation, predict and export trace no XLA call (tf2onnx cannot convert one) and give Keras' values."""
    theirs, ours = _layer_pair()
    x = tf.cast(_normal(), tf.bfloat16)

    def block(layer, activation):
        return lambda t: activation(layer(t), approximate=True)

    assert _xla_calls(block(ours, gelu), x) == 4  # forward and backward of each
    assert _xla_calls(block(ours, gelu), x, with_tape=False) == 0
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
    norms = [layer for layer in fused._flatten_layers() if type(layer).__name__ == "LayerNormalization"]
    modules = {type(layer).__module__ for layer in norms}
    assert modules == {"trainer.fused_elementwise"}
    batch = {"token_ids": tf.constant([[2, 5, 9, 3, 0, 0]] * 2), "padding_mask": tf.constant([[1] * 4 + [0] * 2] * 2),
             "segment_ids": tf.zeros((2, 6), tf.int32)}
    # 5 LayerNormalization and 2 GELU, forward and backward each, in a train step; none without a tape.
    assert _xla_calls(lambda b: fused(b, training=True), batch) == 14
    assert _xla_calls(lambda b: fused(b, training=False), batch, with_tape=False) == 0
    assert _xla_calls(lambda b: unfused(b, training=True), batch) == 0
    expected, got = _with_gradients(unfused, batch), _with_gradients(fused, batch)
    assert len(got) == 1 + len(fused.trainable_weights)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, atol=1e-5)


def _with_gradients(model, batch):
    with tf.GradientTape() as tape:
        logits = model(batch, training=False)
        loss = tf.reduce_sum(logits * tf.constant([[1.0, -2.0, 0.5]]))
    gradients = tape.gradient(loss, model.trainable_weights)
    return [logits.numpy()] + [np.asarray(tf.convert_to_tensor(g)) for g in gradients]


def test_fuse_elementwise_between_two_fit_calls_is_what_the_next_fit_trains_with(caplog, float32_policy):
    """A new user's order: fit, fuse the Trainer's model, fit again. The Trainer traces its step again (a kept
    trace would go on running Keras' ops, silently), without the retrace warning, and keeps that trace after."""
    from trainer import Trainer

    class Counting(Trainer):
        """Records, at each trace of the train step, the XLA calls its forward and backward hold."""

        def compute_gradients(self, data):
            loss, grads = super().compute_gradients(data)
            self.xla_calls.append(_xla_calls_in(tf.compat.v1.get_default_graph()))
            return loss, grads

    def build():
        inputs = keras.Input((6, 16))
        x = keras.layers.Dense(16, activation="gelu", name="ffn")(keras.layers.LayerNormalization(name="ln")(inputs))
        return keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x)))

    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(64, 6, 16)).astype("float32"),
                                               rng.integers(0, 3, 64))).batch(16, drop_remainder=True)
    trainer = Counting(model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False, jit_compile=False)
    trainer.xla_calls = []
    trainer.fit(data, steps=2)
    assert trainer.xla_calls == [0]
    caplog.set_level("INFO", logger="trainer")
    assert fuse_elementwise(trainer.model) == {"LayerNormalization": 1, "gelu": 1}
    trainer.fit(data, steps=4)
    # 1 LayerNormalization and 1 GELU, forward and backward each
    assert trainer.xla_calls == [0, 4] and trainer.traces["train"] == 2
    assert ("fuse_elementwise changed layers of the Trainer's models after its train step was traced "
            "('ln', 'ffn'): it is traced again") in caplog.text
    assert "traced more than once" not in caplog.text
    trainer.fit(data, steps=6)
    assert trainer.xla_calls == [0, 4] and int(trainer.step.numpy()) == 6  # nothing changed since: kept


def test_a_recomputed_block_runs_the_fused_kernels_in_its_forward_pass_and_its_recomputation():
    from trainer.recompute import recompute

    _, layer = _layer_pair()
    inputs = keras.Input(SHAPE[1:])
    block = keras.Model(inputs, keras.layers.Dense(48, activation="gelu")(layer(inputs)))
    fuse_elementwise(block)
    recompute(block)
    x = _normal()
    # forward (2) + recomputation (2) + backward (2): the first forward runs with recording paused.
    assert _xla_calls(lambda t: block(t, training=True), x) == 6
    expected = _value_and_input_gradient(lambda t: block(t, training=False), x)  # not recomputed
    recomputed = _value_and_input_gradient(lambda t: block(t, training=True), x)
    np.testing.assert_allclose(recomputed[1], expected[1], atol=1e-5)


@pytest.mark.slow
def test_a_keras_file_of_a_fused_model_loads_in_a_fresh_process_after_import_trainer(tmp_path):
    """export, warm starts and plain scripts call keras.saving.load_model: `import trainer` registers the
    classes its .keras config names (trainer>LayerNormalization, trainer>gelu)."""
    import subprocess
    import sys

    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="gelu")(keras.layers.LayerNormalization()(inputs)))
    assert fuse_elementwise(model) == {"LayerNormalization": 1, "gelu": 1}
    model.save(tmp_path / "model.keras")
    code = ("import trainer, keras, numpy as np; "
            f"m = keras.saving.load_model({str(tmp_path / 'model.keras')!r}); "
            "print(sorted({type(l).__module__ for l in m.layers}), m.layers[-1].activation.__name__, "
            "m(np.ones((2, 6, 8))).shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'trainer.fused_elementwise'" in result.stdout and "gelu (2, 6, 4)" in result.stdout


def test_one_fused_layer_normalization_on_inputs_of_several_ranks_trains(caplog):
    """A model that normalizes a sequence and then its pooled vector, and layers of other ranks in one
    process: each rank gets its own kernels (a shape relaxed to unknown rank broke the backward pass)."""
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(16, activation="gelu")(keras.layers.LayerNormalization()(inputs))
    pooled = keras.layers.LayerNormalization()(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, keras.layers.Dense(3)(pooled))
    assert fuse_elementwise(model) == {"LayerNormalization": 2, "gelu": 1}
    for shape in ((4, 6, 16), (2, 6, 16)):
        x = _normal(shape)
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        assert all(g is not None and np.isfinite(g.numpy()).all() for g in tape.gradient(loss, model.trainable_weights))
    for shape in ((5, 48), (2, 3, 4, 48), (48,)):
        _, layer = _layer_pair()
        _value_and_input_gradient(layer, _normal(shape))
    with caplog.at_level("INFO", logger="trainer.fused_elementwise"):
        theirs, ours = _layer_pair(axis=1)
        _value_and_input_gradient(ours, _normal())
        _value_and_input_gradient(ours, _normal())
    said = [r.getMessage() for r in caplog.records if f"{ours.name!r} computes as Keras'" in r.getMessage()]
    assert len(said) == 1 and "axis=[1], not only the last axis of a 3-D input" in said[0]


def test_fuse_elementwise_of_something_else_says_what_it_takes():
    with pytest.raises(TypeError, match="takes a Keras model or layer, got function"):
        fuse_elementwise(lambda: None)


def test_fuse_elementwise_after_keras_model_fit_makes_keras_trace_its_train_step_again(float32_policy):
    """Keras' model.fit keeps its own train function: a kept one would go on running Keras' ops, silently."""
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(16, activation="gelu")(keras.layers.LayerNormalization()(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(x)))
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = np.random.default_rng(0).normal(size=(32, 6, 16)).astype("float32"), np.zeros(32, "int32")
    model.fit(x, y, epochs=1, verbose=0)
    before = model.train_function
    fuse_elementwise(model)
    assert model.train_function is not before  # made again: traced with the fused layers at the next fit
    model.fit(x, y, epochs=1, verbose=0)
