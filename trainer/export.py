"""Export a trained model: a SavedModel, a .keras file, ONNX or TFLite (LiteRT), each checked.

    python -m trainer.export RUN_DIR --format saved_model|keras|onnx|tflite --out PATH
        [--checkpoint latest|best|ckpt-N] [--policy float32]

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

from trainer.errors import EXIT_NUMERICAL, reports_errors
from trainer.runs import checkpoint_of, eval_inputs, find_run, load_trained_model  # noqa: F401 - find_run: its home before

EXIT_MISMATCH = EXIT_NUMERICAL  # written, but its outputs differ beyond --tolerance (ExportMismatch)


@reports_errors()
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
    parser.add_argument("--check-batches", type=int, default=2,
                        help="eval batches the export is checked on (default 2)")
    parser.add_argument("--tolerance", type=float, default=None, help="max relative output error (default: 1e-4, "
                        "or the conversion's with --policy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from trainer.convert import convert_model

    out = Path(args.out)
    tolerance = args.tolerance
    if (out.is_dir() and any(out.iterdir())) or out.is_file():
        raise export_formats.ExportError(f"{out} exists and is not empty; choose another --out (nothing was written)")
    if args.check_batches < 1:
        raise export_formats.ExportError(f"--check-batches {args.check_batches}: must be >= 1")
    if tolerance is not None and not tolerance >= 0:  # also NaN
        raise export_formats.ExportError(f"--tolerance {tolerance}: must be >= 0 (0: outputs must match exactly)")
    export_formats.check_packages(args.format)  # before any work
    checkpoint = checkpoint_of(args.source, args.checkpoint)
    model, sample = checkpoint.load_model()  # names the one loaded, if rotation replaced the newest
    trained = model  # what every export is compared with: the trained model in float32
    if args.policy != "float32":
        model, report = convert_model(model, args.policy, sample)
        tolerance = tolerance if tolerance is not None else report.tolerance
        print(f"converted to {args.policy}: relative output error {report.relative_error:.3g}")
    batches = eval_inputs(checkpoint.cfg, args.check_batches)
    path = export_formats.write(model, args.format, out)
    result = export_formats.check(trained, args.format, path, batches,
                                  tolerance if tolerance is not None else export_formats.TOLERANCE)
    print(f"wrote {args.format} {path} ({checkpoint.name}, step {checkpoint.step})")
    print(f"checked: loaded back, {result.examples} eval examples, max abs error {result.max_abs_error:.3g}, "
          f"relative {result.relative_error:.3g} (tolerance {result.tolerance:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
