"""Convert a trained model to another dtype policy (float32 <-> mixed_float16 / mixed_bfloat16).

    python -m trainer.convert CHECKPOINT_OR_MODEL --policy mixed_float16 --out DIR [--eval-steps N]

The model is rebuilt from its config under the target policy (variables stay float32 under mixed
policies), the weights are copied, the outputs are forced to float32, and the outputs are compared against
a stated tolerance: from a run folder (or one of its checkpoints) on a batch of the recipe's eval split,
then the recipe's loss and metrics before and after on the eval set (its trainer.eval_steps batches, or
--eval-steps N); from a .keras file (no data known) on 8 seeded random inputs: floats uniform in [0, 1),
integers (token ids) in {0, 1}. The report gives variable bytes and, measured on the sample batch,
inference time before and after.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Tuple

from trainer.console import log_command_to_stderr
from trainer.errors import UserError, reports_errors

# Relative error allowed between the float32 model and the converted one, per target compute dtype:
# float16 keeps 10 mantissa bits, bfloat16 7, so a deep net's outputs drift by about that much.
TOLERANCE = {"float32": 1e-5, "mixed_float16": 2e-2, "mixed_bfloat16": 8e-2}
SLOWER_INFERENCE = 1.2  # a converted model this much slower at inference than the source is warned about
log = logging.getLogger(__name__)


class ConversionError(UserError, ValueError):
    """The converted model does not reproduce the original within tolerance, or cannot be rebuilt."""


@dataclass
class ConversionReport:
    source_policy: str
    target_policy: str
    max_abs_error: float
    relative_error: float  # max |a - b| / max |a|
    tolerance: float
    variable_bytes_before: int
    variable_bytes_after: int
    output_dtypes: list
    seconds_per_batch_before: Optional[float]
    seconds_per_batch_after: Optional[float]
    inputs: str = "given sample batch"  # what the outputs were compared on
    eval_before: Optional[dict] = None  # the recipe's loss and metrics on the eval set, original model
    eval_after: Optional[dict] = None  # the same, converted model


def _policy_of(model) -> str:
    return model.dtype_policy.name if hasattr(model, "dtype_policy") else "float32"


def _variable_bytes(model) -> int:
    import numpy as np

    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights))


TIMED_ROUNDS = 5  # interleaved inference calls of each model (the warning says how many)


def _time_predicts(before, after, x, rounds: int = TIMED_ROUNDS) -> Tuple[float, float]:
    """Seconds per batch of each model's inference: the median of `rounds` interleaved calls (a burst of
    load on a shared machine hits both), after a traced, untimed one."""
    import tensorflow as tf

    from trainer.timing import interleaved_seconds, median_seconds

    def call_of(model):
        fn = tf.function(lambda inputs: model(inputs, training=False))
        return lambda: tf.nest.map_structure(lambda t: t.numpy(), fn(x))

    medians = median_seconds(interleaved_seconds({"before": call_of(before), "after": call_of(after)},
                                                 rounds=rounds, warmup=1))
    return medians["before"], medians["after"]


def slowdown_warning(report: "ConversionReport", device: str) -> Optional[str]:
    """The warning for a converted model measured more than SLOWER_INFERENCE times slower, else None
    (issue 30: mixed_float16 on a CPU ran inference 16x slower, silently)."""
    before, after = report.seconds_per_batch_before, report.seconds_per_batch_after
    if not before or not after or after <= before * SLOWER_INFERENCE:
        return None
    reduced = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}.get(report.target_policy)
    why = (f"{report.target_policy} pays on hardware with fast {reduced} matmuls (GPUs with Tensor Cores, AMX "
           "CPUs; python -m trainer.doctor measures yours)" if reduced else
           f"{report.source_policy} measured faster on this {device}")
    return (f"the {report.target_policy} model's inference measured {after / before:.1f}x slower than the "
            f"{report.source_policy} one on this {device} ({after * 1e3:.1f} vs {before * 1e3:.1f} ms per batch, "
            f"median of {TIMED_ROUNDS} interleaved calls). {why}: keep {report.source_policy} for inference here, "
            "or convert on the machine that serves the model")


def rebuild_under_policy(model, policy: str):
    """A fresh copy of `model` whose layers compute in `policy` (weights not yet copied)."""
    import keras
    import tensorflow as tf

    from keras.src.models.functional import Functional

    from trainer.precision import Float32Outputs

    if isinstance(model, Float32Outputs):  # convert what it wraps; outputs are forced again after
        model = model.inner
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        # keras.Model(inputs, outputs) makes a Functional; subclasses of it (keras-hub) rebuild from config.
        if type(model) in (keras.Sequential, keras.Model, Functional):
            # Layers that produce the model's outputs stay float32 (the mixed-precision guide's rule).
            output_layers = {id(t._keras_history[0]) for t in tf.nest.flatten(model.outputs)}

            def clone_layer(layer):
                config = layer.get_config()
                if "dtype" in config:
                    config["dtype"] = "float32" if id(layer) in output_layers else policy
                return type(layer).from_config(config)

            return keras.models.clone_model(model, clone_function=clone_layer)
        # Subclassed and keras-hub/applications models: rebuild from their own config.
        config = model.get_config()
        if isinstance(config, dict) and "dtype" in config:
            config["dtype"] = policy
        return type(model).from_config(config)
    except NotImplementedError as e:
        raise ConversionError(
            f"{type(model).__name__} has no get_config(); give the model get_config/from_config to convert it"
        ) from e
    finally:
        keras.mixed_precision.set_dtype_policy(previous)


def convert_model(model, policy: str, sample_inputs: Any, tolerance: Optional[float] = None, measure_time: bool = True):
    """Returns (converted_model, ConversionReport); raises ConversionError beyond tolerance.

    Args:
      model: a built Keras model (Sequential, Functional, subclassed with get_config, keras-hub).
      policy: float32 | mixed_float16 | mixed_bfloat16.
      sample_inputs: a batch the outputs are compared on.
      tolerance: max relative output error allowed (default: TOLERANCE[policy] against a float32 source).
    """
    import numpy as np
    import tensorflow as tf

    from trainer.precision import POLICIES, ensure_float32_outputs

    if policy not in POLICIES:
        raise ConversionError(f"--policy {policy!r} is not one of {list(POLICIES)}")
    source_policy = _policy_of(model)
    reference = model(sample_inputs, training=False)
    converted = rebuild_under_policy(model, policy)
    outputs = converted(sample_inputs, training=False)  # builds the variables
    converted.set_weights(model.get_weights())
    outputs = converted(sample_inputs, training=False)
    target = {"float32": "float32", "mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}[policy]
    layers = list(converted._flatten_layers(include_self=False, recursive=True))
    if not any(layer.compute_dtype == target for layer in layers):
        raise ConversionError(
            f"rebuilding {type(model).__name__} under {policy} left no layer computing in {target}: its "
            "config pins the layers' dtypes; give it get_config/from_config that honour the global policy"
        )
    converted = ensure_float32_outputs(converted, outputs, strict=False)
    outputs = converted(sample_inputs, training=False)

    ref = np.concatenate([np.asarray(tf.cast(t, tf.float32)).ravel() for t in tf.nest.flatten(reference)])
    out = np.concatenate([np.asarray(t).ravel() for t in tf.nest.flatten(outputs)])
    max_abs = float(np.max(np.abs(ref - out)))
    relative = max_abs / max(float(np.max(np.abs(ref))), 1e-12)
    if tolerance is None:
        worst = {source_policy, policy} - {"float32"}
        tolerance = max([TOLERANCE[p] for p in worst] or [TOLERANCE["float32"]])
    report = ConversionReport(
        source_policy=source_policy,
        target_policy=policy,
        max_abs_error=max_abs,
        relative_error=relative,
        tolerance=tolerance,
        variable_bytes_before=_variable_bytes(model),
        variable_bytes_after=_variable_bytes(converted),
        output_dtypes=sorted({t.dtype.name for t in tf.nest.flatten(outputs)}),
        seconds_per_batch_before=None,
        seconds_per_batch_after=None,
    )
    if measure_time:
        before, after = _time_predicts(model, converted, sample_inputs)
        report.seconds_per_batch_before, report.seconds_per_batch_after = before, after
        warning = slowdown_warning(report, "GPU" if tf.config.list_physical_devices("GPU") else "CPU")
        if warning:
            log.warning("%s", warning)
    if not relative <= tolerance:
        raise ConversionError(
            f"converted outputs differ from the original by {relative:.3g} (relative), more than the "
            f"tolerance {tolerance:.3g}; the model may need precision.float32_layers for unstable layers"
        )
    return converted, report


def random_inputs(model, batch: int = 8, seed: int = 0):
    """Seeded inputs of the model's input specs, for a .keras file whose data is unknown: floats uniform
    in [0, 1) (the range image pipelines feed), integers (token ids, masks) in {0, 1} (valid for any vocabulary)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)

    def one(spec):
        shape = [batch] + [d or 8 for d in spec.shape[1:]]
        dtype = tf.as_dtype(spec.dtype)
        values = rng.uniform(0, 1, shape) if dtype.is_floating else rng.integers(0, 2, shape)
        return tf.constant(values, dtype)

    return tf.nest.map_structure(one, model.inputs if len(model.inputs) > 1 else model.inputs[0])


@reports_errors()
def main(argv=None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder, a checkpoint (folder or ckpt-N prefix) or a .keras file")
    parser.add_argument("--policy", required=True, help="float32 | mixed_float16 | mixed_bfloat16")
    parser.add_argument("--out", required=True, help="folder for model.keras and conversion.json")
    parser.add_argument("--tolerance", type=float, default=None)
    parser.add_argument("--eval-steps", type=int, default=None, help="eval batches for the before/after metrics "
                        "(default: the run's trainer.eval_steps, else the whole eval set)")
    args = parser.parse_args(argv)
    log_command_to_stderr(logging.INFO)  # TensorFlow's lines once (trainer/console.py)

    from trainer.evaluate import evaluate_run
    from trainer.runs import checkpoint_of, load_trained_model

    out = Path(args.out)
    if args.eval_steps is not None and args.eval_steps < 1:
        raise ConversionError(f"--eval-steps {args.eval_steps}: must be >= 1")
    model, sample = load_trained_model(args.source)
    from_run = Path(args.source).suffix != ".keras"
    if not from_run:
        sample = random_inputs(model)
    converted, report = convert_model(model, args.policy, sample, tolerance=args.tolerance)
    if from_run:  # the recipe's metrics on its eval set, before and after
        checkpoint = checkpoint_of(args.source)
        report.inputs = "a batch of the recipe's eval split"
        report.eval_before = evaluate_run(checkpoint, model=model, policy="float32", steps=args.eval_steps)
        report.eval_after = evaluate_run(checkpoint, model=converted, policy=args.policy, steps=args.eval_steps)
    else:
        report.inputs = "8 seeded random inputs (floats uniform in [0, 1), integers in {0, 1})"
    out.mkdir(parents=True, exist_ok=True)
    converted.save(out / "model.keras")
    (out / "conversion.json").write_text(json.dumps(asdict(report), indent=1))
    for key, value in asdict(report).items():
        print(f"{key:26s} {value}")
    print(f"wrote {out / 'model.keras'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
