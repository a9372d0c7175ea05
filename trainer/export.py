"""Export a trained model: a SavedModel with a serving signature, or a .keras file.

    python -m trainer.export RUN_DIR --format saved_model|keras --out DIR [--policy float32]

RUN_DIR may also be its checkpoints/ folder or one ckpt-N prefix. The model is rebuilt from the run's
own config (.hydra/config.yaml) under float32 (mixed policies keep float32 variables, so this is the
exact trained model computed in float32), and its weights are restored from the newest checkpoint.
`--policy mixed_bfloat16` (or mixed_float16) exports a converted copy instead (see trainer.convert).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Tuple

log = logging.getLogger(__name__)


def _find_run(source: Path) -> Tuple[Path, str]:
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
    run, prefix = _find_run(path)
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
    report = warm_start(model, prefix)
    if report["missing"] or report["mismatched"]:
        raise ValueError(f"{prefix} does not hold all of this model's weights: {report}")
    log.info("Loaded %s from %s (%d variables)", model.name, prefix, len(report["restored"]))
    from trainer.ema import restore_averages

    restore_averages(model, cfg.get("optimizer"), prefix)  # a run with optimizer.use_ema=true: its averages
    return model, sample


def export_saved_model(model, sample_inputs, out: Path) -> Path:
    """A TF SavedModel with `serve` / `serving_default` signatures (inference mode)."""
    model.export(str(out), format="tf_saved_model", verbose=False)
    return out


def main(argv=None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder, its checkpoints/ folder, or a ckpt-N prefix")
    parser.add_argument("--format", choices=["saved_model", "keras"], default="saved_model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--policy", default="float32", help="float32 (default) | mixed_float16 | mixed_bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from trainer.checkpoint import CheckpointError
    from trainer.convert import ConversionError, convert_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} exists and is not empty; choose another --out (nothing was written)", file=sys.stderr)
        return 2
    try:
        model, sample = load_trained_model(args.source)
        if args.policy != "float32":
            model, report = convert_model(model, args.policy, sample)
            print(f"converted to {args.policy}: relative output error {report.relative_error:.3g}")
    except (CheckpointError, ConversionError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.format == "keras":
        out.mkdir(parents=True, exist_ok=True)
        model.save(out / "model.keras")
        print(f"wrote {out / 'model.keras'}")
    else:
        export_saved_model(model, sample, out)
        print(f"wrote SavedModel {out} (signature: serve)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
