"""Export a trained model: a SavedModel, a .keras file, ONNX or TFLite (LiteRT), each checked.

    python -m trainer.export RUN_DIR --format saved_model|keras|onnx|tflite --out PATH [--checkpoint latest|best|ckpt-N] [--policy float32]

RUN_DIR may also be its checkpoints/ folder or one ckpt-N prefix. The model is rebuilt from the run's
own config (.hydra/config.yaml) under float32 (mixed policies keep float32 variables, so this is the
exact trained model computed in float32), and its weights are restored from the newest checkpoint (or
--checkpoint). `--policy mixed_bfloat16` (or mixed_float16) exports a converted copy instead (see
trainer.convert). Every export is loaded back (trainer/export_formats.py) and its outputs compared with
the trained model's (float32) on --check-batches batches of the recipe's eval split.

Exit codes: 0 written and checked; 2 a user error (no run or checkpoint, --out not empty, a missing package:
the message gives the pip command); 3 written, but its outputs differ beyond --tolerance (kept for a look).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Tuple

log = logging.getLogger(__name__)


def find_run(source: Path) -> Tuple[Path, str]:
    from trainer.checkpoint import CheckpointError, list_checkpoints

    if (source / ".hydra" / "config.yaml").exists():
        run, ckpts = source, source / "checkpoints"
        found = list_checkpoints(ckpts)
        if not found:
            raise CheckpointError(f"{source} has no checkpoints/ckpt-N; train it first")
        return run, found[0][1]
    if source.is_dir() and (source.parent / ".hydra" / "config.yaml").exists():
        found = list_checkpoints(source)
        if not found:
            raise CheckpointError(f"{source} has no ckpt-N checkpoints")
        return source.parent, found[0][1]
    if Path(str(source) + ".index").exists():
        for run in (source.parent.parent, source.parent.parent.parent):
            if (run / ".hydra" / "config.yaml").exists():
                return run, str(source)
    raise FileNotFoundError(
        f"{source} is not a run folder (with .hydra/config.yaml), its checkpoints/ folder, a ckpt-N prefix, "
        "or a .keras file"
    )


def load_trained_model(source: str, policy: str = "float32") -> Tuple[Any, Any]:
    """Returns (model, sample_inputs) for a run folder / checkpoint / .keras file, under `policy`."""
    import keras
    import tensorflow as tf
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from trainer.checkpoint import warm_start
    from trainer.precision import set_policy

    path = Path(source).expanduser()
    set_policy(policy)
    if path.suffix == ".keras":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        model = keras.saving.load_model(path, compile=False)
        sample = tf.nest.map_structure(
            lambda t: tf.zeros([2] + list(t.shape[1:]), t.dtype), model.inputs if len(model.inputs) > 1 else model.inputs[0]
        )
        return model, sample
    run, prefix = find_run(path)
    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    data = instantiate(cfg.data, _convert_="all")
    source_ds = data.eval or data.train
    batch = next(iter(source_ds(tf.distribute.InputContext())))
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batch)
    sample = tf.nest.map_structure(lambda t: t[:8], x)
    model = instantiate(cfg.model, _convert_="all")
    if isinstance(model, dict):
        from trainer.checkpoint import CheckpointError

        raise CheckpointError(f"{run} trained several models ({sorted(model)}, e.g. recipe=gan): export takes one. "
                              "Fix: in Python, rebuild them, restore the checkpoint and save the one you need "
                              "(trainer.models[name].save(...)).")
    model(sample, training=False)  # build
    report = warm_start(model, prefix, purpose="Loading weights")
    if report["missing"] or report["mismatched"]:
        raise ValueError(f"{prefix} does not hold all of this model's weights: {report}")
    log.info("Loaded %s from %s (%d variables)", model.name, prefix, len(report["restored"]))
    from trainer.ema import restore_averages

    restore_averages(model, cfg.get("optimizer"), prefix)  # a run with optimizer.use_ema=true: its averages
    return model, sample


EXIT_MISMATCH = 3


def main(argv=None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    from trainer import export_formats

    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder, its checkpoints/ folder, or a ckpt-N prefix")
    parser.add_argument("--format", choices=export_formats.FORMATS, default="saved_model")
    parser.add_argument("--out", required=True, help="a new folder (onnx/tflite: or a .onnx/.tflite file)")
    parser.add_argument("--checkpoint", default="latest", help="with a run folder: latest (default) | best | ckpt-N")
    parser.add_argument("--policy", default="float32", help="float32 (default) | mixed_float16 | mixed_bfloat16")
    parser.add_argument("--check-batches", type=int, default=2, help="eval batches the export is checked on (default 2)")
    parser.add_argument("--tolerance", type=float, default=None, help="max relative output error (default: 1e-4, "
                        "or the conversion's with --policy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from trainer.convert import ConversionError, convert_model
    from trainer.evaluate import checkpoint_of, eval_inputs, user_error

    out = Path(args.out)
    if (out.is_dir() and any(out.iterdir())) or out.is_file():
        print(f"error: {out} exists and is not empty; choose another --out (nothing was written)", file=sys.stderr)
        return 2
    if args.check_batches < 1:
        print(f"error: --check-batches {args.check_batches}: must be >= 1", file=sys.stderr)
        return 2
    if args.tolerance is not None and not args.tolerance >= 0:  # also NaN
        print(f"error: --tolerance {args.tolerance}: must be >= 0 (0: outputs must match exactly)", file=sys.stderr)
        return 2
    tolerance = args.tolerance
    try:
        export_formats.check_packages(args.format)  # before any work
        checkpoint = checkpoint_of(args.source, args.checkpoint)
        model, sample = load_trained_model(checkpoint.prefix)
        trained = model  # what every export is compared with: the trained model in float32
        if args.policy != "float32":
            model, report = convert_model(model, args.policy, sample)
            tolerance = tolerance if tolerance is not None else report.tolerance
            print(f"converted to {args.policy}: relative output error {report.relative_error:.3g}")
        batches = eval_inputs(checkpoint.cfg, args.check_batches)
        path = export_formats.write(model, args.format, out)
        result = export_formats.check(trained, args.format, path, batches, tolerance if tolerance is not None else export_formats.TOLERANCE)
    except export_formats.ExportMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_MISMATCH
    except (ConversionError, export_formats.ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a user error (no run, checkpoint, data), else a bug with its traceback
        message = user_error(e) or (str(e) if isinstance(e, ValueError) else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} {path} ({checkpoint.name}, step {checkpoint.step})")
    print(f"checked: loaded back, {result.examples} eval examples, max abs error {result.max_abs_error:.3g}, "
          f"relative {result.relative_error:.3g} (tolerance {result.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
