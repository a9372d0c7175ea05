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
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from omegaconf import II, MISSING

from trainer.config import ConfigError, DataOptions, ranged
from trainer.data import DataBundle, DataError, check_labels, load_mnist_format, per_replica_batch_size, pipeline_seed
from trainer.lazy import lazy_module

np = lazy_module("numpy")  # loaded when data is built: register_configs needs neither
tf = lazy_module("tensorflow")
log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "pad_crop", "resized_crop")
# keras.applications' preprocessing modes: caffe (ResNet v1: BGR, ImageNet mean subtracted),
# tf (ResNet v2: scaled to [-1, 1]), torch (ImageNet mean/std), none (float pixels in [0, 255]).
PREPROCESSING = ("caffe", "tf", "torch", "none")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


# ---------------------------------------------------------------------------------------------
# Per-example transforms: decode, crop, resize, flip, preprocess
# ---------------------------------------------------------------------------------------------


def preprocess(image: tf.Tensor, mode: str) -> tf.Tensor:
    """float32 RGB pixels in [0, 255] -> what keras.applications models of that family expect."""
    if mode == "caffe":
        return image[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, image.dtype)
    if mode == "tf":
        return image / 127.5 - 1.0
    if mode == "torch":
        return (image / 255.0 - tf.constant(_TORCH_MEAN, image.dtype)) / tf.constant(_TORCH_STD, image.dtype)
    if mode == "none":
        return image
    raise ConfigError(f"data.preprocessing={mode!r} is not one of {list(PREPROCESSING)}")


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
    """HxW or HxWx1 grey -> HxWx3; RGB passes through."""
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
    return image


def _decode(x: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (any format TF reads) or an in-memory image -> uint8 HxWx3."""
    if x.dtype == tf.string:
        return tf.io.decode_image(x, channels=3, expand_animations=False)
    return _to_rgb(x)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    """-> float32 size x size x 3 (no work when the image already has that size)."""
    if image.shape[0] == size and image.shape[1] == size:
        return tf.cast(image, tf.float32)
    image = tf.image.resize(image, [size, size], method="bilinear")
    return tf.ensure_shape(image, [size, size, 3])


def _random_box(shape: tf.Tensor, key: tf.Tensor):
    """Inception-style crop (8%-100% of the area, aspect 3/4-4/3), as in the ResNet ImageNet recipe."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
        seed=key,
        min_object_covered=0.1,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _decode_random_crop(x: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
    """A random crop of the image; JPEGs are decoded only inside the crop window (much cheaper)."""
    if x.dtype != tf.string:
        image = _to_rgb(x)
        begin, size = _random_box(tf.shape(image), key)
        return tf.slice(image, begin, size)

    def jpeg():
        begin, size = _random_box(tf.io.extract_jpeg_shape(x), key)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        return tf.image.decode_and_crop_jpeg(x, window, channels=3)

    def other():
        image = tf.io.decode_image(x, channels=3, expand_animations=False)
        begin, size = _random_box(tf.shape(image), key)
        return tf.slice(image, begin, size)

    return tf.cond(tf.io.is_jpeg(x), jpeg, other)


@dataclass(frozen=True)
class ImageTransform:
    """What happens to one image: the train version is random (from `key`), the eval version is not."""

    image_size: int
    augment: str = "none"
    eval_crop: float = ranged(1.0, "(0, 1]")
    preprocessing: str = "none"

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"data.augment={self.augment!r} is not one of {list(AUGMENTATIONS)}")
        if self.preprocessing not in PREPROCESSING:
            raise ConfigError(f"data.preprocessing={self.preprocessing!r} is not one of {list(PREPROCESSING)}")
        if not 0.0 < self.eval_crop <= 1.0:
            raise ConfigError(f"data.eval_crop={self.eval_crop} must be in (0, 1]")
        if self.image_size < 8:
            raise ConfigError(f"data.image_size={self.image_size} is too small (at least 8)")

    def train(self, x: tf.Tensor, key: tf.Tensor) -> tf.Tensor:
        crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
        size = self.image_size
        if self.augment == "resized_crop":
            image = _resize(_decode_random_crop(x, crop_key), size)
        else:
            image = _resize(_decode(x), size)
            if self.augment == "pad_crop":  # CIFAR style: pad by size/8, crop back at a random place
                pad = max(size // 8, 1)
                image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
                image = tf.image.stateless_random_crop(image, [size, size, 3], seed=crop_key)
        if self.augment != "none":
            image = tf.image.stateless_random_flip_left_right(image, seed=flip_key)
        return preprocess(image, self.preprocessing)

    def eval(self, x: tf.Tensor) -> tf.Tensor:
        image = _decode(x)
        if self.eval_crop < 1.0:
            image = tf.image.central_crop(image, self.eval_crop)
        return preprocess(_resize(image, self.image_size), self.preprocessing)


# ---------------------------------------------------------------------------------------------
# The shared pipeline
# ---------------------------------------------------------------------------------------------

Source = Callable[[Optional["tf.distribute.InputContext"]], "tf.data.Dataset"]
Parse = Callable[[Dict[str, "tf.Tensor"]], Tuple["tf.Tensor", "tf.Tensor"]]


def image_pipeline(
    source: Source,
    parse: Parse,
    transform: ImageTransform,
    *,
    training: bool,
    global_batch_size: int,
    seed: int,
    shuffle_buffer: Optional[int] = None,
    cache: bool = False,
    deterministic: bool = True,
):
    """A DatasetFn (InputContext -> tf.data.Dataset of per-replica batches of (image, label)).

    Args:
      source: ctx -> this input pipeline's shard of small records (dicts): paths, serialized examples,
        or in-memory images. Cheap to shuffle.
      parse: record -> (encoded bytes or uint8 image, int label); reads files / parses protos.
      shuffle_buffer: records in the shuffle buffer; None: the whole shard (the source must be finite).
    """

    def make(ctx: Optional[tf.distribute.InputContext] = None, skip_steps: int = 0) -> tf.data.Dataset:
        batch = per_replica_batch_size(global_batch_size, ctx)
        pipeline_id = ctx.input_pipeline_id if ctx is not None else 0
        ds = source(ctx)
        read = parse
        if cache:  # cache what parse produced (raw bytes / images), never the random crops
            ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE).cache()
            read = None
        if training:
            buffer = shuffle_buffer or int(ds.cardinality())
            if buffer <= 0:
                raise DataError("cannot size the shuffle buffer of an unbounded source: set data.shuffle_buffer")
            ds = ds.shuffle(buffer, seed=pipeline_seed(seed, ctx), reshuffle_each_iteration=True).repeat().enumerate()
            if skip_steps:  # resume: drop the records of the steps already trained, before decoding them
                ds = ds.skip(skip_steps * (global_batch_size // (ctx.num_input_pipelines if ctx is not None else 1)))
            base_key = tf.constant([seed, pipeline_id], tf.int64)

            def train_example(index, record):
                x, y = read(record) if read else record
                key = tf.random.experimental.stateless_fold_in(base_key, index)
                return transform.train(x, key), y

            ds = ds.map(train_example, num_parallel_calls=tf.data.AUTOTUNE)
        else:

            def eval_example(record):
                x, y = read(record) if read else record
                return transform.eval(x), y

            ds = ds.map(eval_example, num_parallel_calls=tf.data.AUTOTUNE)
        # Training drops the partial last batch (equal per-replica batches); evaluation keeps it.
        ds = ds.batch(batch, drop_remainder=training)
        options = tf.data.Options()
        options.deterministic = deterministic
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    make.skips_itself = training  # trainer/data.py: DatasetFn
    return make


def _shard(ds: tf.data.Dataset, ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    if ctx is not None and ctx.num_input_pipelines > 1:
        return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds


def _as_pair(record):
    return record["x"], record["y"]


def _transform(image_size, augment, eval_crop, preprocessing) -> ImageTransform:
    return ImageTransform(image_size=image_size, augment=augment, eval_crop=eval_crop, preprocessing=preprocessing)


def predict_inputs(paths: Sequence[Path], data_cfg, batch_size: int):
    """(names, batches) for trainer.predict: image files through the eval transform of training
    (decode to RGB, central crop by data.eval_crop, resize to data.image_size, data.preprocessing),
    decoded one batch at a time as trainer.predict consumes them (a folder larger than memory works)."""
    from trainer.inference import in_batches

    transform = _transform(data_cfg["image_size"], "none", data_cfg.get("eval_crop", 1.0),
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


def _bundle(train, eval_, batch_size, train_examples, description) -> DataBundle:
    return DataBundle(train=train, eval=eval_, batch_size=batch_size, train_examples=train_examples,
                      description=description)


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
    transform = _transform(image_size, augment, eval_crop, preprocessing)

    def source(arrays):
        x, y = arrays
        return lambda ctx: _shard(tf.data.Dataset.from_tensor_slices({"x": x, "y": y.astype(np.int32)}), ctx)

    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    names = [FASHION_MNIST_CLASSES[c] for c in (classes if classes is not None else range(10))]
    subset = f" (classes {list(classes)} relabelled 0..{len(classes) - 1})" if classes is not None else ""
    description = (
        f"Fashion-MNIST (real images) from {where}: {len(y_train)} train / {len(y_test)} eval, "
        f"28x28 grey resized to {image_size}x{image_size} RGB, {wanted} classes{subset}: {', '.join(names)}; "
        f"augment={augment}, preprocessing={preprocessing}"
    )
    return _bundle(
        image_pipeline(source((x_train, y_train)), _as_pair, transform, training=True, shuffle_buffer=shuffle_buffer,
                       **common),
        image_pipeline(source((x_test, y_test)), _as_pair, transform, training=False, **common),
        batch_size,
        len(y_train),
        description,
    )


# ---------------------------------------------------------------------------------------------
# image_folder: <dir>/<class>/<image>
# ---------------------------------------------------------------------------------------------


def index_image_folder(directory: str) -> Tuple[List[str], List[str], np.ndarray]:
    """(class names, file paths, labels) of a class-per-folder tree; classes in sorted order, files too."""
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist; set data.train_dir (and data.eval_dir) to a "
                        "folder with one sub-folder per class")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise DataError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(
            str(p) for p in (root / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root} has class folders {class_names[:5]} but no image files "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    return class_names, paths, np.asarray(labels, np.int32)


def _split_per_class(paths, labels, fraction: float, seed: int):
    """Deterministic hold-out of `fraction` of each class's files (at least one when fraction > 0)."""
    rng = np.random.default_rng(seed)
    paths = np.asarray(paths)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(idx))))
        held[rng.permutation(idx)[:k]] = True
    return (list(paths[~held]), labels[~held]), (list(paths[held]), labels[held])


def _read_file(record):
    return tf.io.read_file(record["path"]), record["y"]


def image_folder(
    train_dir: str,
    num_classes: int,
    eval_dir: Optional[str] = None,
    validation_split: float = 0.0,
    image_size: int = 224,
    batch_size: int = 128,
    augment: str = "resized_crop",
    eval_crop: float = 0.875,
    preprocessing: str = "caffe",
    cache: bool = False,
    shuffle_buffer: Optional[int] = None,
    deterministic: bool = True,
    seed: int = 0,
) -> DataBundle:
    """Images in class folders (what keras.utils.image_dataset_from_directory reads), decoded with tf.data
    after a full shuffle of the file list, so memory holds paths, not pixels."""
    class_names, paths, labels = index_image_folder(train_dir)
    if len(class_names) != num_classes:
        raise DataError(
            f"{train_dir} has {len(class_names)} class folders ({', '.join(class_names[:8])}"
            f"{', ...' if len(class_names) > 8 else ''}) but data.num_classes={num_classes}: set "
            f"data.num_classes={len(class_names)}"
        )
    eval_part = None
    if eval_dir:
        eval_names, eval_paths, eval_labels = index_image_folder(eval_dir)
        if eval_names != class_names:
            raise DataError(f"{eval_dir} and {train_dir} have different class folders: "
                            f"{eval_names[:5]} vs {class_names[:5]}")
        eval_part = (eval_paths, eval_labels)
    elif validation_split > 0:
        if not validation_split < 1:
            raise DataError(f"data.validation_split={validation_split} must be in [0, 1)")
        (paths, labels), eval_part = _split_per_class(paths, labels, validation_split, seed)
    transform = _transform(image_size, augment, eval_crop, preprocessing)

    def source(files, file_labels):
        return lambda ctx: _shard(tf.data.Dataset.from_tensor_slices({"path": list(files), "y": file_labels}), ctx)

    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    train = image_pipeline(source(paths, labels), _read_file, transform, training=True, shuffle_buffer=shuffle_buffer,
                           **common)
    evals = image_pipeline(source(*eval_part), _read_file, transform, training=False, **common) if eval_part else None
    where_eval = f"{eval_dir}" if eval_dir else (f"{validation_split:.0%} of each class held out" if eval_part
                                                 else "no eval set")
    description = (
        f"image folder {train_dir}: {len(paths)} train images / {len(eval_part[0]) if eval_part else 0} eval "
        f"({where_eval}), {len(class_names)} classes "
        f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}), resized to "
        f"{image_size}x{image_size}, augment={augment}, preprocessing={preprocessing}"
    )
    return _bundle(train, evals, batch_size, len(paths), description)


# ---------------------------------------------------------------------------------------------
# tfrecord: ImageNet-style tf.train.Example files
# ---------------------------------------------------------------------------------------------


def _glob(pattern: str, what: str) -> List[str]:
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise DataError(f"data.{what}={pattern!r} matches no files; point it at TFRecord files (a glob such "
                        "as /data/imagenet/train-*)")
    return files


LABELS_CHECKED = 512  # records of the first file whose labels are checked before training


def _check_tfrecord(path: str, features, label_key: str, label_offset: int, num_classes: int) -> None:
    """Reads the first record now, so a wrong file, key or label base fails before training starts."""
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except tf.errors.OpError as e:
        raise DataError(f"{path} is not a readable TFRecord file "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if first is None:
        raise DataError(f"{path} holds no records")
    try:
        example = tf.io.parse_single_example(first, features)
    except tf.errors.OpError as e:
        raise DataError(
            f"{path}: the first record is not a tf.train.Example with {sorted(features)} "
            f"({str(e).splitlines()[0][:200]}); set data.image_key / data.label_key to the file's feature names"
        ) from None
    label = int(example[label_key]) + label_offset
    if not 0 <= label < num_classes:
        raise DataError(
            f"{path}: first label {int(example[label_key])} + data.label_offset={label_offset} = {label} is outside "
            f"0..{num_classes - 1}. TF-slim/Inception ImageNet files store labels 1..1000: set data.label_offset=-1"
        )
    # A streamed set is not read whole before training: its first records stand for it (the step names a label
    # out of range it meets later; trainer/cli.py).
    records = tf.data.TFRecordDataset(path).take(LABELS_CHECKED).batch(LABELS_CHECKED)
    labels = tf.io.parse_example(next(iter(records)), {label_key: features[label_key]})[label_key]
    check_labels(np.asarray(labels).reshape(-1) + label_offset, num_classes,
                 f"{path} (its first {int(tf.size(labels))} records, with data.label_offset={label_offset})",
                 "data.num_classes")


def tfrecord(
    train_files: str,
    num_classes: int,
    eval_files: Optional[str] = None,
    image_key: str = "image/encoded",
    label_key: str = "image/class/label",
    label_offset: int = 0,
    train_examples: Optional[int] = None,
    cycle_length: int = 16,
    image_size: int = 224,
    batch_size: int = 128,
    augment: str = "resized_crop",
    eval_crop: float = 0.875,
    preprocessing: str = "caffe",
    cache: bool = False,
    shuffle_buffer: Optional[int] = 10000,
    deterministic: bool = True,
    seed: int = 0,
) -> DataBundle:
    """Sharded TFRecords of tf.train.Example (the ImageNet layout): files shuffled each epoch and read
    `cycle_length` at a time, records shuffled in a `shuffle_buffer`, JPEGs decoded inside the crop."""
    features = {
        image_key: tf.io.FixedLenFeature([], tf.string),
        label_key: tf.io.FixedLenFeature([], tf.int64),
    }
    train_list = _glob(train_files, "train_files")
    eval_list = _glob(eval_files, "eval_files") if eval_files else None
    for first in [train_list[0]] + ([eval_list[0]] if eval_list else []):
        _check_tfrecord(first, features, label_key, label_offset, num_classes)

    def parse(record):
        example = tf.io.parse_single_example(record["record"], features)
        return example[image_key], tf.cast(example[label_key] + label_offset, tf.int32)

    def source(files, training):
        def make(ctx):
            n = ctx.num_input_pipelines if ctx is not None else 1
            ds = tf.data.Dataset.from_tensor_slices(files)
            by_file = n > 1 and len(files) >= n
            if by_file:  # each worker reads whole files of its own
                ds = ds.shard(n, ctx.input_pipeline_id)
            if training:
                ds = ds.shuffle(len(files), seed=pipeline_seed(seed, ctx) if by_file else seed,
                                reshuffle_each_iteration=True)
            ds = ds.interleave(
                tf.data.TFRecordDataset,
                cycle_length=min(cycle_length, len(files)),
                num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True,
            )
            if n > 1 and not by_file:
                ds = ds.shard(n, ctx.input_pipeline_id)
            return ds.map(lambda r: {"record": r})

        return make

    transform = _transform(image_size, augment, eval_crop, preprocessing)
    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    train = image_pipeline(source(train_list, True), parse, transform, training=True,
                           shuffle_buffer=shuffle_buffer or 10000, **common)
    evals = image_pipeline(source(eval_list, False), parse, transform, training=False, **common) if eval_list else None
    size = (f"{train_examples} train records" if train_examples
            else "train size unknown (set data.train_examples for trainer.epochs)")
    description = (
        f"TFRecords {train_files} ({len(train_list)} files, {size}); eval: {eval_files or 'none'} "
        f"({len(eval_list) if eval_list else 0} files); {num_classes} classes; keys {image_key}, {label_key}"
        f"{f' (label_offset={label_offset})' if label_offset else ''}; resized to {image_size}x{image_size}, "
        f"augment={augment}, preprocessing={preprocessing}"
    )
    return _bundle(train, evals, batch_size, train_examples, description)


# ---------------------------------------------------------------------------------------------
# tfds: TensorFlow Datasets (optional dependency), from a local data_dir
# ---------------------------------------------------------------------------------------------


def _import_tfds():
    try:
        import tensorflow_datasets
    except ImportError:
        raise DataError(
            "data=tfds needs the optional package tensorflow-datasets, which is not installed: "
            "pip install tensorflow-datasets (or pip install -e '.[tfds]'); or use data=image_folder / data=tfrecord"
        ) from None
    return tensorflow_datasets


def tfds(
    name: str,
    num_classes: int,
    data_dir: Optional[str] = None,
    train_split: str = "train",
    eval_split: Optional[str] = "test",
    download: bool = False,
    image_size: int = 224,
    batch_size: int = 128,
    augment: str = "resized_crop",
    eval_crop: float = 0.875,
    preprocessing: str = "caffe",
    cache: bool = False,
    shuffle_buffer: Optional[int] = 10000,
    deterministic: bool = True,
    seed: int = 0,
) -> DataBundle:
    """A TFDS image classification data set (supervised keys image, label) already in `data_dir`.

    Images are read still encoded (tfds.decode.SkipDecoding), so training decodes only the crop window.
    """
    tfds_lib = _import_tfds()
    try:
        builder = tfds_lib.builder(name, data_dir=data_dir)
        if download:
            builder.download_and_prepare()
        info = builder.info
        image_key, label_key = info.supervised_keys
        splits = {s: info.splits[s].num_examples for s in [train_split] + ([eval_split] if eval_split else [])}
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"TFDS data set {name!r} is not usable from data_dir={data_dir or '~/tensorflow_datasets'} "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}). Fix: prepare it there first "
            f"(tfds build {name} --data_dir DIR, on a machine with the internet), or set data.download=true"
        ) from None
    if not splits[train_split]:
        raise DataError(f"TFDS {name!r} split {train_split!r} is empty or not prepared in {builder.data_dir}; "
                        f"prepare it (tfds build {name})")
    found_classes = info.features[label_key].num_classes
    if found_classes != num_classes:
        raise DataError(f"TFDS {name!r} has {found_classes} classes but data.num_classes={num_classes}: set "
                        f"data.num_classes={found_classes}")

    def source(split, training):
        def make(ctx):
            n = ctx.num_input_pipelines if ctx is not None else 1
            # TFDS shards by file and refuses when there are fewer files than input pipelines.
            by_file = n > 1 and info.splits[split].num_shards >= n
            read_config = tfds_lib.ReadConfig(shuffle_seed=seed, input_context=ctx if by_file else None,
                                              try_autocache=False)
            ds = builder.as_dataset(
                split=split,
                shuffle_files=training,
                read_config=read_config,
                decoders={image_key: tfds_lib.decode.SkipDecoding()},
            )
            if n > 1 and not by_file:
                ds = ds.shard(n, ctx.input_pipeline_id)
            return ds.map(lambda ex: {"x": ex[image_key], "y": tf.cast(ex[label_key], tf.int32)})

        return make

    transform = _transform(image_size, augment, eval_crop, preprocessing)
    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    train = image_pipeline(source(train_split, True), _as_pair, transform, training=True,
                           shuffle_buffer=shuffle_buffer or 10000, **common)
    evals = (image_pipeline(source(eval_split, False), _as_pair, transform, training=False, **common) if eval_split
             else None)
    description = (
        f"TFDS {name} from {builder.data_dir}: {train_split}={splits[train_split]} examples"
        f"{f', {eval_split}={splits[eval_split]}' if eval_split else ''}; {num_classes} classes; "
        f"resized to {image_size}x{image_size}, augment={augment}, preprocessing={preprocessing}"
    )
    return _bundle(train, evals, batch_size, splits[train_split], description)


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
