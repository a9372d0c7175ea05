"""A GAN on Fashion-MNIST: research code with its own step, two models and two optimizers.

Run: python -m trainer recipe=gan [precision=mixed_float16]
Tiny variant for tests: trainer.max_steps=20 trainer.log_every=10 data.batch_size=64
The step is the one of Keras' "Customizing what happens in fit()" GAN, written for the Trainer: each
`self.update(...)` gets its optimizer's loss scale, the all-reduce, the finite check, clipping and the
fused update; both optimizers and loss scales are in every checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from omegaconf import II

from trainer.config import ConfigError, ranged
from trainer.trainer import Trainer
from trainer.data import DataBundle, classification_pipeline, load_mnist_format


@dataclass
class GanModelConfig:
    _target_: str = "trainer.recipes.gan.build_models"
    latent_dim: int = ranged(32, "[1, inf)")  # size of the generator's noise input
    # units per Dense layer, in both models
    hidden_units: List[int] = ranged(interval="[1, inf)", factory=lambda: [128])


@dataclass
class GanDataConfig:
    _target_: str = "trainer.recipes.gan.build_data"
    name: str = "fashion_mnist"  # mnist | fashion_mnist
    path: Optional[str] = None  # IDX files (gz or not) folder, or an mnist.npz file
    batch_size: int = ranged(128, "[1, inf)")  # global batch, split across replicas
    # the noise that comes with each image (follows model.latent_dim)
    latent_dim: int = ranged(II("model.latent_dim"), "[1, inf)")
    seed: int = ranged(II("seed"), "[0, 4294967295]")  # seeds the order and the noise (follows the run's seed)


def register_configs(cs) -> None:
    cs.store(group="model", name="base_gan", node=GanModelConfig)
    cs.store(group="data", name="base_gan", node=GanDataConfig)


def build_data(name: str = "fashion_mnist", path: Optional[str] = None, batch_size: int = 128, latent_dim: int = 32,
               seed: int = 0) -> DataBundle:
    """(image in [0, 1], noise) batches. The generator's noise comes with the data, one seeded vector per
    image, so a step sees the same noise whatever the number of replicas it is split over (a random
    generator in the step would give each replica its own stream)."""
    (x_train, _, x_test, _), where = load_mnist_format(name, path)
    rng = np.random.default_rng(seed)
    noise_train = rng.normal(size=(len(x_train), latent_dim)).astype("float32")
    noise_test = rng.normal(size=(len(x_test), latent_dim)).astype("float32")

    def scale(x, noise):
        return tf.cast(x, tf.float32) / 255.0, noise

    common = dict(global_batch_size=batch_size, seed=seed, preprocess=scale, deterministic=True)
    return DataBundle(
        train=classification_pipeline(x_train, noise_train, training=True, **common),
        eval=classification_pipeline(x_test, noise_test, training=False, **common),
        batch_size=batch_size,
        train_examples=len(x_train),
        description=f"{name} images from {where} (labels unused) with {latent_dim}-d noise: "
                    f"{len(x_train)} train / {len(x_test)} eval",
    )


def build_models(latent_dim: int = 32, hidden_units: Sequence[int] = (128,)) -> Dict[str, keras.Model]:
    """A Dense generator (noise -> 28x28 image in [0, 1]) and discriminator (image -> real/fake logit),
    both with float32 outputs (the mixed-precision rule)."""
    if latent_dim < 1 or not hidden_units or min(hidden_units) < 1:
        raise ConfigError(f"model.latent_dim={latent_dim} and model.hidden_units={list(hidden_units)} must be >= 1")
    noise = keras.Input((latent_dim,), name="noise")
    x = noise
    for units in hidden_units:
        x = keras.layers.Dense(units, activation="relu")(x)
    x = keras.layers.Dense(28 * 28, activation="sigmoid", dtype="float32")(x)
    generator = keras.Model(noise, keras.layers.Reshape((28, 28), dtype="float32")(x), name="generator")
    image = keras.Input((28, 28), name="image")
    x = keras.layers.Flatten()(image)
    for units in hidden_units:
        x = keras.layers.Dense(units)(x)
        x = keras.layers.LeakyReLU(0.2)(x)
    discriminator = keras.Model(image, keras.layers.Dense(1, dtype="float32")(x), name="discriminator")
    return {"generator": generator, "discriminator": discriminator}


class GAN(Trainer):
    """Trains `models["discriminator"]` to tell real images from generated ones, then
    `models["generator"]` to fool it: one update per optimizer per step. With trainer.batches_per_step=K,
    the discriminator is updated on each of the K batches, then the generator once (a WGAN's schedule)."""

    takes_several_batches = True  # train_step takes a tuple of trainer.batches_per_step=K batches (of one when K=1)

    def train_step(self, batches):
        generator, discriminator = self.models["generator"], self.models["discriminator"]
        # Losses as this replica's batch mean (update() sums the replicas): the function form, since a
        # Keras Loss object divides by the number of replicas itself under a distribution strategy.
        bce = lambda labels, logits: tf.reduce_mean(keras.losses.binary_crossentropy(labels, logits, from_logits=True))  # noqa: E731
        for real, noise in batches:  # images and the noise that came with them (build_data)
            with tf.GradientTape() as tape:
                fake = generator(noise, training=True)
                logits = discriminator(tf.concat([fake, real], 0), training=True)
                labels = tf.concat([tf.zeros_like(logits[: tf.shape(real)[0]]),
                                    tf.ones_like(logits[: tf.shape(real)[0]])], 0)
                d_loss = bce(labels, logits)
            self.update(d_loss, tape, "discriminator")
        with tf.GradientTape() as tape:
            fooled = discriminator(generator(noise, training=True), training=True)  # the last batch's noise
            g_loss = bce(tf.ones_like(fooled), fooled)  # "these are real"
        self.update(g_loss, tape, "generator")
        return {"d_loss": d_loss, "g_loss": g_loss}

    def test_step(self, data):
        """How well the discriminator tells held-out real images from fakes."""
        real, noise = data
        generator, discriminator = self.models["generator"], self.models["discriminator"]
        real_logits = discriminator(real, training=False)
        fake_logits = discriminator(generator(noise, training=False), training=False)
        correct = tf.concat([tf.cast(real_logits > 0, tf.float32), tf.cast(fake_logits <= 0, tf.float32)], 0)
        return {"d_accuracy": tf.reduce_mean(correct)}
