"""python -m trainer.lr_find [--steps 100] [--min 1e-7] [--max 1] [--out DIR] [OVERRIDES...]

The learning-rate range test (Lightning's lr_find) on the model, data and optimizer of a config (the same
overrides as `python -m trainer`): trains --steps steps with a learning rate growing exponentially from
--min to --max, stops when the smoothed loss diverges, and suggests the rate where the smoothed loss fell
fastest. Writes lr_find.json and lr_find.png to --out (default: runs/lr_find/<date_time>); no checkpoint,
no run folder.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from trainer.console import log_command_to_stderr
from trainer.errors import UserError, report_error
from trainer.quiet import quiet_tensorflow_import, quiet_when_loaded
from trainer.signals import now_kept, stops_on_signals

quiet_when_loaded()  # TensorFlow loads (quietly) once the arguments are checked: a mistake answers at once


class LRFindArgumentError(UserError, ValueError):
    """Bad arguments: the message says what and how to fix it (exit 2)."""


def make_parser() -> argparse.ArgumentParser:
    """lr_find's arguments; python -m trainer reads its flags from here too (trainer/argv_check.py)."""
    parser = argparse.ArgumentParser(prog="python -m trainer.lr_find",
                                     description=__doc__.split("\n\n")[1].replace("\n", " "))
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m trainer (recipe=resnet ...)")
    parser.add_argument("--steps", type=int, default=100, help="steps of the test (default 100, Lightning's)")
    parser.add_argument("--min", type=float, default=1e-7, dest="min_lr", help="the first learning rate (default 1e-7)")
    parser.add_argument("--max", type=float, default=1.0, dest="max_lr", help="the last learning rate (default 1)")
    parser.add_argument("--out", help="folder for lr_find.json and lr_find.png (default: runs/lr_find/<date_time>)")
    return parser


def parse_args(argv) -> argparse.Namespace:
    args = make_parser().parse_intermixed_args(argv)  # options may come between overrides
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise LRFindArgumentError(f"{bad[0]!r} is not a config override (key=value) or an option "
                                  "(--steps, --min, --max, --out)")
    return args


def find(cfg, steps: int, min_lr: float, max_lr: float):
    """The range test on the Trainer `python -m trainer` would build from `cfg` (no run folder, no loggers)."""
    from omegaconf import OmegaConf

    from trainer.arrays import with_class_weight
    from trainer.assemble import parts_of, strategy_of
    from trainer.data import build_data, check_batch_size
    from trainer.lr_finder import lr_find

    strategy = strategy_of(cfg)  # before TensorFlow initializes devices
    check_batch_size(cfg.data.get("batch_size", 1))
    data = build_data(cfg.data)
    class_weight = cfg.data.get("class_weight") or None  # weighs the range test as it weighs training
    train = with_class_weight(data.train, None if class_weight is None else OmegaConf.to_container(class_weight))
    trainer = parts_of(cfg, total_steps=steps).build(strategy=strategy)
    return lr_find(trainer, train, steps=steps, min_lr=min_lr, max_lr=max_lr)


@stops_on_signals("the range test wrote nothing; run it again")
def main(argv=None) -> int:
    from trainer.argv_check import problem_in
    from trainer.assemble import compose_config

    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        problem = problem_in(args.overrides)  # as python -m trainer says it (trainer/argv_check.py), at once
        if problem:
            raise LRFindArgumentError(problem)
        quiet_tensorflow_import()
        log_command_to_stderr(logging.INFO)  # TensorFlow's lines once (trainer/console.py)
        logging.getLogger("absl").setLevel(logging.ERROR)
        # not its INFO lines (a "Reduce to" per variable when mirrored)
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
        from trainer.lr_finder import check_settings  # Keras

        check_settings(args.steps, args.min_lr, args.max_lr)  # before the config, data and model are built
        cfg = compose_config(args.overrides, error=LRFindArgumentError)
        out = Path(args.out) if args.out else Path("runs") / "lr_find" / time.strftime("%Y-%m-%d_%H-%M-%S")
        result = find(cfg, args.steps, args.min_lr, args.max_lr)
        result.to_json(out / "lr_find.json")
        now_kept(f"{out / 'lr_find.json'} was written; the plot and the suggestion may be missing: its json has them")
        result.plot(out / "lr_find.png")
    except Exception as e:  # noqa: BLE001 - ours exit with their code and message; a bug keeps its traceback
        code = report_error(e)
        if code is None:
            raise
        return code
    ran = f"{len(result.lrs)} steps, lr {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
    ran += ", stopped where the loss diverged" if result.stopped == "diverged" else ""
    if result.suggestion is None:
        print(f"No suggestion ({ran}): {result.no_suggestion}.")
    else:
        rest = " ".join(shlex.quote(o) for o in args.overrides if not o.startswith("optimizer.lr="))
        print(f"Suggested learning rate: {result.suggestion:.3g} (steepest descent of the smoothed loss; {ran})")
        print(f"Train with: python -m trainer {rest} optimizer.lr={result.suggestion:.3g}".replace("  ", " "))
    print(f"wrote {out / 'lr_find.json'} and {out / 'lr_find.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
