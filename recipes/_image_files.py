"""The image recipe's sources that read files (recipes/images.py names them as its data= options): class
folders of image files, ImageNet-style TFRecord shards, a TFDS data set in a local data_dir. Each lists or
reads small records (paths, serialized examples, encoded images) for the shared pipeline (_image_pipeline.py)
and checks what it can before training starts. A module of its own to keep recipes/images.py short.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Optional, Tuple

from trainer.data import DataBundle, DataError, check_labels, pipeline_seed
from trainer.lazy import lazy_module
from trainer.recipes._image_pipeline import as_pair, bundle, image_pipeline, image_transform, shard

np = lazy_module("numpy")  # loaded when data is built: importing trainer.recipes.images needs neither
tf = lazy_module("tensorflow")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


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
    transform = image_transform(image_size, augment, eval_crop, preprocessing)

    def source(files, file_labels):
        return lambda ctx: shard(tf.data.Dataset.from_tensor_slices({"path": list(files), "y": file_labels}), ctx)

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
    return bundle(train, evals, batch_size, len(paths), description)


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

    transform = image_transform(image_size, augment, eval_crop, preprocessing)
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
    return bundle(train, evals, batch_size, train_examples, description)


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

    transform = image_transform(image_size, augment, eval_crop, preprocessing)
    common = dict(global_batch_size=batch_size, seed=seed, deterministic=deterministic, cache=cache)
    train = image_pipeline(source(train_split, True), as_pair, transform, training=True,
                           shuffle_buffer=shuffle_buffer or 10000, **common)
    evals = (image_pipeline(source(eval_split, False), as_pair, transform, training=False, **common) if eval_split
             else None)
    description = (
        f"TFDS {name} from {builder.data_dir}: {train_split}={splits[train_split]} examples"
        f"{f', {eval_split}={splits[eval_split]}' if eval_split else ''}; {num_classes} classes; "
        f"resized to {image_size}x{image_size}, augment={augment}, preprocessing={preprocessing}"
    )
    return bundle(train, evals, batch_size, splits[train_split], description)
