"""The export formats of `python -m trainer.export`, each written with Keras 3's own exporters and
checked by loading the file back and comparing its outputs with the trained model's on evaluation data.

  saved_model  model.export(format="tf_saved_model"); loaded back with tf.saved_model.load
  keras        model.save(".keras"); loaded back with keras.saving.load_model
  onnx         model.export(format="onnx") (tf2onnx + onnx); run back with onnxruntime
  tflite       model.export(format="litert") (TensorFlow's TFLite converter); run back with the LiteRT
               interpreter (ai-edge-litert; TensorFlow's deprecated tf.lite.Interpreter without it)

The packages onnx and LiteRT need are pinned in the `export` extra: pip install -e ".[export]".
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np

from trainer.errors import NumericalFailure, UserError

FORMATS = ("saved_model", "keras", "onnx", "tflite")
# Format -> (module, pinned requirement) it needs beyond TensorFlow/Keras; pyproject.toml's `export` extra.
NEEDS = {
    "onnx": [("tf2onnx", "tf2onnx==1.17.0"), ("onnx", "onnx==1.23.2"), ("onnxruntime", "onnxruntime==1.31.1")],
    "tflite": [],  # the converter is TensorFlow's; ai-edge-litert (optional) is the maintained interpreter
}
# Max |exported - trained| / max |trained| allowed: every format computes in float32, so only the order of
# operations differs (fused kernels, XNNPACK).
TOLERANCE = 1e-4


class ExportError(UserError, ValueError):
    """An export cannot be made (a missing package, a model it cannot take); the message says the fix."""


class ExportMismatch(NumericalFailure, ValueError):
    """The exported file does not reproduce the trained model's outputs within tolerance (exit 3; trainer.export
    removes it)."""


@dataclass
class ExportCheck:
    format: str
    path: str
    examples: int
    max_abs_error: float
    relative_error: float  # max |exported - trained| / max |trained|
    tolerance: float


def missing_packages(fmt: str) -> List[str]:
    """The pinned requirements of `fmt` whose module is not installed."""
    return [pin for module, pin in NEEDS.get(fmt, []) if importlib.util.find_spec(module) is None]


def check_packages(fmt: str) -> None:
    """Raises ExportError with the pip command when a package `fmt` needs is not installed."""
    missing = missing_packages(fmt)
    if missing:
        raise ExportError(f"--format {fmt} needs {', '.join(missing)}. Fix: pip install -e \".[export]\" "
                          f"(or pip install {' '.join(missing)})")


def write(model, fmt: str, out: Path) -> Path:
    """Writes `model` in `fmt` under `out` (a folder; onnx/tflite: a file when `out` ends in .onnx/.tflite)."""
    check_packages(fmt)
    if fmt == "keras":
        path = out if out.suffix == ".keras" else out / "model.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        return path
    if fmt == "saved_model":
        model.export(str(out), format="tf_saved_model", verbose=False)
        return out
    suffix = {"onnx": ".onnx", "tflite": ".tflite"}[fmt]
    path = out if out.suffix == suffix else out / f"model{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    model.export(str(path), format="onnx" if fmt == "onnx" else "litert", verbose=False)
    return path


def _by_name(wanted: List[str], given: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Matches an exported file's input names (e.g. serving_default_token_ids:0) to the batch's keys."""
    if len(wanted) == 1 and len(given) == 1:
        return {wanted[0]: next(iter(given.values()))}
    matched = {}
    for name in wanted:
        key = next((k for k in sorted(given, key=len, reverse=True) if k in name), None)
        if key is None:
            raise ExportError(f"the exported input {name!r} matches none of the model's inputs {sorted(given)}")
        matched[name] = given[key]
    return matched


def _as_named(x: Any) -> Dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in x.items()} if isinstance(x, dict) else {"input": np.asarray(x)}


def loader(fmt: str, path: Path) -> Callable[[Any], List[np.ndarray]]:
    """A function batch -> the exported file's outputs (flat list of arrays), the file loaded back."""
    import keras
    import tensorflow as tf

    if fmt == "saved_model":
        loaded = tf.saved_model.load(str(path))  # held by the closure: its variables live as long as it does
        return lambda x: [np.asarray(t) for t in tf.nest.flatten(loaded.serve(x))]
    if fmt == "keras":
        loaded = keras.saving.load_model(path, compile=False)
        return lambda x: [np.asarray(t) for t in tf.nest.flatten(loaded(x, training=False))]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda x: session.run(None, _by_name(names, _as_named(x)))
    return _tflite_runner(path)


def _tflite_runner(path: Path) -> Callable[[Any], List[np.ndarray]]:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # TensorFlow's own, deprecated in favour of LiteRT but still in 2.21
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter
    interpreter = Interpreter(model_path=str(path))

    def run(x):
        inputs = interpreter.get_input_details()
        feeds = _by_name([d["name"] for d in inputs], _as_named(x))
        for d in inputs:
            interpreter.resize_tensor_input(d["index"], feeds[d["name"]].shape)
        interpreter.allocate_tensors()
        for d in inputs:
            interpreter.set_tensor(d["index"], feeds[d["name"]].astype(d["dtype"]))
        interpreter.invoke()
        return [interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()]

    return run


def check(model, fmt: str, path: Path, batches: List[Any], tolerance: float = TOLERANCE) -> ExportCheck:
    """Loads `path` back and compares its outputs with `model`'s on `batches` (inputs only)."""
    import tensorflow as tf

    run = loader(fmt, path)
    errors, scale, examples = [], 0.0, 0
    for x in batches:
        want = [np.asarray(t, np.float32) for t in tf.nest.flatten(model(x, training=False))]
        got = [np.asarray(t, np.float32) for t in run(x)]
        if len(got) != len(want):
            raise ExportMismatch(f"{path} gives {len(got)} outputs, the model {len(want)}")
        for a, b in zip(sorted(want, key=np.shape), sorted(got, key=np.shape)):
            errors.append(float(np.max(np.abs(a - b.reshape(a.shape)))))
            scale = max(scale, float(np.max(np.abs(a))))
        examples += int(tf.nest.flatten(x)[0].shape[0])
    max_abs = max(errors)
    result = ExportCheck(fmt, str(path), examples, max_abs, max_abs / max(scale, 1e-12), tolerance)
    if not result.relative_error <= tolerance:
        raise ExportMismatch(f"{path} does not reproduce the trained model: relative error {result.relative_error:.3g} "
                             f"(max abs {max_abs:.3g}) over {examples} examples, more than "
                             f"the tolerance {tolerance:g}")
    return result
