"""Recomputation for memory (trainer/recompute.py, `model.recompute=true` on the ResNet and Transformer
recipes): the gradients equal those without it (dropout masks and BatchNormalization included), the moving
statistics are updated once per step, and inference is unchanged."""
from __future__ import annotations


import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_metrics, run_cli
from trainer.config import ConfigError
from trainer.recompute import is_recomputed, recompute


@pytest.fixture
def recomputations(monkeypatch):
    """Counts what tf.recompute_grad does under trainer.recompute: blocks wrapped in a step, and how often
    their forward ran (once forward, once again in the backward pass)."""
    counts = {"blocks": 0, "runs": 0}
    original = tf.recompute_grad

    def counting(f):
        counts["blocks"] += 1

        def counted(*args):
            counts["runs"] += 1
            return f(*args)

        return original(counted)

    monkeypatch.setattr(tf, "recompute_grad", counting)
    return counts


def block_model(recomputed: bool) -> keras.Model:
    keras.utils.set_random_seed(1)
    block_input = keras.Input((8,))
    h = keras.layers.Dense(16, activation="relu", name="hidden")(block_input)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.3, name="dropout")(h)
    block = keras.Model(block_input, keras.layers.Dense(8, name="out")(h), name="block")
    if recomputed:
        recompute(block)
    inputs = keras.Input((8,))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(block(inputs)))


def gradients_and_state(model, inputs, graph: bool):
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(inputs, training=True) ** 2)
        return dict(zip([v.path for v in model.trainable_variables], tape.gradient(loss, model.trainable_variables)))

    grads = (tf.function(step) if graph else step)()
    named = {"/".join(path.split("/")[-2:]): g.numpy() for path, g in grads.items()}
    return named, [v.numpy() for v in model.non_trainable_variables]  # moving mean, variance, dropout seed state


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_gradients_and_statistics_equal_with_dropout_and_batchnorm(graph):
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 8)).astype("float32"))
    plain = gradients_and_state(block_model(False), x, graph)
    again = gradients_and_state(block_model(True), x, graph)
    assert plain[0].keys() == again[0].keys() and len(plain[0]) == 8
    for name in plain[0]:
        np.testing.assert_allclose(again[0][name], plain[0][name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert len(plain[1]) == len(again[1]) == 3
    for before, after in zip(plain[1], again[1]):  # moving statistics updated once (not twice), the seed advanced once
        np.testing.assert_allclose(after, before, rtol=1e-6)


def test_resnet_recompute_gradients_equal_and_inference_unchanged(recomputations):
    from trainer.recipes.resnet import build_model

    images = tf.constant(np.random.default_rng(0).uniform(size=(2, 16, 16, 3)).astype("float32"))
    labels = tf.constant([1, 3])
    results = []
    for flag in (False, True):
        keras.utils.set_random_seed(0)
        model = build_model("resnet8", num_classes=4, image_size=16, base_filters=4, recompute=flag)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, model(images, training=True),
                                                                                   from_logits=True))
            return tape.gradient(loss, model.trainable_variables)

        grads = {"/".join(v.path.split("/")[-2:]): g.numpy() for v, g in zip(model.trainable_variables, step())}
        results.append((grads, model(images, training=False).numpy(), model))
        # 3 blocks, each run twice
        assert recomputations == ({"blocks": 3, "runs": 6} if flag else {"blocks": 0, "runs": 0})
    (plain, plain_out, _), (again, again_out, recomputed_model) = results
    assert plain.keys() == again.keys()
    for name in plain:
        np.testing.assert_allclose(again[name], plain[name], rtol=1e-4, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(again_out, plain_out, rtol=1e-5, atol=1e-6)
    backbone = recomputed_model.get_layer("backbone")
    assert [layer.name for layer in backbone.layers if is_recomputed(layer)] == [
        f"stage{s}_block1" for s in (1, 2, 3)]  # resnet8: one block per stage


def test_keras_applications_resnet_refuses_recompute():
    from trainer.recipes.resnet import build_model

    with pytest.raises(ConfigError, match="model.recompute=true applies to the CIFAR ResNets"):
        build_model("resnet50", num_classes=4, image_size=32, recompute=True)


def test_transformer_recompute_gradients_equal(tiny_bert_dir, recomputations):
    """A 2-layer BERT (MiniLM's vocabulary, random weights, dropout 0.1 inside each encoder layer)."""
    from trainer.recipes import transformer

    folder = tiny_bert_dir

    ids = np.random.default_rng(0).integers(1, 1000, size=(2, 12)).astype("int32")
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids), "segment_ids": np.zeros_like(ids)}
    inputs["padding_mask"][1, 8:] = 0
    results = []
    for flag in (False, True):
        keras.utils.set_random_seed(0)
        model = transformer.build_model(str(folder), pretrained=False, num_classes=2, recompute=flag)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(inputs, training=True) ** 2)
            return tape.gradient(loss, model.trainable_variables)

        results.append({v.path: tf.convert_to_tensor(g).numpy() for v, g in zip(model.trainable_variables, step())})
        assert recomputations == ({"blocks": 2, "runs": 4} if flag else {"blocks": 0, "runs": 0})  # 2 encoder layers
    assert results[0].keys() == results[1].keys()  # the same variables, the same names: checkpoints unchanged
    for name in results[0]:
        np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_cli_resnet_recompute_trains(tmp_path):
    run = tmp_path / "run"
    result = run_cli("recipe=resnet", "model.name=resnet8", "model.base_filters=4", "model.recompute=true",
                     "data.image_size=16", "data.batch_size=16", "trainer.max_steps=6", "trainer.log_every=3",
                     "trainer.eval_every=0", "trainer.eval_steps=1", "trainer.progress_bar=false",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows if r["split"] == "train"] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)


def test_resnet_run_keeps_its_recompute_setting_on_resume(tmp_path):
    """With recompute the blocks are nested models: a resume without it does not fit the checkpoint."""
    from trainer import Trainer
    from trainer.checkpoint import CheckpointError
    from trainer.recipes.resnet import build_model

    images = np.random.default_rng(0).uniform(size=(8, 16, 16, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices((images, np.arange(8) % 4)).batch(4).repeat()

    def fit(recompute_blocks, steps):
        trainer = Trainer(model=lambda: build_model("resnet8", num_classes=4, image_size=16, base_filters=4,
                                                    recompute=recompute_blocks),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, verbose=False)
        return trainer.fit(data, steps=steps)

    fit(True, 2)
    with pytest.raises(CheckpointError, match="model.recompute") as refused:
        fit(False, 4)
    assert "init_from" not in str(refused.value)  # it reads the same layout: no way to load these weights


def test_a_model_of_your_own_nested_otherwise_is_not_blamed_on_model_recompute(tmp_path):
    """The same weights grouped into a nested model since the run saved them: from a model of one's own, the
    error says that, and names neither the ResNet recipe's model.recompute nor a .hydra/config.yaml."""
    from trainer import Trainer
    from trainer.checkpoint import CheckpointError

    def fit(nested, steps):
        hidden = keras.layers.Dense(8)
        trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.Sequential([hidden]) if nested
                                                          else hidden, keras.layers.Dense(2)]),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer="sgd",
                          run_dir=tmp_path, verbose=False)
        return trainer.fit(np.ones((8, 4), "float32"), np.arange(8) % 2, steps=steps, batch_size=4)

    fit(False, 2)
    with pytest.raises(CheckpointError, match="The model's layers are nested otherwise") as refused:
        fit(True, 4)
    said = str(refused.value)
    assert "layers moved into a nested model" in said and "Trainer(run_dir=...)" in said
    assert "recompute" not in said and "ResNet" not in said and ".hydra" not in said and "init_from" not in said


class PairBlock(keras.layers.Layer):
    """A block whose input is a list (or a dict) of two tensors, with dropout inside."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(8)
        self.dropout = keras.layers.Dropout(0.3)

    def call(self, inputs, training=None):
        a, b = (inputs["a"], inputs["b"]) if isinstance(inputs, dict) else inputs
        return self.dropout(self.dense(a) * b, training=training)


@pytest.mark.parametrize("nested", ["list", "dict"])
def test_a_block_with_a_list_or_dict_input_is_recomputed(nested, recomputations):
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 8)).astype("float32"))
    grads = []
    for flag in (False, True):
        keras.utils.set_random_seed(2)
        block = PairBlock()
        block([x, x] if nested == "list" else {"a": x, "b": x})  # built (its variables made) outside the tf.function
        if flag:
            recompute(block)

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                inputs = [x, x + 1] if nested == "list" else {"a": x, "b": x + 1}
                loss = tf.reduce_sum(block(inputs, training=True) ** 2)
            return tape.gradient(loss, [x, *block.trainable_variables])

        grads.append([g.numpy() for g in step()])
    assert recomputations == {"blocks": 1, "runs": 2}  # engaged: not silently run without recomputation
    for plain, again in zip(*grads):
        np.testing.assert_allclose(again, plain, rtol=1e-5, atol=1e-7)


def test_frozen_weights_are_not_copied_as_state():
    """Only what a forward pass changes (moving statistics, seed states) is set back for the recomputation;
    a frozen layer's weights are not copied each step."""
    from trainer.recompute import _state

    model = block_model(False)
    block = model.get_layer("block")
    block.get_layer("hidden").trainable = False
    assert sorted(v.path.split("/")[-1] for v in _state(block)) == ["moving_mean", "moving_variance",
                                                                    "seed_generator_state"]


def test_a_block_recomputed_between_two_fit_calls_is_recomputed_by_the_next_fit(recomputations):
    """recompute() on a Trainer's model after the Trainer traced its step: the Trainer traces again, so the
    next steps recompute the block (a kept trace would silently hold all its activations)."""
    from trainer import Trainer

    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(64, 8)).astype("float32"),
                                               rng.normal(size=(64, 2)).astype("float32"))).batch(16)
    trainer = Trainer(model=lambda: block_model(recomputed=False), loss=keras.losses.MeanSquaredError(),
                      optimizer=lambda: keras.optimizers.SGD(0.01), progress_bar=False, jit_compile=False)
    trainer.fit(data, steps=2)
    assert recomputations["blocks"] == 0
    recompute(trainer.model.get_layer("block"))
    trainer.fit(data, steps=4)
    assert recomputations["blocks"] == 1 and trainer.traces["train"] == 2
