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

from omegaconf import II

from trainer.config import ConfigError, ranged
from trainer.data import DataBundle, classification_pipeline, load_mnist_format
from trainer.lazy import lazy_module

keras = lazy_module("keras")  # loaded when a run builds the models: register_configs needs none of them
np = lazy_module("numpy")
tf = lazy_module("tensorflow")


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


def __getattr__(name: str):
    """GAN, the Trainer subclass (`trainer_class: trainer.recipes.gan.GAN`), lives in recipes/_gan_trainer.py:
    defining it loads TensorFlow, which this module, imported at every CLI start, does not."""
    if name == "GAN":
        try:
            from trainer.recipes._gan_trainer import GAN
        except AttributeError as e:  # Hydra's locate would read it as "no such name" and hide the cause
            raise ImportError(f"trainer.recipes._gan_trainer failed to import: {e}") from e
        return GAN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "GAN"])
