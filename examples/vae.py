"""The VAE of Keras' examples on the Trainer: unlabelled data, a step of its own, and its loss terms logged
(metrics.jsonl, TensorBoard, the progress bar) from the dict the step returns.

Run: python examples/vae.py [--steps N] [--run-dir DIR] [--precision mixed_bfloat16]
"""
import argparse

from trainer import Trainer  # first: it quiets TensorFlow's start-up logs
from trainer.data import load_mnist_format

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=1000)
parser.add_argument("--run-dir", default=None)
parser.add_argument("--precision", default="float32")
args = parser.parse_args()
LATENT = 2


class VAE(keras.Model):
    """Encoder (image -> mean, log-variance of z) and decoder (z -> image), as in the Keras example."""

    def __init__(self):
        super().__init__()
        self.encoder = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(256, activation="relu"),
                                         keras.layers.Dense(2 * LATENT, dtype="float32")])
        self.decoder = keras.Sequential([keras.layers.Dense(256, activation="relu"),
                                         keras.layers.Dense(28 * 28, activation="sigmoid", dtype="float32"),
                                         keras.layers.Reshape((28, 28), dtype="float32")])

    def call(self, images, training=False):
        z_mean, _ = tf.split(self.encoder(images, training=training), 2, axis=-1)
        return self.decoder(z_mean, training=training)


class VAETrainer(Trainer):
    def train_step(self, images):  # unlabelled batches: just images
        vae = self.model
        with tf.GradientTape() as tape:
            z_mean, z_log_var = tf.split(vae.encoder(images, training=True), 2, axis=-1)
            z = z_mean + tf.exp(0.5 * z_log_var) * self.rng.normal(tf.shape(z_mean))
            reconstruction = vae.decoder(z, training=True)
            reconstruction_loss = tf.reduce_mean(tf.reduce_sum(
                keras.losses.binary_crossentropy(images[..., None], reconstruction[..., None]), axis=(1, 2)))
            kl_loss = tf.reduce_mean(tf.reduce_sum(-0.5 * (1 + z_log_var - z_mean**2 - tf.exp(z_log_var)), axis=-1))
            loss = reconstruction_loss + kl_loss
        self.update(loss, tape)
        return {"loss": loss, "reconstruction_loss": reconstruction_loss, "kl_loss": kl_loss}


(x_train, _, _, _), where = load_mnist_format("fashion_mnist")  # real data, offline; labels unused
images = tf.data.Dataset.from_tensor_slices(x_train).shuffle(60000, seed=0).batch(128, drop_remainder=True)
images = images.map(lambda x: tf.cast(x, tf.float32) / 255.0)
trainer = VAETrainer(model=VAE, loss=None, optimizer=lambda: keras.optimizers.Adam(1e-3), precision=args.precision,
                     run_dir=args.run_dir, log_every=max(args.steps // 10, 1), progress_bar=False)
logs = trainer.fit(images, steps=args.steps)
print(f"step {logs['step']}: loss {logs['loss']:.2f} = reconstruction {logs['reconstruction_loss']:.2f} "
      f"+ KL {logs['kl_loss']:.2f} on {where}")
