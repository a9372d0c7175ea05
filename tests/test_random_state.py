"""Random state a resume cannot repeat is named: a tf.random.Generator of the user's, a shuffled data set object
iterated again in one process."""
import logging

import keras
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
    t = (NoisyInputs if noise else Trainer)(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), loss=None if noise else
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), optimizer=lambda: keras.optimizers.Adam(1e-2),
            run_dir=run_dir, seed=1, deterministic=True, log_every=2, checkpoint_every=2, progress_bar=False)
    t.noise = noise
    return t


def test_a_generator_of_the_users_in_the_step_is_named_with_the_fix(tmp_path, caplog):
    """trainer.deterministic: a tf.random.Generator made outside the step and held by no checkpoint (here one per
    Trainer, as a new process makes it) is named at the trace; a resume then ends with other weights."""
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
    assert straight.weights_fingerprint() != resumed.weights_fingerprint()  # what the warning says
    assert caplog.text.count("a tf.random.Generator of your own (self.noise_rng), which no checkpoint holds") == 3
    assert "Fix: draw from self.rng" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(tmp_path / "module", lambda self, shape: NOISE.normal(shape)).fit(blobs(), steps=1)
    assert f"a tf.random.Generator of your own ({__name__}.NOISE)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # self.rng is in every checkpoint: nothing said
        make(tmp_path / "rng", lambda self, shape: self.rng.normal(shape)).fit(blobs(), steps=1)
    assert "draws random numbers" not in caplog.text


def test_a_shuffled_data_set_object_iterated_again_is_named_with_the_fix(tmp_path, caplog):
    """One seeded, shuffled tf.data object reused by a second Trainer gives it the next order of the shuffle's
    sequence (tf.data keeps it in the object), so the in-process resume is not exact: said with the fix. A data
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

    shared = fresh()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        make(tmp_path / "shared").fit(shared, steps=4)
        assert "iterated for training before" not in caplog.text  # its first training iterator
        resumed = make(tmp_path / "shared")
        resumed.fit(shared, steps=8)
    assert resumed.weights_fingerprint() != straight.weights_fingerprint()  # what the warning says
    assert caplog.text.count("The training data set object was iterated for training before") == 1
    assert "this run, at step 4," in caplog.text and "Fix: build the data set again for each Trainer" in caplog.text


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
