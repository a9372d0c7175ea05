"""Batched inference: `Trainer.predict(data)` in Python, and `python -m trainer.predict` on files.

    python -m trainer.predict RUN --input FILE|DIR --out FILE.csv|FILE.jsonl [--checkpoint latest|best|ckpt-N] [--batch-size N]

The CLI rebuilds the run's model and restores a checkpoint as trainer.evaluate does, reads the inputs with
the recipe's own preprocessing (its `predict_inputs(paths, data_cfg)`; see trainer/predict_inputs.py for
which recipes have one), and writes one row per input: its name, the predicted class (its name when the
data set has names) and the class probabilities (softmax of the logits when the loss takes logits).
Exit codes: 0 done, 2 a user error (no such run/checkpoint/input, unreadable file, a recipe without inputs).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, List, Optional

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 32


def as_batched_dataset(data: Any, batch_size: Optional[int]):
    """A tf.data.Dataset of batches from a Dataset (taken as batched, like Keras' predict), an array, a
    dict/tuple of arrays (batched here, by `batch_size`), or an iterable of batches."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        return data.rebatch(batch_size) if batch_size else data
    if isinstance(data, (np.ndarray, tf.Tensor, dict, tuple)):
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size or DEFAULT_BATCH_SIZE)
    if isinstance(data, list):
        raise TypeError("Trainer.predict: a list is ambiguous (examples? inputs?); give a NumPy array, a dict or "
                        "tuple of arrays, a tf.data.Dataset, or an iterator of batches")
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise ValueError("Trainer.predict: the iterable gave no batches")
    first = tf.nest.map_structure(np.asarray, first)
    spec = tf.nest.map_structure(lambda a: tf.TensorSpec((None, *a.shape[1:]), tf.as_dtype(a.dtype)), first)

    def chain():
        yield first
        yield from batches

    ds = tf.data.Dataset.from_generator(chain, output_signature=spec)
    return ds.rebatch(batch_size) if batch_size else ds


def predict(trainer, data: Any, batch_size: Optional[int] = None):
    """The model's outputs (inference mode) on every example of `data`, as NumPy (a dict or list of
    arrays for a model with several outputs), concatenated over batches in order. Runs under the
    trainer's strategy (each batch split over its replicas), in a tf.function, with XLA when the trainer
    compiles its steps with XLA. Labels in (x, y) batches are ignored."""
    import keras
    import tensorflow as tf

    from trainer.compile import wrap_xla
    from trainer.data import release_in_background

    model, strategy = trainer.model, trainer.strategy
    dataset = as_batched_dataset(data, batch_size).map(lambda *b: keras.utils.unpack_x_y_sample_weight(
        b[0] if len(b) == 1 else b)[0])

    def forward(x):
        return model(x, training=False)

    step = wrap_xla(forward, strategy.num_replicas_in_sync) if trainer.jit_compile else forward
    # The iterator is the argument (as in Keras' predict): one trace, its batch dimension unknown.
    run = tf.function(lambda iterator: strategy.run(step, args=(next(iterator),)))
    if not model.built:  # a model without keras.Input: its variables are made here, not in the tf.function
        with strategy.scope():
            model(next(iter(dataset)), training=False)
    pieces = []
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    while True:
        try:
            outputs = run(iterator)
        except tf.errors.OutOfRangeError:
            break
        # Each replica holds a consecutive slice of the global batch, in replica order.
        local = [strategy.experimental_local_results(t) for t in tf.nest.flatten(outputs)]
        for replica in range(len(local[0])):
            pieces.append(tf.nest.pack_sequence_as(outputs, [np.asarray(t[replica]) for t in local]))
    release_in_background([iterator])  # destroying it can wait for tf.data's autotuner (see data.py)
    if not pieces:
        raise ValueError("Trainer.predict: the data has no examples")
    return tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *pieces)


# ---------------------------------------------------------------------------------------------
# python -m trainer.predict
# ---------------------------------------------------------------------------------------------


def recipe_module(data_cfg):
    """The module of the run's data builder (data._target_), where a recipe keeps `predict_inputs`."""
    import importlib

    from trainer.evaluate import ServingError

    target = str(data_cfg.get("_target_", ""))
    module = importlib.import_module(target.rpartition(".")[0]) if "." in target else None
    if module is None or not hasattr(module, "predict_inputs"):
        raise ServingError(f"the run's data ({target or 'no data._target_'}) has no predict_inputs(paths, data_cfg, "
                           "batch_size): trainer.predict reads inputs for the mnist, resnet (images) and transformer "
                           "(text) recipes. Fix: add one beside its builder, or use Trainer.predict from Python.")
    return module


def input_files(source: str) -> List[Path]:
    """A file, or the files of a folder (sorted, hidden ones skipped)."""
    from trainer.evaluate import ServingError

    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    if not files:
        raise ServingError(f"--input {source}: {'no files in that folder' if path.is_dir() else 'no such file or folder'}. "
                           "Fix: give an input file or a folder of them.")
    return files


def class_rows(names: Iterable[str], outputs: np.ndarray, from_logits: bool, labels: Optional[List[str]]):
    """One dict per input: input, class (name, or index), class_index, probabilities (by class)."""
    import tensorflow as tf

    outputs = np.asarray(outputs, np.float32)
    if outputs.ndim != 2:
        raise ValueError(f"the model outputs shape {outputs.shape[1:]} per example; trainer.predict writes classes "
                         "of (batch, classes) outputs: use Trainer.predict from Python for other models")
    if outputs.shape[1] == 1:  # one logit/probability of the positive class
        positive = tf.sigmoid(outputs).numpy() if from_logits else outputs
        probabilities = np.concatenate([1.0 - positive, positive], axis=1)
    else:
        probabilities = tf.nn.softmax(outputs).numpy() if from_logits else outputs
    labels = labels or [str(i) for i in range(probabilities.shape[1])]
    for name, p in zip(names, probabilities):
        best = int(np.argmax(p))
        yield {"input": name, "class": labels[best], "class_index": best,
               "probabilities": {label: float(v) for label, v in zip(labels, p)}}


def write_rows(rows: List[dict], out: Path) -> None:
    """CSV (input, class, class_index, p_<class>...) or JSON Lines, by the suffix of `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["input", "class", "class_index", *[f"p_{c}" for c in rows[0]["probabilities"]]])
        for r in rows:
            writer.writerow([r["input"], r["class"], r["class_index"], *[f"{v:.6g}" for v in r["probabilities"].values()]])


def in_batches(examples: Iterable[Any], batch_size: int) -> Iterator[np.ndarray]:
    """The examples stacked `batch_size` at a time, read as the batches are consumed: a recipe's
    predict_inputs reads its files lazily with it (a folder larger than memory works)."""
    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


class _KeptErrors:
    """A recipe's batches for Trainer.predict: an error reading one (an unreadable file) ends them and is
    kept, to be raised as itself after (tf.data's generator op would wrap it in an op error)."""

    def __init__(self, batches: Iterable[Any]):
        self.batches, self.error = iter(batches), None

    def __iter__(self):
        try:
            yield from self.batches
        except Exception as e:  # noqa: BLE001 - raised again by predict_recipe_batches
            self.error = e


def predict_recipe_batches(trainer, data: Any, batch_size: int):
    """Trainer.predict on what a recipe's predict_inputs gave: a Dataset (of batches), arrays, or an
    iterator of batches, consumed batch by batch (its reading errors raised as they are)."""
    if hasattr(data, "element_spec"):
        return trainer.predict(data)
    if not isinstance(data, Iterator):
        return trainer.predict(data, batch_size=batch_size)
    reader = _KeptErrors(data)
    try:
        outputs = trainer.predict(reader, batch_size=batch_size)
    except ValueError:  # no batches: the first one failed
        if reader.error is None:
            raise
    if reader.error is not None:
        raise reader.error
    return outputs


def predict_files(run: str, inputs: str, checkpoint: str = "latest", batch_size: Optional[int] = None) -> List[dict]:
    """The rows `python -m trainer.predict` writes: the run's model on the files, read as its recipe reads them."""
    from trainer.evaluate import load_run, trainer_for

    loaded = load_run(run, checkpoint)
    data_cfg = loaded.cfg.data
    batch_size = batch_size or int(data_cfg.get("batch_size", DEFAULT_BATCH_SIZE))
    module = recipe_module(data_cfg)
    names, data = module.predict_inputs(input_files(inputs), data_cfg, batch_size)
    outputs = predict_recipe_batches(trainer_for(loaded), data, batch_size)
    labels = module.class_names(data_cfg) if hasattr(module, "class_names") else None
    from_logits = bool((loaded.cfg.get("loss") or {}).get("from_logits", False))
    return list(class_rows(names, outputs, from_logits, labels))


def main(argv: List[str] = None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (with .hydra/config.yaml and checkpoints/)")
    parser.add_argument("--input", required=True, help="a file, or a folder of files (images; .npy for mnist; text lines)")
    parser.add_argument("--out", required=True, help="FILE.csv or FILE.jsonl")
    parser.add_argument("--checkpoint", default="latest", help="latest (default) | best | ckpt-N | best/ckpt-N")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from trainer.evaluate import EXIT_USER_ERROR, user_error

    out = Path(args.out)
    problem = None
    if out.suffix not in (".csv", ".jsonl"):
        problem = f"--out {out}: the file name must end in .csv or .jsonl (it picks the format)"
    elif args.batch_size is not None and args.batch_size < 1:
        problem = f"--batch-size {args.batch_size}: must be >= 1"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    try:
        rows = predict_files(args.run, args.input, args.checkpoint, args.batch_size)
    except Exception as e:  # noqa: BLE001 - a user error a reader or builder raised, else a bug (traceback)
        message = user_error(e) or (str(e) if isinstance(e, (ValueError, OSError, tf_errors())) else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    write_rows(rows, out)
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


def tf_errors():
    """TensorFlow's error for a file it cannot decode (an image that is not one)."""
    import tensorflow as tf

    return tf.errors.InvalidArgumentError


if __name__ == "__main__":
    sys.exit(main())
