"""An overridden train_step takes batches of any structure (docs/research.md: they reach it as they are): the model
is built on the batch's x where it has one the model takes, else a model that says what it takes (a keras.Input,
model.build(shape)) is built on that; one that does not gets a clear error naming the fix, one model or several."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Trainer
from trainer.errors import UserError


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def support_query(pairs: bool = False):
    """Batches of (support x, support y, query x, query y), or ((xs, ys), (xq, yq)) with `pairs`."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 4)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    slices = ((x, y), (x, y)) if pairs else (x, y, x, y)
    return tf.data.Dataset.from_tensor_slices(slices).batch(16)


class Query(Trainer):
    """Trains on the query half of a support/query batch."""

    def train_step(self, data):
        _, _, xq, yq = tf.nest.flatten(data)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(tf.cast(self.model(xq, training=True), tf.float32) - yq))
        self.update(loss, tape)
        return {"loss": loss}


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)


def built_for_a_shape():
    model = Subclassed()
    model.build((None, 4))  # Keras 3 creates no variables here (no build() of its own): the Trainer does
    return model


def with_input():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("pairs", [False, True], ids=["4-tuple", "pairs"])
@pytest.mark.parametrize("build", [with_input, built_for_a_shape], ids=["keras.Input", "model.build"])
def test_a_model_that_says_its_input_trains_on_batches_of_any_structure(build, pairs, precision):
    trainer = Query(model=build, loss=None, optimizer=lambda: keras.optimizers.SGD(0.1), precision=precision,
                    verbose=False)
    logs = trainer.fit(support_query(pairs), steps=2)
    assert int(trainer.step.numpy()) == 2 and np.isfinite(logs["loss"])
    assert trainer.model(np.zeros((2, 4), "float32")).dtype == "float32"  # the float32-output wrapper, if needed


@pytest.mark.parametrize("pairs", [False, True], ids=["4-tuple", "pairs"])
def test_a_model_that_cannot_tell_its_input_is_told_the_fix(pairs):
    """A 4-tuple has no x; a pair of pairs gives (xs, ys) as x, which a one-input model refuses."""
    trainer = Query(model=lambda: keras.Sequential([keras.layers.Dense(1)]), loss=None,
                    optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)
    with pytest.raises(UserError) as raised:
        trainer.fit(support_query(pairs), steps=1)
    said = str(raised.value)
    assert "model 'sequential' has no variables yet" in said and "((16, 4), (16, 1)" in said, said
    assert "give the model a keras.Input" in said and "model.build(input_shape)" in said, said
    assert ("calling the model on its x failed" if pairs else "no x, (x, y) or (x, y, w) structure") in said, said


class TwoModels(Trainer):
    def train_step(self, data):
        _, _, xq, yq = data
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_mean(tf.square(self.models["a"](xq, training=True) + self.models["b"](xq) - yq))
        self.update(loss, tape, "a")
        self.update(loss, tape, "b")
        return {"loss": loss}


def test_several_models_each_say_their_input():
    trainer = TwoModels(models={"a": with_input, "b": built_for_a_shape}, optimizer=lambda: keras.optimizers.SGD(0.1),
                        verbose=False)
    assert int(trainer.fit(support_query(), steps=2)["step"]) == 2
    unbuilt = TwoModels(models={"a": with_input, "b": Subclassed}, optimizer=lambda: keras.optimizers.SGD(0.1),
                        verbose=False)
    with pytest.raises(UserError, match=r"model 'b' has no variables yet.*calls none of them on the data before "
                                        r"training.*keras\.Input.*model\.build\(input_shape\)"):
        unbuilt.fit(support_query(), steps=1)


class Gather(keras.Model):
    """Takes int ids (tf.gather): float32 zeros of its build shape are refused."""

    def __init__(self):
        super().__init__()
        self.table = self.add_weight(shape=(5, 1), initializer="ones")

    def call(self, ids):
        return tf.gather(self.table[:, 0], ids)[:, :1]


class Pairs(Trainer):
    def train_step(self, data):
        x, y = tf.nest.flatten(data)[-2:]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.model(x, training=True) - y))
        self.update(loss, tape)
        return {"loss": loss}


def ids_and_labels(quadruples: bool = False):
    rng = np.random.default_rng(0)
    ids, y = rng.integers(0, 5, size=(64, 2)).astype("int32"), rng.normal(size=(64, 1)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((ids, y, ids, y) if quadruples else (ids, y)).batch(16)


@pytest.mark.parametrize("first", ["call", "build"])
def test_an_int_input_subclassed_model_is_built_on_the_batch(first):
    def build():
        model = Gather()
        model(tf.constant([[1, 2]])) if first == "call" else model.build((None, 2))
        return model

    trainer = Pairs(model=build, optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)
    assert np.isfinite(trainer.fit(ids_and_labels(), steps=2)["loss"])


def test_float32_zeros_a_model_refuses_name_the_dtype_fix():
    """A batch with no x: the model is built on zeros of its build shape, float32 (Keras records no dtype)."""
    def build():
        model = Gather()
        model.build((None, 2))
        return model

    trainer = Pairs(model=build, optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)
    with pytest.raises(UserError, match=r"assumed float32.*keras\.Input\(shape, dtype=\.\.\.\)"):
        trainer.fit(ids_and_labels(quadruples=True), steps=1)


def test_unbatched_data_under_an_overridden_step_is_told_to_batch():
    x = np.zeros((8, 4), "float32")
    trainer = Pairs(model=with_input, optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)
    with pytest.raises(UserError, match=r"gives single examples, not batches.*Fix: batch the dataset"):
        trainer.fit(tf.data.Dataset.from_tensor_slices((x, x[:, :1])), steps=1)
