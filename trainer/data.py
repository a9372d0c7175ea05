"""Data sets for the trainer: the bundle a recipe hands over, and readers for standard formats.

A training data set is a function `InputContext -> tf.data.Dataset` of per-replica batches that repeats
forever and is deterministic given the seed; `tf.distribute` calls it once per input pipeline
(`distribute_datasets_from_function`), so each worker reads its own shard. The trainer resumes the input
position by skipping the batches already consumed (see `Trainer._distribute`).
"""
from __future__ import annotations

import gzip
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from trainer.errors import UserError
from trainer.lazy import lazy_module

np = lazy_module("numpy")  # loaded by the first function that uses it: every CLI start imports this module
tf = lazy_module("tensorflow")
log = logging.getLogger(__name__)

DatasetFn = Callable[["tf.distribute.InputContext"], "tf.data.Dataset"]
# A DatasetFn whose `skips_itself` attribute is true also takes `skip_steps=N` (global batches already
# trained on) and starts there more cheaply than the Trainer's `.skip(N)` on its output, which runs the
# whole pipeline (reads, decodes, augments) for every skipped batch. The stream must be the same.
# A DatasetFn with an `unshuffled` attribute (a DatasetFn too) gives batches of the same structure and
# shapes without its shuffle buffer: the Trainer builds the model on its first batch (inputs.sample_batch).


class DataError(UserError, ValueError):
    """A data set cannot be found or read; the message says where we looked and what to do."""


@dataclass
class DataBundle:
    """What a recipe's data builder returns.

    Attributes:
      train: InputContext -> infinite data set of per-replica batches (x, y) or (x, y, sample_weight).
      eval: InputContext -> finite data set of per-replica batches, or None.
      batch_size: the global batch size.
      train_examples: examples in one epoch of the training set (None if unknown).
      description: one line that says plainly which data this is (logged at start).
    """

    train: DatasetFn
    eval: Optional[DatasetFn]
    batch_size: int
    train_examples: Optional[int] = None
    description: str = ""


def check_batch_size(global_batch_size: int) -> None:
    if not global_batch_size >= 1:
        raise DataError(f"data.batch_size={global_batch_size} must be a positive integer (the global batch)")


def pipeline_seed(seed: int, ctx: Optional[tf.distribute.InputContext]) -> int:
    """The shuffle seed of this input pipeline: the run's seed for the first (one device, mirrored: unchanged),
    another for each other worker's. With one seed for all, every worker's shard was permuted alike, so a
    global batch held file-order neighbours (examples 2k and 2k+1 on two workers)."""
    if ctx is None or ctx.num_input_pipelines <= 1:
        return seed
    return seed + 1_000_003 * ctx.input_pipeline_id


def per_replica_batch_size(global_batch_size: int, ctx: Optional[tf.distribute.InputContext]) -> int:
    """The global batch split over replicas; an error when it does not divide evenly."""
    check_batch_size(global_batch_size)
    if ctx is None:
        return global_batch_size
    replicas = ctx.num_replicas_in_sync
    if global_batch_size % replicas:
        raise DataError(
            f"data.batch_size={global_batch_size} is not divisible by the {replicas} replicas; "
            f"set data.batch_size to a multiple of {replicas}"
        )
    return global_batch_size // replicas


def classification_pipeline(
    features,
    labels,
    *,
    global_batch_size: int,
    seed: int,
    training: bool,
    deterministic: bool = True,
    preprocess: Optional[Callable] = None,
    sample_weight=None,
    shuffle: bool = True,
) -> DatasetFn:
    """In-memory arrays -> a DatasetFn: shard, cache, shuffle (seeded), map, batch, repeat, prefetch.
    Batches are (features, labels), (features, labels, sample_weight), or features alone (labels None).
    `shuffle=False`: training batches in file order (Keras' fit(shuffle=False)).

    Its `unshuffled` attribute makes the same batches in file order: a first batch of the right shapes
    without filling the full-size shuffle buffer (60,000 examples for Fashion-MNIST, ~0.6 CPU-s)."""

    def make(ctx: Optional[tf.distribute.InputContext] = None, shuffle: bool = training and shuffle) -> tf.data.Dataset:
        batch = per_replica_batch_size(global_batch_size, ctx)
        parts = tuple(p for p in (features, labels, sample_weight) if p is not None)
        # Features alone that are a tuple (several inputs) go in a 1-tuple, as Keras packs them: else a batch
        # (a, b) would read as (x, y).
        ds = tf.data.Dataset.from_tensor_slices(parts if len(parts) > 1 or isinstance(features, tuple) else features)
        if ctx is not None and ctx.num_input_pipelines > 1:
            ds = ds.shard(ctx.num_input_pipelines, ctx.input_pipeline_id)
        ds = ds.cache()
        if shuffle:
            # A full-size buffer: each epoch is a permutation; reshuffled each epoch from the seed.
            ds = ds.shuffle(len(tf.nest.flatten(features)[0]), seed=pipeline_seed(seed, ctx),
                            reshuffle_each_iteration=True)
        if preprocess is not None:
            ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        # Batch at the global size, then split it into per-replica batches: the examples of a step do
        # not depend on the number of replicas (keras-team/keras#19891). Training drops the partial
        # last batch (equal per-replica batches; see the README); evaluation keeps it.
        ds = ds.batch(global_batch_size // (ctx.num_input_pipelines if ctx else 1), drop_remainder=training)
        if batch != global_batch_size // (ctx.num_input_pipelines if ctx else 1):
            ds = ds.rebatch(batch, drop_remainder=training)
        if training:
            ds = ds.repeat()
        options = tf.data.Options()
        options.deterministic = deterministic
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    make.unshuffled = lambda ctx=None: make(ctx, shuffle=False)
    return make


# ---------------------------------------------------------------------------------------------
# MNIST-format readers (IDX files, gz or not, and Keras' mnist.npz)
# ---------------------------------------------------------------------------------------------

MNIST_NAMES = ("mnist", "fashion_mnist")
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
# Where Debian's `dataset-fashion-mnist` package puts the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def read_idx(path: Path) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: only unsigned-byte IDX files are supported (type 0x{dtype_code:02x})")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {array.size} values")
    return array.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_idx_folder(folder: Path):
    paths = {key: _find_idx(folder, stem) for key, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(f"{folder} lacks the IDX files {missing} (with or without .gz)")
    return tuple(read_idx(paths[k]) for k in ("x_train", "y_train", "x_test", "y_test"))


def _read_npz(path: Path):
    with np.load(path, allow_pickle=False) as f:
        try:
            arrays = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
        except KeyError as e:
            raise DataError(f"{path} lacks {e}; expected Keras' mnist.npz layout") from None
    for name, array in zip(("x_train", "y_train", "x_test", "y_test"), arrays):
        check_finite(array, f"{path} ({name})")
    return arrays


def check_finite(array: np.ndarray, where: str) -> None:
    """An in-memory data set with NaN or inf values is a DataError, once, when it is loaded: otherwise
    the run stops many steps later at a non-finite loss that looks like a too-high learning rate."""
    if not np.issubdtype(array.dtype, np.inexact):
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(
            f"{where} has {bad} NaN or infinite values (of {array.size}). Fix: repair or drop those "
            "examples (e.g. numpy.nan_to_num, or a mask on numpy.isfinite) and save the file again."
        )


def check_labels(labels: np.ndarray, num_classes: int, where: str, setting: str = "model.num_classes") -> None:
    """Integer class labels outside 0..num_classes-1 are a DataError when the set is loaded: TensorFlow would
    stop the first step on them (InvalidArgumentError) on a CPU, and give a NaN loss on a GPU."""
    labels = np.asarray(labels)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        outside = int(np.count_nonzero((labels < 0) | (labels >= num_classes)))
        raise DataError(f"{where} has labels {low}..{high} ({outside} of {labels.size} outside 0..{num_classes - 1}), "
                        f"but {setting}={num_classes}. Fix: set {setting}={high + 1} if the data has that many "
                        "classes, or repair the labels.")


def load_mnist_format(name: str, path: Optional[str] = None):
    """Returns ((x_train, y_train, x_test, y_test), where) for MNIST or Fashion-MNIST.

    Looks in `path` (an IDX folder or an .npz file), then Debian's dataset-fashion-mnist folder, then
    the Keras cache, then downloads through keras.datasets (needs the internet).
    """
    if name not in MNIST_NAMES:
        raise DataError(f"data.name={name!r} is not one of {list(MNIST_NAMES)}")
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            return _read_idx_folder(p), str(p)
        if p.is_file() and p.suffix == ".npz":
            return _read_npz(p), str(p)
        raise DataError(
            f"data.path={path!r} is neither a folder of IDX files nor an .npz file; "
            "point it at MNIST-format data or leave it unset"
        )
    cache = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"
    candidates = []
    if name == "fashion_mnist":
        candidates += [DEBIAN_FASHION_MNIST, cache / "fashion-mnist"]
    else:
        candidates += [cache / "mnist.npz", cache / "mnist"]
    for c in candidates:
        if c.is_dir() and _find_idx(c, _IDX_FILES["x_train"]):
            return _read_idx_folder(c), str(c)
        if c.is_file():
            return _read_npz(c), str(c)
    try:
        import keras

        loader = keras.datasets.fashion_mnist if name == "fashion_mnist" else keras.datasets.mnist
        log.info("%s not found locally (%s); downloading with keras.datasets", name, ", ".join(map(str, candidates)))
        return _flatten(loader.load_data()), "keras.datasets download"
    except Exception as e:  # offline: say what to do instead
        hint = (
            "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or "
            if name == "fashion_mnist"
            else ""
        )
        raise DataError(
            f"{name} is not available offline and the download failed ({type(e).__name__}: {e}). "
            f"Looked in: {', '.join(map(str, candidates))}. Fix: {hint}set data.path to a folder of "
            "IDX files or an mnist.npz file, or use data.name=fashion_mnist."
        ) from None


def _flatten(loaded):
    (x_train, y_train), (x_test, y_test) = loaded
    return x_train, y_train, x_test, y_test


FRAMEWORK_KEYS = ("class_weight",)  # config.DataOptions: read by the framework, not given to the recipe's builder


def build_data(data_cfg, overrides=None, **kwargs) -> "DataBundle":
    """A recipe's DataBundle from its `data` config node (with `overrides`: data.* keys that differ, an eval set
    of cfg.eval_sets), less the keys the framework reads itself (FRAMEWORK_KEYS)."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    node = (OmegaConf.to_container(data_cfg, resolve=True, throw_on_missing=True) if isinstance(data_cfg, DictConfig)
            else dict(data_cfg))
    node.update(overrides or {})
    return instantiate({k: v for k, v in node.items() if k not in FRAMEWORK_KEYS}, **kwargs, _convert_="all")
