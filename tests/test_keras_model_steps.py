"""A Keras model with its own train_step, test_step, compute_loss or predict_step (Keras' custom-step guide): the
Trainer calls none of them, so a model that overrides the first three is refused at Trainer(), before any data is
read or step traced (it trained silently on the plain loss, its step never called), naming the class and the fix;
a Trainer subclass with the same method of its own only gets a warning. A model's compute_loss is refused only under
the default step and loss: a Trainer subclass may reuse it (self.model.compute_loss), which trains to Keras'
weights. Tiny models through the public API."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN
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
    if method == "compute_loss":  # reuse the model's loss: the call the Trainer's compute_loss takes
        assert "    return self.model.compute_loss(x, y, y_pred, sample_weight)" in message, message
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


class PenalizedLoss(keras.Model):
    """keras_hub's detectors' habit: the compiled loss plus terms of the model's own."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + 0.1 * tf.reduce_sum(tf.abs(self.layers[-1].kernel))


def penalized(seed=1):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3,))
    model = PenalizedLoss(inputs, keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(0.01))(inputs))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


class ReusesTheModelsLoss(Trainer):  # the fix the error names
    def compute_loss(self, x, y, y_pred, sample_weight=None):
        return self.model.compute_loss(x, y, y_pred, sample_weight)


def test_a_trainer_subclass_that_reuses_the_models_compute_loss_is_taken_silently_and_trains_to_keras_weights(caplog):
    """It was refused even so (and a step of one's own that called the model's loss got a false "is not called")."""
    x, y = data(256)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = ReusesTheModelsLoss(model=penalized(), **QUIET)
    assert "compute_loss" not in caplog.text
    trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False, validation_data=(x, y))
    keras_model = penalized()
    keras_model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
    for keras_weight, trainer_weight in zip(keras_model.get_weights(), trainer.model.get_weights()):
        np.testing.assert_allclose(trainer_weight, keras_weight, atol=1e-6)
    assert trainer.evaluate(x, y)["loss"] == pytest.approx(
        float(keras_model.compute_loss(x, y, keras_model(x))), rel=1e-5)  # the default test_step calls it too


@pytest.mark.parametrize("override", ["train_step", "compute_gradients", "test_step"])
def test_a_models_compute_loss_is_refused_only_where_no_step_of_the_subclass_can_call_it(caplog, override):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.model.compute_loss(x, y, self.model(x, training=True))
        self.update(loss, tape)

    def compute_gradients(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.model.compute_loss(x, y, self.model(x, training=True))
        return loss, self.updater().unscaled_gradients(tape, loss, self.model.trainable_variables)

    def test_step(self, data):
        x, y = data
        return {"mae": tf.reduce_mean(tf.abs(self.model(x, training=False) - y))}

    Own = type("Own", (Trainer,), {override: locals()[override]})
    if override == "test_step":  # training would still run the default loss: refused
        with pytest.raises(ConfigError, match="overrides Keras' compute_loss"):
            Own(model=penalized(), **QUIET)
        return
    x, y = data(256)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = Own(model=penalized(), **QUIET)
    assert "is not called" not in caplog.text
    before = trainer.model.get_weights()[0].copy()
    trainer.fit(x, y, batch_size=32, steps=4)
    assert not np.allclose(before, trainer.model.get_weights()[0])


REPLICAS = """
import json, sys
from trainer.distribute import split_cpu
split_cpu(2)
import numpy as np, tensorflow as tf
from test_keras_model_steps import ReusesTheModelsLoss, QUIET, data, penalized

x, y = data(256)
trainer = ReusesTheModelsLoss(model=penalized, strategy="mirrored", **QUIET)
trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False)
with trainer.strategy.scope():
    keras_model = penalized()
keras_model.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
print("RESULT", json.dumps({"replicas": trainer.strategy.num_replicas_in_sync, "gap": max(
    float(np.abs(a - b).max()) for a, b in zip(keras_model.get_weights(), trainer.model.get_weights()))}))
sys.stdout.flush()
"""


@pytest.mark.slow
def test_the_model_s_compute_loss_reused_on_two_replicas_trains_as_keras_fit_on_them(tmp_path):
    """The model's compute_loss gives the replica's share of the global mean (Keras' convention, the Trainer's
    compute_loss's too): the same weights as Keras' fit under the same two replicas."""
    script = tmp_path / "replicas.py"
    script.write_text(REPLICAS + SKIP_TEARDOWN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("RESULT"))[7:])
    assert out["replicas"] == 2 and out["gap"] < 1e-6, out
