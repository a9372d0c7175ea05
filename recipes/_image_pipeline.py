"""The image recipe's input pipeline (recipes/images.py, its data= options): every source's small records go
through `image_pipeline`, which shards, caches, shuffles (seeded), repeats, and only then decodes and augments
each example with an `ImageTransform`. Augmentation is stateless: an example's crop and flip come from a key
derived from (data.seed, input pipeline, position in the stream), so a resume by skipping batches sees the
same stream. A module of its own to keep recipes/images.py short; its name starts with `_`, so
assemble.register_configs does not take it for a recipe.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from trainer.config import ConfigError, ranged
from trainer.data import DataBundle, DataError, per_replica_batch_size, pipeline_seed
from trainer.lazy import lazy_module

tf = lazy_module("tensorflow")  # loaded when data is built: importing trainer.recipes.images needs none

AUGMENTATIONS = ("none", "flip", "pad_crop", "resized_crop")
# keras.applications' preprocessing modes: caffe (ResNet v1: BGR, ImageNet mean subtracted),
# tf (ResNet v2: scaled to [-1, 1]), torch (ImageNet mean/std), none (float pixels in [0, 255]).
PREPROCESSING = ("caffe", "tf", "torch", "none")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN, _TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


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


def shard(ds: tf.data.Dataset, ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
    """This input pipeline's share of an in-memory or listed source (every record when there is one pipeline)."""
    if ctx is not None and ctx.num_input_pipelines > 1:
        return ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
    return ds


def as_pair(record):
    """The `parse` of a source whose records already hold the image and label (`x`, `y`)."""
    return record["x"], record["y"]


def image_transform(image_size, augment, eval_crop, preprocessing) -> ImageTransform:
    return ImageTransform(image_size=image_size, augment=augment, eval_crop=eval_crop, preprocessing=preprocessing)


def bundle(train, eval_, batch_size, train_examples, description) -> DataBundle:
    return DataBundle(train=train, eval=eval_, batch_size=batch_size, train_examples=train_examples,
                      description=description)
