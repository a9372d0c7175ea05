"""trainer.batches_per_step=K: a WGAN-like step gets K fresh batches and updates its critic once per batch."""
import json
import logging
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN, run_cli
from trainer import Trainer
from trainer.config import ConfigError

K, BATCH, EXAMPLES = 3, 4, 240  # 60 batches of distinct integers: an epoch is 20 steps of 3 batches


def integers():
    """Batches of (BATCH, 1): the integers 0..EXAMPLES-1 in order, so each batch's first value names it."""
    return tf.data.Dataset.range(EXAMPLES).map(lambda i: tf.cast(i, tf.float32)[None]).batch(BATCH, drop_remainder=True)


class WGAN(Trainer):
    """K critic updates (one per batch) and one generator update per step; records each batch's first value
    and returns the gradient norm each critic update must have: |mean(fake) - mean(real)| for a linear critic."""

    takes_several_batches = True

    def __init__(self, *args, record=64, **kwargs):
        super().__init__(*args, **kwargs)
        with self.strategy.scope():
            self.seen = tf.Variable(tf.fill([record * K], tf.constant(-1, tf.int64)), trainable=False)

    def train_step(self, batches):
        critic, generator = self.models["critic"], self.models["generator"]
        norms = []  # batches: a tuple, also of one (batches_per_step=1)
        for j, real in enumerate(batches):
            real = real / EXAMPLES
            if self.strategy.num_replicas_in_sync == 1:
                index = self.step * len(batches) + j
                self.seen.assign(tf.tensor_scatter_nd_update(self.seen, [[index]],
                                                             [tf.cast(real[0, 0] * EXAMPLES, tf.int64)]))
            with tf.GradientTape() as tape:
                fake = generator(1.0 - real, training=True)
                d_loss = tf.reduce_mean(critic(fake, training=True)) - tf.reduce_mean(critic(real, training=True))
            norms.append(tf.abs(tf.reduce_mean(fake) - tf.reduce_mean(real)))
            self.update(d_loss, tape, "critic")
        with tf.GradientTape() as tape:
            g_loss = -tf.reduce_mean(critic(generator(1.0 - batches[-1] / EXAMPLES, training=True), training=True))
        self.update(g_loss, tape, "generator")
        return {"d_loss": d_loss, "expected_critic_grad_norm": tf.add_n(norms) / len(norms)}

    def test_step(self, x):  # evaluation is unchanged: one batch
        return {"critic_mean": tf.reduce_mean(self.models["critic"](x / EXAMPLES, training=False))}


def linear():
    return keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])


def wgan(**options):
    schedule = keras.optimizers.schedules.InverseTimeDecay(1e-2, decay_steps=1, decay_rate=0.1)
    optimizers = {"critic": lambda: keras.optimizers.SGD(schedule), "generator": lambda: keras.optimizers.SGD(1e-2)}
    return WGAN(models={"critic": linear, "generator": linear},
                **{"optimizers": optimizers, "batches_per_step": K, "progress_bar": False, **options})


def firsts(trainer, steps, start=0):
    return [int(v) for v in trainer.seen.numpy()[start * K:steps * K]]


def test_each_critic_update_gets_a_fresh_batch_and_counts_as_an_update(tmp_path):
    """10 steps: the critic updated 30 times (iterations, its lr schedule), the generator 10; the step saw the
    batches 0..29 in order; the logged critic grad_norm is the mean over its 30 updates."""
    trainer = wgan(log_every=10)
    logs = trainer.fit(integers(), steps=10)
    assert int(trainer.optimizers["critic"].iterations.numpy()) == 3 * 10
    assert int(trainer.optimizers["generator"].iterations.numpy()) == 10
    assert firsts(trainer, 10) == [BATCH * b for b in range(30)]
    np.testing.assert_allclose(logs["critic/lr"], 1e-2 / (1 + 0.1 * 30), rtol=1e-6)  # the schedule at 30 updates
    np.testing.assert_allclose(logs["critic/grad_norm"], logs["expected_critic_grad_norm"], rtol=1e-5)
    assert logs["critic/skipped_steps"] == 0


def test_a_skipped_critic_update_counts_one_skip_and_one_iteration():
    """A NaN in the second batch of step 1: that one critic update is skipped (skipped_steps counts updates),
    the other 29 and the generator's 10 are applied; iterations count the skipped one too."""
    nan_in_batch_1 = integers().map(lambda x: tf.where(x == BATCH, float("nan"), x))
    trainer = wgan(log_every=10)
    logs = trainer.fit(nan_in_batch_1, steps=10)
    assert (logs["critic/skipped_steps"], logs["generator/skipped_steps"]) == (1, 0)
    assert int(trainer.optimizers["critic"].iterations.numpy()) == 30
    assert all(np.isfinite(w.numpy()).all() for m in trainer.models.values() for w in m.weights)


def test_an_epoch_is_one_pass_over_the_data():
    """trainer.epochs=1 with 60 batches and K=3: 20 steps that read every batch once."""
    trainer = wgan()
    logs = trainer.fit(integers(), epochs=1)
    assert logs["step"] == 20
    assert firsts(trainer, 20) == [BATCH * b for b in range(60)]


def test_the_batches_an_epoch_leaves_over_start_the_next():
    """60 batches, 7 per step: an epoch is 8 steps (56 batches); epochs=2 reads the 4 left over, then goes on."""
    trainer = wgan(batches_per_step=7)
    assert trainer.fit(integers(), epochs=2)["step"] == 16
    assert [int(v) for v in trainer.seen.numpy()[:16 * 7]] == [BATCH * (b % 60) for b in range(16 * 7)]


def test_resume_goes_on_at_the_same_batches_and_ends_with_the_same_weights(tmp_path, caplog):
    """8 steps straight (steps_per_loop=4, evaluated) == 4 steps, then a new Trainer resuming to 8
    (steps_per_loop=1)."""
    straight = wgan(run_dir=tmp_path / "straight", steps_per_loop=4, log_every=4)
    eval_logs = straight.fit(integers(), integers(), steps=8)  # the eval step gets one batch at a time
    assert straight.eval_batches == EXAMPLES // BATCH and np.isfinite(eval_logs["critic_mean"])
    wgan(run_dir=tmp_path / "resumed", checkpoint_every=4).fit(integers(), steps=4)
    resumed = wgan(run_dir=tmp_path / "resumed", checkpoint_every=4)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        resumed.fit(integers(), steps=8)
    assert "batches per step" not in caplog.text
    assert firsts(resumed, 8, start=4) == firsts(straight, 8, start=4) == [BATCH * b for b in range(12, 24)]
    assert int(resumed.optimizers["critic"].iterations.numpy()) == 24
    assert resumed.weights_fingerprint() == straight.weights_fingerprint()


def test_a_resume_with_other_batches_per_step_goes_on_where_the_data_was(tmp_path):
    """4 steps of 2 batches, then resumed to 8 steps of 3: the resumed steps read batches 8.. (not 12..), as
    the record of the data position (written at every save) says; resumed again with 1 batch per step too."""
    wgan(run_dir=tmp_path, batches_per_step=2, checkpoint_every=4).fit(integers(), steps=4)
    resumed = wgan(run_dir=tmp_path, checkpoint_every=4)
    resumed.fit(integers(), steps=8)
    assert firsts(resumed, 8, start=4) == [BATCH * b for b in range(8, 20)]
    record = json.loads((tmp_path / "checkpoints" / "configured.json").read_text())
    assert (record["step"], record["batches_read"], record["batches_read_per_step"]) == (8, 20, 3)
    again = wgan(run_dir=tmp_path, batches_per_step=1)
    again.fit(integers(), steps=10)
    assert [int(v) for v in again.seen.numpy()[8:10]] == [BATCH * 20, BATCH * 21]


def test_a_run_folder_without_the_record_resumes_at_step_times_batches_per_step(tmp_path):
    wgan(run_dir=tmp_path, checkpoint_every=4).fit(integers(), steps=4)
    (tmp_path / "checkpoints" / "configured.json").unlink()  # a run from before the record
    resumed = wgan(run_dir=tmp_path)
    resumed.fit(integers(), steps=6)
    assert firsts(resumed, 6, start=4) == [BATCH * b for b in range(12, 18)]


def test_with_xla_the_whole_step_is_compiled_and_gives_the_same_weights():
    plain, compiled = wgan(jit_compile=False), wgan(jit_compile=True)
    for trainer in (plain, compiled):
        trainer.fit(integers(), steps=6)
    assert compiled.plan_xla().whole_step
    assert firsts(compiled, 6) == firsts(plain, 6) == [BATCH * b for b in range(18)]
    for a, b in zip(plain.models["critic"].weights + plain.models["generator"].weights,
                    compiled.models["critic"].weights + compiled.models["generator"].weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)


MIRRORED = """
import sys
import numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, sys.argv[1])
from test_several_batches import integers, wgan
one = wgan()
one.fit(integers(), steps=6)
two = wgan(strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
two.fit(integers(), steps=6)
print("ITERATIONS", int(two.optimizers["critic"].iterations.numpy()),
      int(two.optimizers["generator"].iterations.numpy()))
for a, b in zip(one.models["critic"].weights + one.models["generator"].weights,
                two.models["critic"].weights + two.models["generator"].weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
print("SAME WEIGHTS")
import keras
try:  # made outside the scope: its iterations would count once per replica (2 per update)
    wgan(strategy=two.strategy,
         optimizers={"critic": keras.optimizers.SGD(0.1), "generator": lambda: keras.optimizers.SGD(0.1)})
except Exception as e:
    print("ERROR", type(e).__name__, e)
outside = keras.optimizers.SGD(0.1)
with two.strategy.scope():  # the Trainer's strategy is the scope's, without strategy=
    try:
        wgan(optimizers={"critic": outside, "generator": lambda: keras.optimizers.SGD(0.1)})
    except Exception as e:
        print("IMPLICIT", type(e).__name__, e)
"""


@pytest.mark.slow
def test_two_replicas_equal_one_device(tmp_path):
    """2 logical CPUs: each replica gets its half of each of the K batches; the weights equal one device's. A
    ready-made optimizer made outside the strategy's scope is refused (its iterations would count per replica)."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ITERATIONS 18 6" in result.stdout and "SAME WEIGHTS" in result.stdout
    assert "ERROR StrategyError Optimizer 'critic' was made outside the strategy's scope" in result.stdout
    assert "IMPLICIT StrategyError Optimizer 'critic' was made outside the strategy's scope" in result.stdout


@pytest.mark.parametrize("strategy", ["one_device", "default"])
def test_a_ready_made_optimizer_on_one_replica_is_fine(strategy):
    """One replica counts each update once: an optimizer made outside the strategy's scope trains as before."""
    ready = {"critic": keras.optimizers.SGD(0.1), "generator": keras.optimizers.SGD(0.1)}
    chosen = tf.distribute.OneDeviceStrategy("/cpu:0") if strategy == "one_device" else None
    trainer = wgan(strategy=chosen, optimizers=ready)
    trainer.fit(integers(), steps=2)
    assert [int(o.iterations.numpy()) for o in (ready["critic"], ready["generator"])] == [2 * K, 2]


def test_bad_settings_are_user_errors(tmp_path):
    for value in (0, 2.5, "3", True):
        with pytest.raises(ConfigError, match="batches_per_step"):
            wgan(batches_per_step=value)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        Trainer(model=linear, loss="mse", optimizer=keras.optimizers.SGD, batches_per_step=2, grad_accum_steps=2)
    built = []  # said at Trainer(), before any model is built
    with pytest.raises(ConfigError, match="the default train_step trains on one"):
        Trainer(model=lambda: built.append(1) or linear(), loss="mse", optimizer=keras.optimizers.SGD,
                batches_per_step=2)
    assert not built

    class OneBatch(WGAN):  # a step written for one batch would mis-unpack the tuple: it must say it takes several
        takes_several_batches = False
    with pytest.raises(ConfigError,
                       match="OneBatch.train_step does not say it takes them.*takes_several_batches = True"):
        OneBatch(models={"critic": linear, "generator": linear}, optimizers={"critic": keras.optimizers.SGD,
                 "generator": keras.optimizers.SGD}, batches_per_step=2)
    with pytest.raises(ConfigError, match="overfit_batches=4 .* a multiple of 3"):
        wgan(overfit_batches=4)
    assert wgan(overfit_batches=6).fit(integers(), steps=4)["step"] == 4
    for value in ("0", "1.5"):
        result = run_cli("trainer.max_steps=1", f"trainer.batches_per_step={value}",
                         f"hydra.run.dir={tmp_path / value}")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "batches_per_step" in result.stdout + result.stderr and "Traceback" not in result.stderr
    result = run_cli("trainer.max_steps=1", "trainer.batches_per_step=2", f"hydra.run.dir={tmp_path / 'default'}")
    assert result.returncode == 2 and "the default train_step trains on one" in result.stdout + result.stderr
    assert "Data:" not in result.stdout + result.stderr  # before the data is loaded


@pytest.mark.parametrize("k", [1, 2])
def test_the_gan_recipe_updates_its_discriminator_on_each_batch(tmp_path, k):
    """recipe=gan trainer.batches_per_step=K from the CLI: 4 steps are 4K discriminator and 4 generator updates
    (K=1: its step gets a tuple of one batch)."""
    result = run_cli("recipe=gan", "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_steps=1",
                     "trainer.progress_bar=false", "data.batch_size=16", f"trainer.batches_per_step={k}",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    reader = tf.train.load_checkpoint(str(tmp_path / "checkpoints" / "ckpt-4"))
    iterations = {k.split("/")[1]: int(reader.get_tensor(k)) for k in reader.get_variable_to_shape_map()
                  if k.startswith("optimizers/") and "iterations" in k}
    assert iterations == {"discriminator": 4 * k, "generator": 4}


@pytest.mark.slow
def test_out_of_memory_with_several_batches_names_batches_per_step(tmp_path):
    """The out-of-memory hint says that a step holds its K batches at once (the allocation fails at once)."""
    result = run_cli("recipe=gan", "trainer.max_steps=1", "trainer.batches_per_step=2",
                     "model.hidden_units=[1000000000]", "trainer.progress_bar=false", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Fix: lower data.batch_size or trainer.batches_per_step=2 (a step holds its 2 batches at once)" in output


class Unpacks(Trainer):
    """A step that unpacks its batches in a Python loop (`for real in batches:`), recording what it was given."""

    takes_several_batches = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given = []  # at trace time: the step input's length if a tuple, else None

    def train_step(self, batches):
        self.given.append(len(batches) if isinstance(batches, tuple) else None)
        for real in batches:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self.model(real / EXAMPLES, training=True) - 1.0))
            self.update(loss, tape)
        return {"loss": loss}


class OneBatch(Unpacks):
    takes_several_batches = False

    def train_step(self, batch):
        self.given.append(len(batch) if isinstance(batch, tuple) else None)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(self.model(batch / EXAMPLES, training=True) - 1.0))
        self.update(loss, tape)
        return {"loss": loss}


def test_a_step_that_takes_several_batches_gets_a_tuple_also_with_one_per_step():
    """batches_per_step=1 (the default): the opt-in class gets a 1-tuple and trains one update per step; a class
    without the opt-in still gets the batch itself."""
    for cls, given in ((Unpacks, 1), (OneBatch, None)):
        trainer = cls(model=linear, optimizer=lambda: keras.optimizers.SGD(1e-2), progress_bar=False)
        kernel = trainer.model.get_weights()[0].copy()
        trainer.fit(integers(), steps=5)
        assert int(trainer.optimizers["model"].iterations.numpy()) == 5
        assert not np.array_equal(trainer.model.get_weights()[0], kernel)
        assert trainer.given and set(trainer.given) == {given}, (cls.__name__, trainer.given)
