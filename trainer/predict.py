"""`python -m trainer.predict`: a run's model on files (`Trainer.predict(data)` itself: trainer/inference.py).

    python -m trainer.predict RUN --input FILE|DIR --out FILE.csv|FILE.jsonl
        [--checkpoint latest|best|ckpt-N] [--batch-size N]

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

from trainer.console import log_command_to_stderr
from trainer.assemble import trainer_for
from trainer.errors import reports_errors
from trainer.inference import DEFAULT_BATCH_SIZE, as_batched_dataset, in_batches, predict  # noqa: F401 - their home before
from trainer.runs import ServingError, load_run

log = logging.getLogger(__name__)


def recipe_module(data_cfg):
    """The module of the run's data builder (data._target_), where a recipe keeps `predict_inputs`."""
    import importlib

    target = str(data_cfg.get("_target_", ""))
    module = importlib.import_module(target.rpartition(".")[0]) if "." in target else None
    if module is None or not hasattr(module, "predict_inputs"):
        raise ServingError(f"the run's data ({target or 'no data._target_'}) has no predict_inputs(paths, data_cfg, "
                           "batch_size): trainer.predict reads inputs for the mnist, resnet (images) and transformer "
                           "(text) recipes. Fix: add one beside its builder, or use Trainer.predict from Python.")
    return module


def input_files(source: str) -> List[Path]:
    """A file, or the files of a folder (sorted, hidden ones skipped)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    if not files:
        raise ServingError(f"--input {source}: "
                           f"{'no files in that folder' if path.is_dir() else 'no such file or folder'}. Fix: give an "
                           "input file or a folder of them.")
    return files


def class_rows(names: Iterable[str], outputs: np.ndarray, from_logits: bool, labels: Optional[List[str]]):
    """One dict per input: input, class (name, or index), class_index, probabilities (by class)."""
    import tensorflow as tf

    outputs = np.asarray(outputs, np.float32)
    if outputs.ndim != 2:
        raise ServingError(f"the model outputs shape {outputs.shape[1:]} per example; trainer.predict writes classes "
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
            writer.writerow([r["input"], r["class"], r["class_index"],
                             *[f"{v:.6g}" for v in r["probabilities"].values()]])




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
    predicted = _predictions(argv)
    return predicted if isinstance(predicted, int) else _write(*predicted)


@reports_errors(bad_input=(OSError,))  # --out cannot be written (exit 2); anything else here is a bug: its traceback
def _write(rows: List[dict], out: Path) -> int:
    write_rows(rows, out)
    print(f"wrote {len(rows)} predictions to {out}")
    return 0


@reports_errors(bad_input=lambda: input_errors())  # defined below; read when an error is reported
def _predictions(argv: Optional[List[str]]):
    """The rows to write and where, from the command line (or an exit code: a bad input, said)."""
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (with .hydra/config.yaml and checkpoints/)")
    parser.add_argument("--input", required=True,
                        help="a file, or a folder of files (images; .npy for mnist; text lines)")
    parser.add_argument("--out", required=True, help="FILE.csv or FILE.jsonl")
    parser.add_argument("--checkpoint", default="latest", help="latest (default) | best | ckpt-N | best/ckpt-N")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    args = parser.parse_args(argv)
    log_command_to_stderr(logging.WARNING)  # TensorFlow's lines once (trainer/console.py)
    out = Path(args.out)
    if out.suffix not in (".csv", ".jsonl"):
        raise ServingError(f"--out {out}: the file name must end in .csv or .jsonl (it picks the format)")
    if args.batch_size is not None and args.batch_size < 1:
        raise ServingError(f"--batch-size {args.batch_size}: must be >= 1")
    return predict_files(args.run, args.input, args.checkpoint, args.batch_size), out


def input_errors() -> tuple:
    """What a recipe's predict_inputs raises on a file it cannot read: a missing or unreadable file
    (OSError), one of another shape or encoding (ValueError), an image TensorFlow cannot decode. Bad input
    for this command (exit 2), though not errors of ours: the recipes' readers are the user's code."""
    import tensorflow as tf

    return (ValueError, OSError, tf.errors.InvalidArgumentError)


if __name__ == "__main__":
    sys.exit(main())
