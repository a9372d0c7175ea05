"""Image classification data for the ResNet recipe: five sources, one input pipeline.

Sources (the `data=` group):
  fashion_mnist  real Fashion-MNIST (offline here), 28x28 grey resized to a small RGB size; class subsets
  image_folder   one sub-folder per class of JPEG/PNG/BMP/GIF files (the ImageNet "train/<wnid>/" layout)
  tfrecord       ImageNet-style TFRecords: `image/encoded` (JPEG/PNG bytes), `image/class/label` (int64)
  tfds           any TensorFlow Datasets image data set already prepared in a local data_dir (optional dep)
  synthetic      random pixels and labels: for throughput benchmarks only, and labelled so everywhere

Every source yields small records (a path, a serialized example, an in-memory image) that the shared
pipeline shards, optionally caches, shuffles (seeded), repeats, and only then decodes and augments in
parallel. Augmentation is *stateless*: each example's random crop and flip come from a seed derived
from (data.seed, input pipeline, position in the stream), so the stream is the same in every run and the
trainer can resume it by skipping batches. Training images come out as float32 HxWx3 already put
through the model's ImageNet preprocessing (`data.preprocessing`, by default `${model.preprocessing}`).

The pipeline and its per-example transforms are in recipes/_image_pipeline.py, the sources that read files
(image_folder, tfrecord, tfds) in recipes/_image_files.py. Every builder is named here: conf/data/*.yaml's
`_target_` is `trainer.recipes.images.<source>`, and trainer.predict finds `predict_inputs` and `class_names`
in the module of that `_target_`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import II, MISSING

from trainer.config import DataOptions, ranged
from trainer.data import DataBundle, DataError, load_mnist_format, per_replica_batch_size
from trainer.lazy import lazy_module
from trainer.recipes._image_files import image_folder, index_image_folder, tfds, tfrecord
from trainer.recipes._image_pipeline import as_pair, bundle, image_pipeline, image_transform, shard

np = lazy_module("numpy")  # loaded when data is built: register_configs needs neither
tf = lazy_module("tensorflow")
log = logging.getLogger(__name__)

# The data= options' builders (the `_target_`s of conf/data/): those that read files come from _image_files.py.
__all__ = ["FASHION_MNIST_CLASSES", "class_names", "fashion_mnist", "image_folder", "predict_inputs",
           "register_configs", "synthetic", "tfds", "tfrecord"]


# ---------------------------------------------------------------------------------------------
# Config schemas (one per data= option; conf/data/<name>.yaml extends them)
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageDataConfig(DataOptions):
    """Options every image source shares."""

    image_size: int = ranged(224, "[1, inf)")  # square side the model sees
    num_classes: int = ranged(MISSING, "[2, inf)")  # classes in the data (the model's output size follows it)
    batch_size: int = ranged(128, "[1, inf)")  # global batch, split across replicas
    augment: str = "resized_crop"  # none | flip | pad_crop (small images) | resized_crop (ImageNet style)
    eval_crop: float = ranged(0.875, "(0, 1]")  # eval: central crop fraction before resizing (ImageNet: 224/256)
    preprocessing: str = II("model.preprocessing")  # caffe | tf | torch | none; must match the weights
    cache: bool = False  # keep the raw (encoded) examples in memory after the first epoch
    shuffle_buffer: Optional[int] = ranged(None, "[1, inf)")  # None: the whole shard (file paths / in-memory images)
    deterministic: bool = True  # ordered tf.data outputs: exact resume; false is faster, resume approximate
    seed: int = ranged(II("seed"), "[0, 4294967295]")  # shuffling and augmentation seed (follows the run's seed)


@dataclass
class FashionMnistImagesConfig(ImageDataConfig):
    _target_: str = "trainer.recipes.images.fashion_mnist"
    path: Optional[str] = None  # IDX folder or .npz; default: Debian's dataset-fashion-mnist, Keras cache
    image_size: int = ranged(32, "[1, inf)")
    num_classes: int = ranged(10, "[2, inf)")
    classes: Optional[List[int]] = ranged(None, "[0, inf)")  # keep only these classes, relabelled 0..k-1 in this order
    train_limit: Optional[int] = ranged(None, "[1, inf)")  # use only the first N training images (after `classes`)
    augment: str = "pad_crop"
    eval_crop: float = ranged(1.0, "(0, 1]")


@dataclass
class ImageFolderConfig(ImageDataConfig):
    _target_: str = "trainer.recipes.images.image_folder"
    train_dir: str = MISSING  # <train_dir>/<class name>/<image files>
    eval_dir: Optional[str] = None  # same layout and class names; None: hold out validation_split
    validation_split: float = ranged(0.0, "[0, 1)")  # fraction of each class held out for eval when eval_dir is unset


@dataclass
class TFRecordConfig(ImageDataConfig):
    _target_: str = "trainer.recipes.images.tfrecord"
    train_files: str = MISSING  # glob, e.g. /data/imagenet/train-*
    eval_files: Optional[str] = None  # glob, e.g. /data/imagenet/validation-*
    image_key: str = "image/encoded"  # tf.train.Example feature holding the encoded image
    label_key: str = "image/class/label"  # tf.train.Example feature holding the integer label
    label_offset: int = 0  # added to stored labels; -1 for TF-slim/Inception ImageNet files (labels 1..1000)
    # records in the training files (needed for trainer.epochs)
    train_examples: Optional[int] = ranged(None, "[1, inf)")
    shuffle_buffer: Optional[int] = ranged(10000, "[1, inf)")
    cycle_length: int = ranged(16, "[1, inf)")  # files read in parallel


@dataclass
class TFDSConfig(ImageDataConfig):
    _target_: str = "trainer.recipes.images.tfds"
    name: str = MISSING  # e.g. imagenette/320px-v2, cifar10, oxford_flowers102
    data_dir: Optional[str] = None  # default: ~/tensorflow_datasets
    train_split: str = "train"  # TFDS split to train on
    eval_split: Optional[str] = "test"  # TFDS split to evaluate on; None: no evaluation data
    download: bool = False  # true: download_and_prepare when not prepared (needs the internet)
    shuffle_buffer: Optional[int] = ranged(10000, "[1, inf)")


@dataclass
class SyntheticImagesConfig(DataOptions):
    """Random pixels and labels, one batch repeated: step-time benchmarks only, nothing can be learned."""

    _target_: str = "trainer.recipes.images.synthetic"
    image_size: int = ranged(224, "[1, inf)")  # square side of the random images
    num_classes: int = ranged(1000, "[2, inf)")  # labels are drawn from 0..num_classes-1
    batch_size: int = ranged(128, "[1, inf)")  # global batch, split across replicas
    eval_batches: int = ranged(4, "[1, inf)")  # batches in one evaluation
    seed: int = ranged(II("seed"), "[0, 4294967295]")  # seed of the random batch (follows the run's seed)


def register_configs(cs) -> None:
    cs.store(group="data", name="base_images_fashion_mnist", node=FashionMnistImagesConfig)
    cs.store(group="data", name="base_images_folder", node=ImageFolderConfig)
    cs.store(group="data", name="base_images_tfrecord", node=TFRecordConfig)
    cs.store(group="data", name="base_images_tfds", node=TFDSConfig)
    cs.store(group="data", name="base_images_synthetic", node=SyntheticImagesConfig)


def predict_inputs(paths: Sequence[Path], data_cfg, batch_size: int):
    """(names, batches) for trainer.predict: image files through the eval transform of training
    (decode to RGB, central crop by data.eval_crop, resize to data.image_size, data.preprocessing),
    decoded one batch at a time as trainer.predict consumes them (a folder larger than memory works)."""
    from trainer.inference import in_batches

    transform = image_transform(data_cfg["image_size"], "none", data_cfg.get("eval_crop", 1.0),
                                data_cfg.get("preprocessing", "none"))
    images = (transform.eval(tf.io.read_file(str(p))).numpy() for p in paths)
    return [p.name for p in paths], in_batches(images, batch_size)


def class_names(data_cfg) -> Optional[List[str]]:
    """The class names the data source knows (Fashion-MNIST's articles, an image folder's sub-folders)."""
    target = str(data_cfg.get("_target_", ""))
    if target.endswith(".fashion_mnist"):
        classes = data_cfg.get("classes")
        return [FASHION_MNIST_CLASSES[c] for c in (classes if classes is not None else range(10))]
    if target.endswith(".image_folder") and data_cfg.get("train_dir"):
        return index_image_folder(data_cfg["train_dir"])[0]
    return None


# ---------------------------------------------------------------------------------------------
# fashion_mnist: real images available offline
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _select_classes(x, y, classes: Optional[Sequence[int]]):
    """Keeps `classes` and relabels them 0..k-1 in the order given."""
    if classes is None:
        return x, y
    classes = [int(c) for c in classes]
    if len(set(classes)) != len(classes) or not all(0 <= c < 10 for c in classes):
        raise DataError(f"data.classes={classes} must be distinct Fashion-MNIST labels in 0..9")
    relabel = np.full(10, -1, np.int64)
    relabel[classes] = np.arange(len(classes))
    keep = relabel[y] >= 0
    return x[keep], relabel[y[keep]]


def _resize_uint8(images: np.ndarray, size: int, chunk: int = 10000) -> np.ndarray:
    """(N, H, W) uint8 -> (N, size, size, 1) uint8, once, so the per-step pipeline only crops and flips."""
    images = images[..., None]
    if images.shape[1] == size and images.shape[2] == size:
        return images
    out = [
        tf.cast(tf.round(tf.image.resize(images[i : i + chunk], [size, size])), tf.uint8).numpy()
        for i in range(0, len(images), chunk)
    ]
    return np.concatenate(out) if out else np.zeros((0, size, size, 1), np.uint8)


def fashion_mnist(
    path: Optional[str] = None,
    image_size: int = 32,
    num_classes: int = 10,
    classes: Optional[Sequence[int]] = None,
    train_limit: Optional[int] = None,
    batch_size: int = 128,
    augment: str = "pad_crop",
    eval_crop: float = 1.0,
    preprocessing: str = "tf",
    cache: bool = False,
    shuffle_buffer: Optional[int] = None,
    deterministic: bool = True,
    seed: int = 0,
) -> DataBundle:
    """Real Fashion-MNIST as small RGB images (grey copied to 3 channels), optionally a class subset."""
    (x_train, y_train, x_test, y_test), where = load_mnist_format("fashion_mnist", path)
    x_train, y_train = _select_classes(x_train, y_train.astype(np.int64), classes)
    x_test, y_test = _select_classes(x_test, y_test.astype(np.int64), classes)
    wanted = len(classes) if classes is not None else 10
    if num_classes != wanted:
        raise DataError(f"data.num_classes={num_classes} but the data has {wanted} classes: set "
                        f"data.num_classes={wanted}")
    if train_limit is not None:
        x_train, y_train = x_train[:train_limit], y_train[:train_limit]
    x_train, x_test = _resize_uint8(x_train, image_size), _resize_uint8(x_test, image_size)
    transform = image_transform(image_size, augment, eval_crop, preprocessing)

    def source(arrays):
        x, y = arrays
        return lambda ctx: shard(tf.data.Dataset.from_tensor_slices({"x": x, "y": y.astype(np.int32)}), ctx)

    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    names = [FASHION_MNIST_CLASSES[c] for c in (classes if classes is not None else range(10))]
    subset = f" (classes {list(classes)} relabelled 0..{len(classes) - 1})" if classes is not None else ""
    description = (
        f"Fashion-MNIST (real images) from {where}: {len(y_train)} train / {len(y_test)} eval, "
        f"28x28 grey resized to {image_size}x{image_size} RGB, {wanted} classes{subset}: {', '.join(names)}; "
        f"augment={augment}, preprocessing={preprocessing}"
    )
    return bundle(
        image_pipeline(source((x_train, y_train)), as_pair, transform, training=True, shuffle_buffer=shuffle_buffer,
                       **common),
        image_pipeline(source((x_test, y_test)), as_pair, transform, training=False, **common),
        batch_size,
        len(y_train),
        description,
    )


# ---------------------------------------------------------------------------------------------
# synthetic: benchmarks only
# ---------------------------------------------------------------------------------------------


def synthetic(
    image_size: int = 224,
    num_classes: int = 1000,
    batch_size: int = 128,
    eval_batches: int = 4,
    seed: int = 0,
) -> DataBundle:
    """One batch of random pixels and labels, repeated: measures the model's step time without any
    input cost (the tf_cnn_benchmarks convention). Nothing can be learned from it."""

    def batches(ctx, count=None):
        batch = per_replica_batch_size(batch_size, ctx)
        pid = ctx.input_pipeline_id if ctx is not None else 0
        images = tf.random.stateless_uniform([batch, image_size, image_size, 3], seed=[seed, pid], minval=-1.0,
                                             maxval=1.0)
        labels = tf.random.stateless_uniform([batch], seed=[seed, pid + 1000], maxval=num_classes, dtype=tf.int32)
        ds = tf.data.Dataset.from_tensors((images, labels))
        return ds.repeat(count) if count else ds.repeat()

    description = (
        f"SYNTHETIC random images ({image_size}x{image_size}x3, {num_classes} random labels) -- "
        "benchmark only: NOT real data, accuracy is meaningless"
    )
    log.warning("data=synthetic: %s", description)
    return DataBundle(
        train=lambda ctx=None: batches(ctx),
        eval=lambda ctx=None: batches(ctx, eval_batches),
        batch_size=batch_size,
        train_examples=None,
        description=description,
    )
