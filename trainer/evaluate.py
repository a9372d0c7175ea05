"""Evaluate any checkpoint of a run, touching nothing of its training state.

    python -m trainer.evaluate RUN [--checkpoint latest|best|ckpt-N] [--out FILE]
        [data.batch_size=32 trainer.eval_steps=5 ...]

The model is rebuilt from the run's own config (.hydra/config.yaml) under the run's precision, the chosen
checkpoint's weights are restored read-only (trainer.runs.load_trained_model), and the recipe's loss and
metrics are computed over its eval split exactly as training's evaluation does (the same Trainer test
step, eval_steps and XLA setting): the figures equal the eval logged in metrics.jsonl at that step. They
are printed and written as JSON to RUN/eval/<checkpoint>.json (best/ckpt-N: best-ckpt-N.json), or --out,
with "eval_steps": the number of eval batches they were computed on. A run folder that cannot be written
(read-only) gets the figures printed only, and says so (exit 0).

Only data.* and trainer.* keys can be overridden (the model must stay the one the checkpoint holds).
Exit codes: 0 done, 2 a user error (no such run, checkpoint or key; a value out of range), said in one line.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from trainer.console import log_command_to_stderr
from trainer.assemble import trainer_for
from trainer.errors import EXIT_USER_ERROR, report_error, reports_errors  # noqa: F401 - EXIT_USER_ERROR: importable here before
from trainer.runs import (OVERRIDABLE, RunCheckpoint, ServingError, apply_overrides, checkpoint_of, eval_inputs,
                          load_run, resolve_checkpoint)

log = logging.getLogger(__name__)

# Where these lived before trainer.runs and trainer.assemble: `from trainer.evaluate import load_run` works.
__all__ = ["EXIT_USER_ERROR", "OVERRIDABLE", "RunCheckpoint", "ServingError", "apply_overrides", "checkpoint_of",
           "eval_inputs", "evaluate_checkpoint", "evaluate_run", "load_run", "main", "resolve_checkpoint",
           "trainer_for"]


def evaluate_run(checkpoint: RunCheckpoint, model=None, policy: str = None, steps: int = None) -> Dict[str, Any]:
    """The recipe's loss and metrics of the checkpoint (or of `model` computing in `policy`, e.g. a
    converted copy) on the eval split: trainer.eval_steps (or limit_eval_batches) batches, or `steps`."""
    return evaluate_checkpoint(checkpoint, model, policy, steps)[0]


def evaluate_checkpoint(checkpoint: RunCheckpoint, model=None, policy: str = None,
                        steps: int = None) -> Tuple[Dict[str, Any], int]:
    """evaluate_run's metrics, and the number of eval batches they were computed on."""
    from trainer.data import build_data
    from trainer.inputs import sample_batch

    data = build_data(checkpoint.cfg.data)
    if data.eval is None:
        raise ServingError(f"recipe {checkpoint.cfg.get('recipe')!r}'s data has no eval split (data.*: set one, e.g. "
                           "data.validation_split=0.1 for an image folder)")
    trainer = trainer_for(checkpoint, model=model, policy=policy)
    sample, _ = sample_batch(data.eval, trainer.strategy)
    trainer.build(sample)
    logs = trainer.evaluate(data.eval, step=checkpoint.step, steps=steps)
    return {k: v for k, v in logs.items() if k not in ("step", "split")}, trainer.eval_batches


@reports_errors()
def main(argv: List[str] = None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    # nargs="?", checked below: with a required one, argparse's intermixed parsing names the optional overrides as
    # required too ("required: run, overrides")
    parser.add_argument("run", nargs="?", help="a run folder (with .hydra/config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="latest (default) | best | ckpt-N | best/ckpt-N")
    parser.add_argument("--out", default=None, help="the metrics JSON file (default: RUN/eval/<checkpoint>.json)")
    parser.add_argument("overrides", nargs="*", help="data.*/trainer.* key=value, e.g. trainer.eval_steps=5")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    if args.run is None:
        parser.error("the following arguments are required: run (a run folder; data.*/trainer.* overrides may "
                     "follow)")
    log_command_to_stderr(logging.WARNING)  # TensorFlow's lines once (trainer/console.py)
    checkpoint = load_run(args.run, args.checkpoint, args.overrides)
    metrics, batches = evaluate_checkpoint(checkpoint)
    out = Path(args.out) if args.out else checkpoint.run / "eval" / f"{checkpoint.name}.json"
    record = {"run": str(checkpoint.run), "checkpoint": checkpoint.prefix, "step": checkpoint.step,
              "overrides": list(args.overrides), "eval_steps": batches, "metrics": metrics}
    print(f"{checkpoint.name} (step {checkpoint.step}): " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1))
    except OSError as e:  # a read-only or full run folder: the figures above are the result
        if args.out:
            return report_error(ServingError(f"--out {out} cannot be written ({e.strerror or e}). Fix: give "
                                             "a file you can write to."))
        print(f"not written: {out} cannot be written ({e.strerror or e}); the figures above are the result. "
              "To keep them as JSON: --out FILE (a place you can write to).")
        return 0
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
