"""Gradient accumulation (trainer.grad_accum_steps=K > 1) and a step of one's own: accumulation runs accumulate_step
and apply_accumulated, never train_step, so a train_step it would leave out is refused when training starts (not
when a run's Trainer is made to evaluate it); what accumulation runs is what the class or the instance says."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from trainer import Trainer
from trainer.config import ConfigError
from trainer.runs import config_path


def data(n=320, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    return x, y


def small_model():
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])


def make(cls=Trainer, **options):
    loss = options.pop("loss", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return cls(model=small_model, loss=loss, optimizer=lambda: keras.optimizers.SGD(0.1), seed=0, progress_bar=False,
               **options)


def smoothed(y, logits):
    """Label smoothing: a loss the default step does not compute."""
    return keras.losses.categorical_crossentropy(tf.one_hot(y, 2), logits, from_logits=True, label_smoothing=0.5)


class Smoothing(Trainer):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(smoothed(y, logits))
        self.update(loss, tape)
        return {"loss": loss, "mean_logit": tf.reduce_mean(logits)}


class OwnLog(Trainer):
    """A step of its own, as the command line's trainer_class: the default step and a log of its own."""

    def train_step(self, data):
        super().train_step(data)
        return {"own": tf.constant(1.0)}


def refusal(trainer) -> str:
    """fit()'s ConfigError, said before it reads the data."""
    read = []
    with pytest.raises(ConfigError) as refused:
        trainer.fit(lambda context: read.append(1) or tf.data.Dataset.from_tensor_slices(data()).batch(16), steps=2)
    assert not read
    return str(refused.value)


def test_an_overridden_train_step_with_accumulation_is_refused_at_fit_naming_the_fixes():
    """Accumulation never calls train_step: an overridden one would be left out silently (its loss, its logs).
    Refused by fit() before the data is read, in the Python arguments' names; grad_accum_steps=1 trains it."""
    for loss in (keras.losses.SparseCategoricalCrossentropy(from_logits=True), None):
        said = refusal(make(Smoothing, loss=loss, grad_accum_steps=2))
        for part in ("Trainer(grad_accum_steps=2) and an overridden train_step (Smoothing.train_step)",
                     "never calls train_step", "override of compute_loss", "the step's own extra logs are not",
                     "Trainer(batches_per_step=2) in place of Trainer(grad_accum_steps=2)",
                     "or Trainer(grad_accum_steps=1) (the default)"):
            assert part in said, said
        assert "trainer.grad_accum_steps" not in said and "trainer.batches_per_step" not in said, said
    x, y = data(n=64)
    assert set(make(Smoothing, loss=None).fit(x, y, batch_size=16, steps=2)) >= {
        "loss", "mean_logit"}  # grad_accum_steps=1: the step runs, its logs logged


def test_a_trainer_made_with_the_refused_settings_evaluates_and_predicts():
    """Nothing trains there: a run's Trainer (assemble.trainer_for makes one from its saved config) is not refused."""
    x, y = data(n=64)
    trainer = make(Smoothing, grad_accum_steps=2)
    assert set(trainer.evaluate(x, y, batch_size=16)) >= {"loss"}
    assert trainer.predict(x, batch_size=16).shape == (64, 2)


def test_a_run_trained_with_the_old_warning_is_evaluated_and_its_training_refused_before_the_data(tmp_path):
    """A run folder of trainer_class=<a train_step of its own> and trainer.grad_accum_steps=2 trained (before the
    refusal, with a warning): `python -m trainer.evaluate RUN` evaluates it (it exited 2 with the refusal);
    training it on (a resume) exits 2, in the config keys' names, before the data is loaded."""
    run = tmp_path / "run"
    own = f"trainer_class={OwnLog.__module__}.OwnLog"
    tiny = (own, "trainer.max_steps=2", "trainer.eval_every=0", "trainer.progress_bar=false", "data.batch_size=64",
            f"hydra.run.dir={run}")
    trained = run_cli(*tiny)
    assert trained.returncode == 0, (trained.stdout + trained.stderr)[-3000:]
    saved = config_path(run)
    assert "grad_accum_steps: 1\n" in saved.read_text()
    saved.write_text(saved.read_text().replace("grad_accum_steps: 1\n", "grad_accum_steps: 2\n"))  # as saved then
    result = run_cli(str(run), "trainer.eval_steps=2", module="trainer.evaluate")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.startswith("ckpt-2 (step 2)"), result.stdout
    resumed = run_cli(*tiny[1:-1], "trainer.max_steps=4", "trainer.grad_accum_steps=2", f"hydra.run.dir={run}", own)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 2, output[-2000:]
    assert "trainer.grad_accum_steps=2 and an overridden train_step (OwnLog.train_step)" in output, output[-2000:]
    assert "trainer.batches_per_step=2 in place of" in output and "Traceback" not in output
    assert "Data:" not in output  # before the data is loaded


def test_a_train_step_set_on_the_instance_is_refused_and_an_accumulate_step_set_there_runs_outside_xla(caplog):
    """`t.train_step = f` with grad_accum_steps=2 was accepted and f never called; `t.accumulate_step = f` under
    XLA was replaced by the Trainer's compiled one. The log says only what is so."""
    never = make(grad_accum_steps=2)
    never.train_step = lambda data: pytest.fail("accumulation does not call train_step")
    assert "and an overridden train_step (train_step set on the Trainer object)" in refusal(never)

    seen = []
    trainer = make(grad_accum_steps=2, jit_compile=True)

    def accumulate_step(data):
        seen.append("own")  # at trace time: once per trace
        Trainer.accumulate_step(trainer, data)

    trainer.accumulate_step = accumulate_step
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(tf.data.Dataset.from_tensor_slices(data(n=128)).batch(16, drop_remainder=True), steps=3)
    assert seen == ["own"] and int(trainer.optimizer.iterations.numpy()) == 3
    said = caplog.text
    assert "XLA: the overridden accumulate_step runs as written, outside XLA" in said, said
    assert "forward and backward are compiled" not in said, said


def test_a_train_step_overridden_below_an_inherited_accumulation_is_refused():
    """class P overrides accumulate_step, class D(P) train_step: accumulation runs P's, never D.train_step (it was
    accepted). The override further down wins: D refused, a subclass of D that accumulates too accepted."""

    class P(Trainer):
        def accumulate_step(self, data):
            super().accumulate_step(data)

    class D(P):
        train_step = Smoothing.train_step

    said = refusal(make(D, grad_accum_steps=2))
    assert "overridden train_step (D.train_step)" in said and "(it runs P.accumulate_step, overridden above it)" in said

    class Both(D):
        def apply_accumulated(self):
            super().apply_accumulated()

    trainer = make(Both, grad_accum_steps=2, jit_compile=False)
    trainer.fit(tf.data.Dataset.from_tensor_slices(data(n=64)).batch(16, drop_remainder=True), steps=1)
    assert int(trainer.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_a_class_that_overrides_accumulation_accumulates_as_it_says(jit_compile):
    """accumulate_step / apply_accumulated are what accumulation runs: overriding them (next to train_step or
    not) is accepted and run, also under XLA (which compiles the Trainer's own accumulate_step only)."""
    seen = []

    class Counted(Trainer):
        def train_step(self, data):
            raise AssertionError("accumulation does not call train_step")

        def accumulate_step(self, data):
            seen.append("accumulate")  # at trace time: once per trace
            super().accumulate_step(data)

        def apply_accumulated(self):
            seen.append("apply")
            super().apply_accumulated()

    trainer = make(Counted, grad_accum_steps=2, jit_compile=jit_compile)
    trainer.fit(tf.data.Dataset.from_tensor_slices(data(n=128)).batch(16, drop_remainder=True), steps=3)
    assert seen == ["accumulate", "apply"]
    assert int(trainer.optimizer.iterations.numpy()) == 3


def test_a_compute_loss_override_is_accumulated_and_an_own_step_of_k_batches_makes_the_same_update():
    """The fixes the refusal names: a compute_loss override under grad_accum_steps=2 (micro-batches of 16),
    and an own step given the 2 batches (batches_per_step=2, one self.update of their mean loss), both
    train as the default accumulation-free step on batches of 32 with that loss."""

    class SmoothedLoss(Trainer):
        def compute_loss(self, x, y, y_pred, sample_weight=None):
            return tf.nn.compute_average_loss(smoothed(y, y_pred))

    class OwnAccumulation(Trainer):
        takes_several_batches = True

        def train_step(self, batches):
            with tf.GradientTape() as tape:
                losses = [tf.reduce_mean(smoothed(y, self.model(x, training=True))) for x, y in batches]
                loss = tf.add_n(losses) / len(losses)
            self.update(loss, tape)
            return {"loss": loss}

    def trained(cls, batch_size, loss=None, **options):
        trainer = make(cls, loss=loss, **options)
        trainer.fit(tf.data.Dataset.from_tensor_slices(data()).batch(batch_size, drop_remainder=True), steps=5)
        return trainer.model.get_weights()

    large = trained(SmoothedLoss, 32)
    for weights in (trained(SmoothedLoss, 16, grad_accum_steps=2), trained(OwnAccumulation, 16, batches_per_step=2)):
        for a, b in zip(weights, large):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(trained(Trainer, 32, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))[0],
                           large[0], atol=1e-4)  # the smoothing changed the update: the override was used
