"""Export a trained model: a SavedModel, a .keras file, ONNX or TFLite (LiteRT), each checked.

    python -m trainer.export RUN_DIR --format saved_model|keras|onnx|tflite --out PATH
        [--checkpoint latest|best|ckpt-N] [--policy float32]

RUN_DIR may also be its checkpoints/ folder, one ckpt-N prefix, or a .keras file (one model.save() wrote,
e.g. from Python). A run's model is rebuilt from its own config (.hydra/config.yaml) under float32 (mixed
policies keep float32 variables, so this is the exact trained model computed in float32), and its weights
are restored from the newest checkpoint (or --checkpoint). `--policy mixed_bfloat16` (or mixed_float16)
exports a converted copy instead (see trainer.convert). Every export is loaded back
(trainer/export_formats.py) and its outputs compared with the trained model's (float32) on --check-batches
batches of the recipe's eval split (a .keras file carries no data: seeded random inputs, as trainer.convert's).

Exit codes: 0 written and checked; 2 a user error (no run or checkpoint, --out not empty, a missing package:
the message gives the pip command); 3 its outputs differ beyond --tolerance. An export is written beside --out
(`<out>.export-unchecked`; inside an existing empty --out folder, `<out>/.export-unchecked`) and moved there once
its check passed: a failed check or a refused move removes it, an interrupted one leaves only that, which the next
export removes.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, List, Optional, Tuple

from trainer.console import log_command_to_stderr
from trainer.errors import EXIT_NUMERICAL, reports_errors
from trainer.runs import checkpoint_of, eval_inputs, find_run, load_trained_model  # noqa: F401 - find_run: its home before

EXIT_MISMATCH = EXIT_NUMERICAL  # its outputs differ beyond --tolerance (ExportMismatch): removed


def _unfinished(checkpoint) -> Optional[str]:
    """A line saying the run's newest checkpoint is from before its last step (a run stopped early, or still
    training), or None: finished, an older checkpoint asked for, or a run length counted in epochs (unknown here)."""
    trainer_cfg = checkpoint.cfg.get("trainer") or {}
    total = trainer_cfg.get("max_steps") if trainer_cfg.get("epochs") is None else None
    if not checkpoint.latest or not isinstance(total, int) or checkpoint.step >= total:  # an older one: chosen
        return None
    return (f"note: {checkpoint.name} is step {checkpoint.step} of the run's {total} (trainer.max_steps): the run "
            "stopped before its end or is still training; resuming it finishes the training")


@reports_errors()
def main(argv=None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    from trainer import export_formats

    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder, its checkpoints/ folder, a ckpt-N prefix, or a .keras file")
    parser.add_argument("--format", choices=export_formats.FORMATS, default="saved_model")
    parser.add_argument("--out", required=True, help="a new folder (onnx/tflite: or a .onnx/.tflite file)")
    parser.add_argument("--checkpoint", default="latest", help="with a run folder: latest (default) | best | ckpt-N")
    parser.add_argument("--policy", default="float32", help="float32 (default) | mixed_float16 | mixed_bfloat16")
    parser.add_argument("--check-batches", type=int, default=2,
                        help="eval batches the export is checked on (default 2)")
    parser.add_argument("--tolerance", type=float, default=None, help="max relative output error (default: 1e-4, "
                        "or the conversion's with --policy)")
    args = parser.parse_args(argv)
    log_command_to_stderr(logging.INFO)  # TensorFlow's lines once (trainer/console.py)

    from trainer.convert import convert_model

    out = Path(args.out)
    place = out.resolve() if out.is_dir() else out  # a symlink's folder, and `.`, by their real path
    tolerance = args.tolerance
    staging = unchecked_staging(place)  # removes one an interrupted export left
    if (out.is_dir() and any(out.iterdir())) or out.is_file():
        raise export_formats.ExportError(f"{out} exists and is not empty; choose another --out (nothing was written)")
    if args.check_batches < 1:
        raise export_formats.ExportError(f"--check-batches {args.check_batches}: must be >= 1")
    if tolerance is not None and not tolerance >= 0:  # also NaN
        raise export_formats.ExportError(f"--tolerance {tolerance}: must be >= 0 (0: outputs must match exactly)")
    export_formats.check_packages(args.format)  # before any work
    if Path(args.source).suffix == ".keras":
        model, batches, origin, checked_on = _from_keras_file(args.source, args.checkpoint, args.check_batches)
        sample = batches[0]
    else:
        checkpoint = checkpoint_of(args.source, args.checkpoint)
        model, sample = checkpoint.load_model()  # names the one loaded, if rotation replaced the newest
        batches = eval_inputs(checkpoint.cfg, args.check_batches)
        origin, checked_on = f"{checkpoint.name}, step {checkpoint.step}", "eval examples"
        if _unfinished(checkpoint):
            print(_unfinished(checkpoint))
    trained = model  # what every export is compared with: the trained model in float32
    if args.policy != "float32":
        model, report = convert_model(model, args.policy, sample)
        tolerance = tolerance if tolerance is not None else report.tolerance
        print(f"converted to {args.policy}: relative output error {report.relative_error:.3g}")
    try:
        written = export_formats.write(model, args.format, staging)
        result = export_formats.check(trained, args.format, written, batches,
                                      tolerance if tolerance is not None else export_formats.TOLERANCE)
        path = out / _move_into_place(staging, written, place).relative_to(place)
    except BaseException as e:
        _remove(staging)
        if isinstance(e, export_formats.ExportMismatch):
            other = ", or export in float32 (drop --policy)" if args.policy != "float32" else ""
            raise export_formats.ExportMismatch(f"{e}; it was removed, nothing is in {out}. Fix: a larger "
                                                f"--tolerance{other}") from None
        raise
    print(f"wrote {args.format} {path} ({origin})")
    print(f"checked: loaded back, {result.examples} {checked_on}, max abs error {result.max_abs_error:.3g}, "
          f"relative {result.relative_error:.3g} (tolerance {result.tolerance:g})")
    return 0


def unchecked_staging(out: Path) -> Path:
    """Where an export is written until its check passes (then moved to `out`): inside `out` when it is an empty
    folder (a mount point or a symlink's target cannot be replaced), else `out`'s sibling, named for what it is,
    with `out`'s suffix (export_formats.write reads it). One that an export killed before its check left is
    removed, said."""
    inside = out / ".export-unchecked"
    if inside.exists() and [entry.name for entry in out.iterdir()] == [inside.name]:
        _remove(inside)
        print(f"removed {inside}: an earlier export of {out} was stopped before its check (never checked)")
    if out.is_dir():
        return inside
    staging = out.with_name(f"{out.stem}.export-unchecked{out.suffix}")
    if staging.exists():
        _remove(staging)
        print(f"removed {staging}: an earlier export of {out} was stopped before its check (never checked)")
    return staging


def _move_into_place(staging: Path, written: Path, out: Path) -> Path:
    """The checked export moved to `out` (its entries, from inside an empty folder `out`); where `written` is now.
    A refused move (a full disk, a read-only or busy folder) removes what it moved: an ExportError, said."""
    from trainer.export_formats import ExportError

    moved: List[Path] = []
    try:
        if staging.parent == out:
            for entry in sorted(staging.iterdir()):
                os.replace(entry, out / entry.name)
                moved.append(out / entry.name)
            staging.rmdir()
        else:
            os.replace(staging, out)
    except OSError as e:
        for path in moved:
            _remove(path)
        raise ExportError(f"the checked export could not be moved to {out}: {e.strerror or e} ({e.filename}); it "
                          "was removed, nothing is in it. Fix: an --out on a writable file system with room, then "
                          "export again") from None
    return out / written.relative_to(staging)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _from_keras_file(source: str, which: str, batches: int) -> Tuple[Any, List[Any], str, str]:
    """(model in float32, `batches` seeded random input batches, what was loaded, what the check ran on) of a
    .keras file, which holds one model and no data: its inputs are drawn as trainer.convert draws them for one.
    A model saved under a mixed policy computes in float32 here, as a run's model does (its variables are
    float32: the same weights); --policy keeps (or converts to) a reduced precision."""
    from trainer import export_formats
    from trainer.convert import TOLERANCE, convert_model, random_inputs

    if which != "latest":
        raise export_formats.ExportError(f"--checkpoint {which}: a .keras file holds one model's weights, it has no "
                                         "checkpoints to pick from. Fix: drop --checkpoint, or give the run folder.")
    model, _ = load_trained_model(source)
    inputs = [random_inputs(model, seed=seed) for seed in range(batches)]
    reduced = sorted({layer.compute_dtype for layer in model._flatten_layers(include_self=False, recursive=True)}
                     & {"float16", "bfloat16"})
    if reduced:
        model, report = convert_model(model, "float32", inputs[0], tolerance=TOLERANCE[f"mixed_{reduced[0]}"],
                                      measure_time=False)
        print(f"{Path(source).name} computes in {reduced[0]}: exporting it in float32 (relative output error "
              f"{report.relative_error:.3g}; --policy mixed_{reduced[0]} keeps {reduced[0]})")
    return model, inputs, Path(source).name, "seeded random inputs (floats in [0, 1), integers in {0, 1}: a .keras " \
        "file carries no data)"

if __name__ == "__main__":
    sys.exit(main())
