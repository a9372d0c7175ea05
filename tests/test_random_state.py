"""Random state a resume cannot repeat is named: a tf.random.Generator of the user's, a shuffled data set object
iterated again in one process."""
import logging

import keras
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import Trainer

NOISE = tf.random.Generator.from_seed(3)  # a module's generator: no checkpoint holds it


class NoisyInputs(Trainer):
    """Input noise in the step, drawn by `self.noise(self, shape)`."""

    def train_step(self, data):
        x, y = tf.cast(data[0], tf.float32), data[1]
        with tf.GradientTape() as tape:
            logits = self.model(x + self.noise(self, tf.shape(x)), training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        self.update(loss, tape)


def make(run_dir, noise=None):
    t = (NoisyInputs if noise else Trainer)(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                                            loss=None if noise else
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=lambda: keras.optimizers.Adam(1e-2),
            run_dir=run_dir, seed=1, deterministic=True, log_every=2, checkpoint_every=2, progress_bar=False)
    t.noise = noise
    return t


def test_a_generator_on_the_trainer_is_saved_and_one_elsewhere_is_named_with_the_fix(tmp_path, caplog):
    """trainer.deterministic: a tf.random.Generator the Trainer holds (self.noise_rng) is in every checkpoint
    (trainer/held_state.py), so a resume draws what the run never stopped draws, and nothing is said; one held
    elsewhere (a module's), which no checkpoint holds, is named at the trace with the fix."""
    def trainer(run_dir):
        t = make(run_dir, lambda self, shape: self.noise_rng.uniform(shape))
        t.noise_rng = tf.random.Generator.from_seed(7)
        return t

    with caplog.at_level(logging.WARNING, logger="trainer"):
        straight = trainer(tmp_path / "straight")
        straight.fit(blobs(), steps=4)
        trainer(tmp_path / "resumed").fit(blobs(), steps=2)
        resumed = trainer(tmp_path / "resumed")
        resumed.fit(blobs(), steps=4)
    assert straight.weights_fingerprint() == resumed.weights_fingerprint()
    assert "draws random numbers" not in caplog.text, caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(tmp_path / "module", lambda self, shape: NOISE.normal(shape)).fit(blobs(), steps=1)
    assert f"a tf.random.Generator of your own ({__name__}.NOISE)" in caplog.text
    assert "Fix: draw from self.rng" in caplog.text and "or hold your generator on the Trainer" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # self.rng is in every checkpoint: nothing said
        make(tmp_path / "rng", lambda self, shape: self.rng.normal(shape)).fit(blobs(), steps=1)
    assert "draws random numbers" not in caplog.text


def test_a_generator_in_a_helper_or_closure_is_named_and_the_global_generator_explained(tmp_path, caplog, monkeypatch):
    """A generator one level into an attribute (a helper object, a closure) is named by its path, not only by
    its state variable; tf.random.get_global_generator() under determinism (TensorFlow's bare "call
    set_global_generator first") is an error naming the fix, self.rng."""
    class Helper:
        def __init__(self):
            self.gen = tf.random.Generator.from_seed(5)

    gen = tf.random.Generator.from_seed(6)
    for attribute, value, draw, named in (
            ("helper", Helper(), lambda self: self.helper.gen, "self.helper.gen"),
            ("draw", lambda shape: gen.normal(shape), None, "self.draw (its closure's gen)")):
        t = make(tmp_path / attribute, (lambda self, shape: self.draw(shape)) if draw is None else
                 (lambda self, shape, draw=draw: draw(self).uniform(shape)))
        setattr(t, attribute, value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainer"):
            t.fit(blobs(), steps=1)
        assert f"a tf.random.Generator of your own ({named}), which no checkpoint holds" in caplog.text, caplog.text

    from tensorflow.python.ops import stateful_random_ops
    monkeypatch.setattr(stateful_random_ops, "global_generator", None)  # as in a new process
    with pytest.raises(RuntimeError, match=r"tf.random.get_global_generator\(\) in the step.*Fix: draw from self.rng"):
        make(tmp_path / "global",
             lambda self, shape: tf.random.get_global_generator().normal(shape)).fit(blobs(), steps=1)

def test_a_shuffled_data_set_object_iterated_again_is_named_with_the_fix(tmp_path, caplog):
    """One seeded, shuffled tf.data object reused by a second Trainer (itself or a new .map of it) gives it the
    next order of the shuffle's sequence (tf.data keeps it in the object), so the in-process resume is not exact:
    said with the fix. A data
    set built again for each Trainer resumes exactly, and nothing is said."""
    fresh = lambda: blobs(shuffle=True)  # noqa: E731
    straight = make(tmp_path / "straight")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        straight.fit(fresh(), steps=8)
        make(tmp_path / "rebuilt").fit(fresh(), steps=4)
        rebuilt = make(tmp_path / "rebuilt")
        rebuilt.fit(fresh(), steps=8)
    assert rebuilt.weights_fingerprint() == straight.weights_fingerprint()
    assert "iterated for training before" not in caplog.text

    shared = fresh()  # a new .map of one shuffled object each time shares its shuffle: said too
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(tmp_path / "shared").fit(shared.map(lambda x, y: (x, y)), steps=4)
        assert "iterated for training before" not in caplog.text  # its first training iterator
        resumed = make(tmp_path / "shared")
        resumed.fit(shared.map(lambda x, y: (x, y)), steps=8)
    assert resumed.weights_fingerprint() != straight.weights_fingerprint()  # what the warning says
    assert caplog.text.count("The training data set's shuffle was iterated for training before") == 1
    assert "this run, at step 4," in caplog.text
    assert "Fix: build the pipeline from its source each time, including the shuffle" in caplog.text


def test_a_shared_shuffled_data_set_is_not_named_when_no_resume_can_go_wrong(tmp_path, caplog):
    """The reuse is named only for a run a resume should repeat (a run_dir, and a resume or trainer.deterministic)
    of a seeded shuffle: a teacher then a student on one data set object, without a run_dir or without
    determinism from step 0, or with an unseeded shuffle (a new order in every process anyway), says nothing."""
    def trainer(run_dir=None, deterministic=False):
        return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), progress_bar=False,
                       optimizer=lambda: keras.optimizers.SGD(1e-2), run_dir=run_dir, deterministic=deterministic)

    shared = blobs(shuffle=True)
    tf.random.set_seed(None)  # no global seed: an unseeded shuffle draws its seed in each process
    x, y = next(iter(blobs(batch=256)))
    unseeded = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(128).batch(16)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        for data, kwargs in ((shared, {}), (shared, {"run_dir": tmp_path / "a"}),
                             (unseeded, {"run_dir": tmp_path / "b", "deterministic": True})):
            trainer().fit(data, steps=1)  # the teacher
            trainer(**kwargs).fit(data, steps=1)  # the student, on the same object
    assert "iterated for training before" not in caplog.text


class LoggedNoise(Trainer):
    """tf.random.uniform (a stateful op) in the step, its draw logged."""

    def train_step(self, data):
        x, y = tf.cast(data[0], tf.float32), data[1]
        noise = tf.random.uniform(tf.shape(x))
        with tf.GradientTape() as tape:
            logits = self.model(x + noise, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        self.update(loss, tape)
        return {"loss": loss, "noise": tf.reduce_sum(noise)}


def test_a_retrace_that_restarts_stateful_random_ops_is_said(tmp_path, caplog):
    """Under trainer.deterministic a retrace (here: a layer frozen between fit() calls) makes tf.random.uniform anew,
    seeded by its place in the graph: its draws repeat those from the first trace on, within one run. Said with
    the step and the fix; the logged draws show it."""
    from conftest import read_metrics

    trainer = LoggedNoise(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8),
                                                          keras.layers.Dense(2)]),
                          optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path, seed=1, deterministic=True,
                          log_every=1, checkpoint_every=0, progress_bar=False)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit(blobs(), steps=2)
        assert "traced again" not in caplog.text
        trainer.model.layers[0].trainable = False
        trainer.fit(blobs(), steps=4)
    said = [r.getMessage() for r in caplog.records if "traced again" in r.getMessage()]
    assert len(said) == 1 and "the train step was traced again (at step 2" in said[0], said
    assert "RandomUniform" in said[0] and "Fix: draw from self.rng" in said[0]
    noise = {r["step"]: r["noise"] for r in read_metrics(tmp_path) if r["split"] == "train"}
    assert noise[3] == noise[1] and noise[4] == noise[2] and noise[1] != noise[2]  # what the warning says
