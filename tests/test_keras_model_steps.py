"""A Keras model with its own train_step, test_step, compute_loss or predict_step (Keras' custom-step guide): the
Trainer calls none of them, so a model that overrides the first three is refused at Trainer(), before any data is
read or step traced (it trained silently on the plain loss, its step never called), naming the class and the fix;
a Trainer subclass with the same method of its own only gets a warning. Tiny models through the public API."""
from __future__ import annotations

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Trainer
from trainer.config import ConfigError
from trainer.errors import exit_code_of

QUIET = dict(progress_bar=False, verbose=False, log_every=4)


class GuideModel(keras.Model):
    """Keras' guide: the loss plus a penalty, metric trackers, a count of its calls."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.calls = tf.Variable(0, trainable=False)

    def call(self, x):
        return self.dense(x)

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(y=y, y_pred=self(x, training=True)) + tf.reduce_sum(tf.abs(self.dense.kernel))
        self.optimizer.apply(tape.gradient(loss, self.trainable_variables), self.trainable_variables)
        self.calls.assign_add(1)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


class OwnTestStep(keras.Model):
    def test_step(self, data):
        return {"loss": 0.0}


class OwnLoss(keras.Model):
    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return super().compute_loss(x, y, y_pred, sample_weight, training) * 2.0


class OwnPredictStep(keras.Model):
    def predict_step(self, data):
        return tf.argmax(super().predict_step(data), -1)


def functional(model_class):
    inputs = keras.Input((3,))
    return model_class(inputs, keras.layers.Dense(1)(inputs))


def guide_model(compile_loss=True):
    m = GuideModel()
    m(np.zeros((1, 3), "float32"))  # its variables
    m.compile(optimizer=keras.optimizers.SGD(0.05), **({"loss": "mse"} if compile_loss else {}))
    return m


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    return x, x @ np.array([[1.0], [-2.0], [0.5]], "float32")


@pytest.mark.parametrize("make, method", [
    (lambda: Trainer(model=guide_model(), **QUIET), "train_step"),
    (lambda: Trainer(model=guide_model(compile_loss=False), **QUIET), "train_step"),  # the guide's: loss in the step
    (lambda: Trainer(model=lambda: functional(OwnTestStep), loss="mse", optimizer="sgd", **QUIET), "test_step"),
    (lambda: Trainer(model=lambda: functional(OwnLoss), loss="mse", optimizer="sgd", **QUIET), "compute_loss"),
])
def test_a_model_with_its_own_step_is_refused_at_construction_naming_the_class_and_the_trainer_subclass(make, method):
    with pytest.raises(ConfigError) as raised:
        make()
    message = str(raised.value)
    model_class = {"train_step": "GuideModel", "test_step": "OwnTestStep", "compute_loss": "OwnLoss"}[method]
    assert f"the model's class {model_class} ({__name__}.{model_class}) overrides Keras' {method}" in message, message
    assert "class MyTrainer(Trainer):" in message and f"def {method}(self" in message
    assert "docs/keras.md, A model with its own train_step" in message
    if method == "train_step":
        assert "self.update(loss, tape)" in message
    assert exit_code_of(raised.value)[0] == 2  # the CLI exits 2 without a traceback


def test_a_trainer_subclass_with_the_step_trains_the_guides_model_and_says_the_models_step_is_unused(caplog):
    class GuideTrainer(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(x, y, self.model(x, training=True))
            self.update(loss, tape)
            return {"loss": loss}

    x, y = data()
    model = guide_model()
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = GuideTrainer(model=model, **QUIET)
    said = [r.getMessage() for r in caplog.records if "GuideModel.train_step is not called" in r.getMessage()]
    assert said and "the Trainer runs GuideTrainer.train_step" in said[0], caplog.text
    before = model.dense.kernel.numpy().copy()
    trainer.fit(x, y, batch_size=16, steps=4)
    assert int(model.calls.numpy()) == 0 and not np.allclose(before, model.dense.kernel.numpy())


def test_frozen_models_and_models_given_by_name_are_checked_as_the_one_model():
    class Distill(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self.models["student"](x) - self.models["teacher"](x)) ** 2)
            self.update(loss, tape, "student")

    teacher = guide_model()  # a frozen model is only called: its own train_step is no concern
    Distill(models={"student": lambda: functional(keras.Model), "teacher": teacher}, frozen=["teacher"],
            optimizer=lambda: keras.optimizers.SGD(0.1), **QUIET)
    with pytest.raises(ConfigError, match=r"Trainer\(models=...\)\['student'\]: the model's class OwnTestStep"):
        Distill(models={"student": lambda: functional(OwnTestStep), "teacher": teacher}, frozen=["teacher"],
                optimizer=lambda: keras.optimizers.SGD(0.1), **QUIET)


def test_a_models_predict_step_is_said_to_be_unused_by_trainer_predict(caplog):
    x, y = data()
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = Trainer(model=lambda: functional(OwnPredictStep), loss="mse", optimizer="sgd", **QUIET)
    assert "OwnPredictStep.predict_step is not called by trainer.predict()" in caplog.text
    trainer.fit(x, y, batch_size=16, steps=2)
    assert trainer.predict(x).shape == (64, 1)  # the model's outputs, as the warning says
