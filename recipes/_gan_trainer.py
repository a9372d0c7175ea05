"""The GAN recipe's Trainer subclass: the step of Keras' "Customizing what happens in fit()" GAN, written for
the Trainer (recipes/gan.py has the rest of the recipe and names this class `trainer.recipes.gan.GAN`).

A module of its own because a class statement needs its base: Trainer loads TensorFlow, and recipes/gan.py
is imported at every CLI start (its config schemas), a config error included. Modules of trainer.recipes
whose name starts with `_` are not recipes: assemble.register_configs skips them.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from trainer.trainer import Trainer

__all__ = ["GAN"]


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
