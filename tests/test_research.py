"""Research code: several models and optimizers in one step, dict logs, unlabelled data, callback state,
and the examples/ scripts, through the public API and the real CLI."""
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from cli_runner import run_script
from conftest import read_metrics, run_cli, wait_until
from trainer import Callback, Trainer
from trainer.config import ConfigError
from trainer.data import DataError

ROOT = Path(__file__).resolve().parents[1]
GAN_TINY = ["recipe=gan", "trainer.max_steps=20", "trainer.log_every=10", "trainer.checkpoint_every=10",
            "trainer.eval_steps=2", "trainer.progress_bar=false", "data.batch_size=32"]


def tensors(prefix):
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith(("models/", "optimizers/")) and "iterations" not in k}


@pytest.mark.slow  # the default stage: tests/test_several_batches.py's two-optimizer WGAN, 2 replicas == 1 device
def test_gan_two_optimizers_on_two_replicas_equal_one_device(tmp_path):
    """recipe=gan: two models, two optimizers, one step; mirrored on 2 logical CPUs == the default strategy."""
    runs = {"default": [], "mirrored": ["strategy=mirrored", "strategy.logical_cpus=2"]}
    found, logs = {}, {}
    for name, extra in runs.items():
        result = run_cli(*GAN_TINY, *extra, f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        found[name] = tensors(tmp_path / name / "checkpoints" / "ckpt-20")
        logs[name] = [(r["d_loss"], r["g_loss"]) for r in read_metrics(tmp_path / name) if r["split"] == "train"]
    assert {k.split("/")[1] for k in found["default"]} == {"generator", "discriminator"}
    assert any(k.startswith("optimizers/generator/") for k in found["default"])  # Adam slots of both
    assert any(k.startswith("optimizers/discriminator/") for k in found["default"])
    assert found["mirrored"].keys() == found["default"].keys()
    for key, value in found["default"].items():
        np.testing.assert_allclose(found["mirrored"][key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(logs["mirrored"], logs["default"], rtol=1e-4)


@pytest.mark.slow  # over 30 s on 2 cores: CI runs it in the slow stage
def test_gan_float16_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    """examples/gan.py under mixed_float16 (a loss scale per optimizer, both checkpointed), SIGKILLed after
    its first checkpoint and run again, ends bit-identical to a run that was never killed."""
    args = ["--steps", "30", "--checkpoint-every", "10", "--precision", "mixed_float16", "--deterministic"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(run_dir):
        return subprocess.run([sys.executable, str(ROOT / "examples" / "gan.py"), *args, "--run-dir", str(run_dir)],
                              capture_output=True, text=True, timeout=600, env=env)

    whole = run(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "gan.py"), *args, "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_until(lambda: (killed / "checkpoints" / "ckpt-10.index").exists(), proc, "ckpt-10 saved")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fingerprint = lambda out: out.strip().splitlines()[-1].split("fingerprint ")[1]  # noqa: E731
    assert fingerprint(resumed.stdout) == fingerprint(whole.stdout)
    reader = tf.train.load_checkpoint(str(killed / "checkpoints" / "ckpt-30"))
    for name in ("generator", "discriminator"):
        assert reader.get_tensor(f"loss_scales/{name}/scale/.ATTRIBUTES/VARIABLE_VALUE") >= 1.0
        assert reader.get_tensor(f"optimizers/{name}/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 30
    rows = [r for r in read_metrics(killed) if r["split"] == "train"]
    assert all("generator/loss_scale" in r and "discriminator/loss_scale" in r for r in rows)


def blobs(n=256, unlabelled=False):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n).astype("int32")
    x = (rng.normal(size=(n, 4)) + y[:, None]).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices(x if unlabelled else (x, y))
    return ds.batch(16, drop_remainder=True)


def mlp(out=2):
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                     keras.layers.Dense(out)])


class Autoencoder(Trainer):
    """A step of its own on unlabelled data, returning two loss terms."""

    def train_step(self, x):
        with tf.GradientTape() as tape:
            reconstruction = self.model(x, training=True)
            error = tf.reduce_mean(tf.square(reconstruction - x))
            penalty = 1e-3 * tf.add_n([tf.reduce_sum(tf.square(w)) for w in self.model.trainable_variables])
            loss = error + penalty
        self.update(loss, tape)
        return {"loss": loss, "error": error, "penalty": penalty}


def test_an_overridden_steps_logs_reach_jsonl_tensorboard_and_the_progress_bar(tmp_path, capsys):
    trainer = Autoencoder(model=mlp(4), loss=None, optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path,
                          log_every=5, progress_bar=True)
    logs = trainer.fit(blobs(unlabelled=True), steps=10)
    assert logs["loss"] == pytest.approx(logs["error"] + logs["penalty"], rel=1e-5)
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [5, 10]
    for r in rows:
        assert {"loss", "error", "penalty", "grad_norm", "lr"} <= r.keys() and r["grad_norm"] > 0
    assert rows[1]["error"] < rows[0]["error"]  # averaged over the window, and it learns
    tags = set()
    for event_file in (tmp_path / "tensorboard" / "train").glob("events.*"):
        for event in tf.compat.v1.train.summary_iterator(str(event_file)):
            tags.update(v.tag for v in event.summary.value)
    assert {"loss", "error", "penalty", "grad_norm"} <= tags
    assert "error=" in capsys.readouterr().err  # the progress bar's postfix


def test_unlabelled_data_with_the_default_step_is_a_clear_error():
    trainer = Trainer(model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False)
    with pytest.raises(DataError, match="no labels.*override train_step and call self.update"):
        trainer.fit(blobs(unlabelled=True), steps=2)


def test_two_models_with_one_optimizer_builder_each_get_an_optimizer_and_a_loss_scale():
    class TwoHeads(Trainer):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            for name in ("a", "b"):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                        y, tf.cast(self.models[name](x, training=True), tf.float32), from_logits=True))
                self.update(loss, tape, name)
            return {"loss": loss}

    trainer = TwoHeads(models={"a": mlp(), "b": mlp()}, optimizer=lambda: keras.optimizers.SGD(0.1),
                       precision="mixed_float16", progress_bar=False, jit_compile=False)
    trainer.fit(blobs(), steps=3)
    assert trainer.optimizers["a"] is not trainer.optimizers["b"]
    assert [int(o.iterations.numpy()) for o in trainer.optimizers.values()] == [3, 3]
    assert all(u.loss_scale.enabled for u in trainer.updaters.values())
    with pytest.raises(AttributeError, match="several"):
        trainer.model  # noqa: B018
    with pytest.raises(TypeError, match="ready-made optimizer can train one model"):
        Trainer(models={"a": mlp(), "b": mlp()}, optimizer=keras.optimizers.SGD(0.1))
    with pytest.raises(ConfigError, match="name no model"):
        Trainer(models={"a": mlp()}, optimizers={"c": lambda: keras.optimizers.SGD(0.1)})


class CountLogs(Callback):
    """State that must survive a restart: how many log events this run has seen."""

    def __init__(self):
        self.count = 0

    def on_log(self, trainer, step, logs):
        self.count += 1

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_a_callbacks_state_is_checkpointed_and_resumed(tmp_path):
    def trainer(callback):
        return Trainer(model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, callbacks=[callback],
                       log_every=1, checkpoint_every=2, progress_bar=False)

    first = CountLogs()
    trainer(first).fit(blobs(), steps=4)
    assert first.count == 4
    resumed = CountLogs()
    trainer(resumed).fit(blobs(), steps=7)
    assert resumed.count == 7  # 4 restored from ckpt-4, then 3 more
    saved = (tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-7"))
             .get_tensor("callbacks/.ATTRIBUTES/py_state"))
    assert json.loads(saved)["CountLogs"] == {"count": 7}  # beside the built-ins' (DivergenceGuard's)


# real processes (slow stage); the default stage: test_api.py's examples/custom_model.py, the steps above
@pytest.mark.slow
def test_examples_run(tmp_path):
    """The classifier and the VAE of examples/ (the GAN runs in the kill/resume test above)."""
    for script, says in (("classifier.py", "eval accuracy"), ("vae.py", "reconstruction")):
        # in this process: no start-up to test
        proc = run_script(ROOT / "examples" / script, ["--steps", "20"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert says in proc.stdout


class Accuracy(Trainer):
    """The default train step; a test_step of its own whose logs are per-batch means."""

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        predicted = tf.argmax(self.model(x, training=False), axis=-1, output_type=tf.int32)
        return {"acc": tf.reduce_mean(tf.cast(predicted == y, tf.float32))}


def test_step_logs_are_example_weighted_with_a_ragged_last_batch():
    """17 eval examples in batches of 16: the logs average over examples (one device), not over batches."""
    trainer = Accuracy(model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False)
    trainer.fit(blobs(), steps=3)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(17, 4)).astype("float32"), rng.integers(0, 2, 17).astype("int32")
    logs = trainer.evaluate(tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    truth = np.mean(np.argmax(trainer.model(x).numpy(), -1) == y)
    assert logs["acc"] == pytest.approx(truth, abs=1e-6)


def test_research_mistakes_are_named():
    class Vector(Trainer):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                loss = keras.losses.sparse_categorical_crossentropy(y, self.model(x, training=True), from_logits=True)
            self.update(loss, tape)  # per example, not its mean

    with pytest.raises(Exception, match="not a scalar"):
        Vector(model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False).fit(blobs(), steps=1)
    with pytest.raises(TypeError, match="default train_step trains one model"):
        Trainer(models={"a": mlp(), "b": mlp()}, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False).fit(blobs(), steps=1)

    class NoName(Trainer):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self.models["a"](x, training=True))
            self.update(loss, tape)

    with pytest.raises(Exception, match=r"several optimizers \['a', 'b'\]: name the one"):
        NoName(models={"a": mlp(), "b": mlp()}, optimizer=lambda: keras.optimizers.SGD(0.1),
               progress_bar=False).fit(blobs(), steps=1)


class Unpicklable(Callback):
    def state_dict(self):
        return {"when": object()}


class Renamed(Callback):
    def state_dict(self):
        return {"new_name": 1}

    def load_state_dict(self, state):
        self.value = state["new_name"]  # a checkpoint from before the rename has "count"


def test_callback_state_that_cannot_be_saved_or_taken_back_is_named_or_started_fresh(tmp_path, caplog):
    def trainer(callback):
        return Trainer(model=mlp(), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, callbacks=[callback],
                       log_every=1, checkpoint_every=2, progress_bar=False)

    with pytest.raises(TypeError, match="Unpicklable's state_dict"):
        trainer(Unpicklable()).fit(blobs(), steps=2)
    assert not (tmp_path / "checkpoints").exists()  # said before any work
    trainer(CountLogs()).fit(blobs(), steps=2)
    (tmp_path / "checkpoints" / "configured.json").write_text("[]")  # not the dict it should be
    renamed = Renamed()
    renamed.__class__.__name__ = "CountLogs"  # the same callback, its code changed since the save
    import logging
    with caplog.at_level(logging.WARNING):
        trainer(renamed).fit(blobs(), steps=4)
    assert "could not take its saved state" in caplog.text


def test_a_refused_resume_refuses_again_on_the_next_fit(tmp_path):
    """A second fit() on a Trainer whose first was refused must not train from scratch over the run."""
    from trainer import CheckpointError

    def trainer(units):
        return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(units),
                                                       keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path, checkpoint_every=2,
                       progress_bar=False)

    trainer(8).fit(blobs(), steps=4)
    before = (tmp_path / "checkpoints" / "ckpt-4.index").read_bytes()
    other = trainer(16)
    for _ in range(2):
        with pytest.raises(CheckpointError, match="does not fit"):
            other.fit(blobs(), steps=4)
    assert (tmp_path / "checkpoints" / "ckpt-4.index").read_bytes() == before


def test_evaluation_the_default_test_step_cannot_do_is_refused_before_training(tmp_path):
    """loss=None with eval data and the default test_step: said at the start, not after training to the first eval."""
    with pytest.raises(TypeError, match="override test_step"):
        Autoencoder(model=mlp(4), loss=None, optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=tmp_path,
                    progress_bar=False).fit(blobs(unlabelled=True), blobs(unlabelled=True), steps=2)
    assert not (tmp_path / "checkpoints").exists()


def test_a_step_returning_a_tensor_is_told_to_return_a_dict():
    class ReturnsLoss(Trainer):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, self.model(x, training=True),
                                                                                   from_logits=True))
            self.update(loss, tape)
            return loss

    with pytest.raises(TypeError, match="must return None or a dict of scalar tensors"):
        ReturnsLoss(model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False).fit(blobs(), steps=1)


class SelfMetered(Trainer):
    """The Keras custom-step habit: the step updates the Trainer's metrics itself (no default step, loss=None).
    train_step updates accuracy only; test_step updates accuracy and AUC through the same `self.metrics`."""

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        self.update(loss, tape)
        self.metrics["accuracy"].update_state(y, logits)
        return {"xent": loss}

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self.model(x, training=False)
        self.metrics["accuracy"].update_state(y, logits)
        self.metrics["auc"].update_state(y, tf.nn.softmax(logits)[:, 1])


def test_metrics_updated_in_an_overridden_step_are_reported(tmp_path):
    def trainer(run_dir=None):
        return SelfMetered(model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1), run_dir=run_dir, log_every=5,
                           eval_every=5, progress_bar=False, tensorboard=False,
                           metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                                    keras.metrics.AUC(name="auc")])

    metered = trainer(tmp_path)
    returned = metered.fit(blobs(), blobs(), steps=10)
    rows = read_metrics(tmp_path)
    train, evals = [r for r in rows if r["split"] == "train"], [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [5, 10] and [r["step"] for r in evals] == [5, 10]
    assert all("accuracy" in r and "auc" not in r for r in train)  # AUC never moved in training: not a 0.0
    x, y = (np.concatenate([b[i].numpy() for b in blobs()]) for i in (0, 1))
    probabilities = tf.nn.softmax(metered.model(x)).numpy()
    auc = keras.metrics.AUC()
    auc.update_state(y, probabilities[:, 1])
    expected = {"accuracy": np.mean(probabilities.argmax(-1) == y), "auc": float(auc.result())}
    for logs in (evals[-1], returned, metered.evaluate(blobs())):
        assert logs["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        assert logs["auc"] == pytest.approx(expected["auc"], abs=1e-6)
    # The evaluations between the windows update the eval copies, not the train metrics of the next window.
    assert trainer().fit(blobs(), steps=10)["accuracy"] == pytest.approx(train[-1]["accuracy"], abs=1e-6)


def test_an_optimizer_the_step_never_updates_is_named_and_a_typo_is_an_error(caplog):
    import logging

    class OneOfTwo(Trainer):
        def __init__(self, name, **kwargs):
            super().__init__(**kwargs)
            self.which = name

        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                    y, self.models["a"](x, training=True), from_logits=True))
            self.update(loss, tape, self.which)

    def trainer(name):
        return OneOfTwo(name, models={"a": mlp(), "b": mlp()}, optimizer=lambda: keras.optimizers.SGD(0.1),
                        progress_bar=False)

    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer("a").fit(blobs(), steps=2)
    assert "never calls self.update(loss, tape, name) for optimizer(s) ['b']" in caplog.text
    assert "self.update(loss, tape, 'b')" in caplog.text
    assert "their models train, with the gradients averaged over replicas" in caplog.text  # not "not trained"
    assert ("without the Trainer's loss scaling, finite check" in caplog.text
            and "grad_norm/skipped_steps" in caplog.text)
    with pytest.raises(ValueError, match=r"No optimizer 'c': this Trainer's optimizers are \['a', 'b'\]"):
        trainer("c").fit(blobs(), steps=1)


def test_a_forward_pass_outside_the_tape_names_the_optimizer_and_the_cause():
    class Outside(Trainer):
        def train_step(self, data):
            x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
            logits = self.model(x, training=True)  # before the tape: nothing recorded
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            self.update(loss, tape)

    with pytest.raises(ValueError,
                       match=r"no gradient for any variable of model 'model'.*outside `with tf.GradientTape"):
        Outside(model=mlp(), optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False).fit(blobs(), steps=1)


class NoisyInputs(Trainer):
    """Input noise in the step, drawn by `self.noise(self, shape)`: tf.random.uniform, self.rng.uniform, ..."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            logits = self.model(x + self.noise(self, tf.shape(x)), training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        self.update(loss, tape)


@pytest.mark.slow
def test_random_state_no_checkpoint_holds_is_named_and_self_rng_resumes_exactly(tmp_path, caplog):
    """trainer.deterministic: tf.random.* in the step is named at its first trace (a resume draws other
    numbers, so other weights); self.rng and Keras' Dropout (seed generators kept on the model) resume exactly."""
    def fingerprints(noise, name):
        def trainer(run_dir):
            t = NoisyInputs(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                            keras.layers.Dropout(0.3), keras.layers.Dense(2)]),
                            loss=None, optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir, seed=1,
                            deterministic=True, log_every=2, checkpoint_every=2, progress_bar=False)
            t.noise = noise
            return t

        straight = trainer(tmp_path / name / "straight")
        straight.fit(blobs(), steps=8)
        trainer(tmp_path / name / "resumed").fit(blobs(), steps=4)
        resumed = trainer(tmp_path / name / "resumed")
        resumed.fit(blobs(), steps=8)
        return straight.weights_fingerprint(), resumed.weights_fingerprint()

    with caplog.at_level(logging.WARNING, logger="trainer"):
        a, b = fingerprints(lambda self, shape: tf.random.uniform(shape), "stateful")
    assert a != b  # what the warning says
    assert "draws random numbers whose state is in no checkpoint" in caplog.text
    assert "RandomUniform 'while/" in caplog.text and "self.rng.uniform(shape)" in caplog.text
    assert caplog.text.count("draws random numbers whose state") == 3  # once per Trainer (3), at its first trace

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        a, b = fingerprints(lambda self, shape: self.rng.uniform(shape), "rng")
        assert a == b
        assert "draws random numbers" not in caplog.text
        keras_unseeded = NoisyInputs(model=mlp(), loss=None, optimizer=lambda: keras.optimizers.SGD(0.1),
                                     deterministic=True, progress_bar=False)
        keras_unseeded.noise = lambda self, shape: keras.random.uniform(shape)
        keras_unseeded.fit(blobs(), steps=1)
        assert "keras.random.* without a seed (Keras' global SeedGenerator)" in caplog.text
        caplog.clear()
        # a retrace (here after reset_step_functions) names what
        # is new only: a fractional pooling, not the uniform again
        retraced = NoisyInputs(model=mlp(), loss=None, optimizer=lambda: keras.optimizers.SGD(0.1), deterministic=True,
                               progress_bar=False)
        retraced.noise = lambda self, shape: tf.random.uniform(shape)
        retraced.fit(blobs(), steps=1)
        assert caplog.text.count("RandomUniform 'while/") == 1 and "FractionalMaxPool" not in caplog.text
        caplog.clear()
        pooled = lambda: tf.reduce_mean(tf.nn.fractional_max_pool(tf.ones((1, 4, 4, 1)), [1.0, 1.5, 1.5, 1.0],
                                                                  seed=1)[0])
        retraced.noise = lambda self, shape: tf.random.uniform(shape) + 0.0 * pooled()
        retraced.reset_step_functions()
        retraced.fit(blobs(), steps=2)
        said = [r.getMessage() for r in caplog.records]
        new = [m for m in said if "draws random numbers whose state" in m]
        assert len(new) == 1 and "FractionalMaxPool 'while/" in new[0] and "RandomUniform" not in new[0], said
        assert any("traced again" in m and "RandomUniform" in m for m in said), said  # the uniform restarts: said
        caplog.clear()
        not_deterministic = NoisyInputs(model=mlp(), loss=None, optimizer=lambda: keras.optimizers.SGD(0.1),
                                        progress_bar=False)
        not_deterministic.noise = lambda self, shape: tf.random.uniform(shape)
        not_deterministic.fit(blobs(), steps=1)
    assert "draws random numbers" not in caplog.text  # not deterministic: resume is not promised bit-exact


def test_keras_scale_function_replaced_by_a_patch_is_put_back_and_said_once(caplog):
    """Something replacing Keras' scale_loss_for_distribution (a mock.patch, a reload) would silently bring back
    Keras' division in an overridden step: the Trainer puts its own function back, and says so once."""
    from unittest import mock

    from keras.src.losses import loss as keras_loss

    with mock.patch.object(keras_loss, "scale_loss_for_distribution", lambda value: value):
        with caplog.at_level(logging.WARNING, logger="trainer"):
            for _ in range(2):
                t = NoisyInputs(model=mlp(), loss=None, optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False)
                t.noise = lambda self, shape: 0.0
                t.fit(blobs(), steps=1)
                assert getattr(keras_loss.scale_loss_for_distribution, "_trainer_loss_convention", False)
                keras_loss.scale_loss_for_distribution = lambda value: value  # replaced again: put back, not said again
    assert caplog.text.count("scale_loss_for_distribution was replaced") == 1
    assert getattr(keras_loss.scale_loss_for_distribution, "_trainer_loss_convention", False)  # the patch's exit
