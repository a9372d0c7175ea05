"""MNIST-format classification: the mixed-precision guide's MLP, or a small convnet.

Run: python -m trainer recipe=mnist                      (Fashion-MNIST, offline on Debian)
     python -m trainer recipe=mnist model=mnist_cnn data.name=mnist data.path=/path/to/mnist.npz
Tiny variant for tests: trainer.max_steps=30 trainer.log_every=10 data.batch_size=64
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, List, Optional, Sequence

from omegaconf import II

from trainer.config import Checked, ConfigError, DataOptions, chosen, ranged, written
from trainer.data import DataBundle, DataError, check_labels, classification_pipeline, load_mnist_format
from trainer.lazy import lazy_module

keras = lazy_module("keras")  # loaded when a run builds the model: register_configs needs neither
tf = lazy_module("tensorflow")
log = logging.getLogger(__name__)


@dataclass
class MnistDataConfig(DataOptions):
    _target_: str = "trainer.recipes.mnist.build_data"
    name: str = chosen("fashion_mnist", "mnist|fashion_mnist")  # mnist | fashion_mnist
    path: Optional[str] = None  # IDX files (gz or not) folder, or an mnist.npz file
    batch_size: int = ranged(128, "[1, inf)")  # global batch, split across replicas
    seed: int = ranged(II("seed"), "[0, 4294967295]")  # shuffling seed (follows the run's seed)
    deterministic: bool = II("trainer.deterministic")  # follows trainer.deterministic (the order is seeded either way)
    # labels must lie in 0..num_classes-1 (follows model.num_classes)
    num_classes: Optional[int] = ranged(II("model.num_classes"), "[2, inf)")


@dataclass
class MnistModelConfig(Checked):
    config_key: ClassVar[str] = "model"

    _target_: str = "trainer.recipes.mnist.build_model"
    kind: str = chosen("mlp", "mlp|cnn")  # mlp | cnn
    # Dense ReLU layers before the logits
    hidden_units: List[int] = ranged(interval="[1, inf)", factory=lambda: [256, 256])
    filters: List[int] = ranged(interval="[1, inf)", factory=lambda: [32, 64])  # cnn: 3x3 conv + 2x2 max-pool stages
    dropout: float = ranged(0.1, "[0, 1)")  # after each hidden Dense layer; 0: none
    num_classes: int = ranged(10, "[2, inf)")  # size of the float32 logits layer

    @staticmethod
    def check_combined(values, prefix: str, python=None) -> None:
        def fix(name, value):
            return written(f"{prefix}.{name}", value, (python or {}).get(name, ""), cli=not python)

        if values.get("kind") == "cnn" and values.get("filters") == []:
            raise ConfigError(f"{prefix}.filters=[] leaves the cnn without a convolution (an MLP under another name). "
                              f"Fix: give it conv stages, e.g. {fix('filters', [32, 64])}, or pick "
                              f"{fix('kind', 'mlp')}.")


def register_configs(cs) -> None:
    cs.store(group="data", name="base_mnist", node=MnistDataConfig)
    cs.store(group="model", name="base_mnist", node=MnistModelConfig)


def build_data(
    name: str = "fashion_mnist",
    path: Optional[str] = None,
    batch_size: int = 128,
    seed: int = 0,
    deterministic: bool = False,
    num_classes: Optional[int] = None,
) -> DataBundle:
    """Real MNIST-format data as (28, 28) float images in [0, 1] with int labels (checked against
    `num_classes` when given: the model's outputs)."""
    (x_train, y_train, x_test, y_test), where = load_mnist_format(name, path)
    if num_classes is not None:
        check_labels(y_train, num_classes, f"{where} (y_train)")
        check_labels(y_test, num_classes, f"{where} (y_test)")

    def scale(x, y):
        return to_model_input(x), tf.cast(y, tf.int32)

    common = dict(global_batch_size=batch_size, seed=seed, preprocess=scale, deterministic=True)
    return DataBundle(
        train=classification_pipeline(x_train, y_train, training=True, **common),
        eval=classification_pipeline(x_test, y_test, training=False, **common),
        batch_size=batch_size,
        train_examples=len(y_train),
        description=f"{name} from {where}: {len(y_train)} train / {len(y_test)} eval images, 10 classes",
    )


def to_model_input(images) -> tf.Tensor:
    """uint8 28x28 grey images (0-255) -> what the model reads: float32 in [0, 1]."""
    return tf.cast(images, tf.float32) / 255.0


def predict_inputs(paths: Sequence[Path], data_cfg, batch_size: int):
    """(names, batches) for trainer.predict: PNG/JPEG files (read as grey, resized to 28x28 if they are
    not) or .npy arrays of 28x28 images (uint8 0-255, or floats already in [0, 1], one image or a stack).
    The batches are read one at a time as trainer.predict consumes them (a folder larger than memory
    works); the .npy shapes are checked first, from their headers."""
    import numpy as np

    from trainer.inference import in_batches

    names = []
    for path in paths:
        if path.suffix == ".npy":
            count = len(_npy_images(path))
            names.extend([f"{path.name}[{i}]" for i in range(count)] if count > 1 else [path.name])
        else:
            names.append(path.name)

    def examples():
        for path in paths:
            if path.suffix == ".npy":
                array = _npy_images(path)
                for start in range(0, len(array), batch_size):  # a chunk of the mapped file at a time
                    chunk = np.asarray(array[start:start + batch_size])
                    yield from (chunk.astype("float32") if chunk.dtype.kind == "f" else to_model_input(chunk).numpy())
            else:
                image = tf.io.decode_image(tf.io.read_file(str(path)), channels=1, expand_animations=False)
                if image.shape[:2] != (28, 28):
                    image = tf.cast(tf.round(tf.image.resize(image, [28, 28])), tf.uint8)
                yield to_model_input(image[..., 0]).numpy()

    return names, in_batches(examples(), batch_size)


def _npy_images(path: Path):
    """The images of a .npy file, memory-mapped (read when used): N x 28 x 28."""
    import numpy as np

    array = np.load(path, mmap_mode="r", allow_pickle=False)
    array = array[None] if array.ndim == 2 else array
    if array.shape[1:] != (28, 28):
        raise DataError(f"{path}: images of shape {array.shape[1:]}, expected 28x28 (one image or N x 28 x 28)")
    return array


def class_names(data_cfg) -> Optional[List[str]]:
    """Fashion-MNIST's article names; MNIST's digits."""
    from trainer.recipes.images import FASHION_MNIST_CLASSES

    return list(FASHION_MNIST_CLASSES) if data_cfg.get("name") == "fashion_mnist" else [str(d) for d in range(10)]


def build_model(
    kind: str = "mlp",
    hidden_units: Sequence[int] = (256, 256),
    filters: Sequence[int] = (32, 64),
    dropout: float = 0.1,
    num_classes: int = 10,
) -> keras.Model:
    """An MLP or a small convnet that outputs float32 logits (the last layer is forced to float32)."""
    inputs = keras.Input((28, 28), name="image")
    if kind == "mlp":
        x = keras.layers.Flatten()(inputs)
    elif kind == "cnn":
        x = keras.layers.Reshape((28, 28, 1))(inputs)
        for f in filters:
            x = keras.layers.Conv2D(f, 3, padding="same", activation="relu")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.Flatten()(x)
    else:
        raise ConfigError(f"model.kind={kind!r} is not one of ['mlp', 'cnn']")
    for units in hidden_units:
        x = keras.layers.Dense(units, activation="relu")(x)
        if dropout:
            x = keras.layers.Dropout(dropout)(x)
    # The guide's rule: the model's outputs stay float32 under a mixed policy.
    outputs = keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
    return keras.Model(inputs, outputs, name=f"mnist_{kind}")
