"""Evaluate any checkpoint of a run, touching nothing of its training state.

    python -m trainer.evaluate RUN [--checkpoint latest|best|ckpt-N] [--out FILE] [data.batch_size=32 trainer.eval_steps=5 ...]

The model is rebuilt from the run's own config (.hydra/config.yaml) under the run's precision, the chosen
checkpoint's weights are restored read-only (trainer.export.load_trained_model), and the recipe's loss and
metrics are computed over its eval split exactly as training's evaluation does (the same Trainer test
step, eval_steps and XLA setting): the figures equal the eval logged in metrics.jsonl at that step. They
are printed and written as JSON to RUN/eval/<checkpoint>.json (best/ckpt-N: best-ckpt-N.json), or --out,
with "eval_steps": the number of eval batches they were computed on.

Only data.* and trainer.* keys can be overridden (the model must stay the one the checkpoint holds).
Exit codes: 0 done, 2 a user error (no such run, checkpoint or key; a value out of range), said in one line.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
OVERRIDABLE = ("data.", "trainer.")


class ServingError(ValueError):
    """A run, checkpoint, input or override cannot be used; the message says why and the fix."""


@dataclass
class RunCheckpoint:
    """A run folder, its config, and one of its checkpoints."""

    run: Path
    cfg: Any  # the run's OmegaConf config, with the overrides applied
    prefix: str  # the ckpt-N prefix to restore
    name: str  # ckpt-N, or best-ckpt-N for a best/ copy

    @property
    def step(self) -> int:
        return int(re.search(r"ckpt-(\d+)$", self.prefix).group(1))


def resolve_checkpoint(run: Path, which: str = "latest") -> Tuple[str, str]:
    """(prefix, name) of `which` = latest | best | ckpt-N in run/checkpoints (ckpt-N also in best/)."""
    from trainer.checkpoint import list_checkpoints

    folder = run / "checkpoints"
    regular, best = list_checkpoints(folder), list_checkpoints(folder / "best")
    have = [Path(p).name for _, p in regular] + [f"best/{Path(p).name}" for _, p in best]
    if which == "latest":
        if not regular:
            raise ServingError(f"{folder} has no ckpt-N checkpoints. Fix: train the run first, or pick another run folder.")
        return regular[0][1], Path(regular[0][1]).name
    if which == "best":
        index = folder / "best" / "best.json"
        ranked = json.loads(index.read_text()) if index.exists() else []
        # The entries' paths are absolute when written: find them by step, so a moved run folder works.
        prefixes = [str(folder / "best" / f"ckpt-{e['step']}") for e in ranked]
        kept = [p for p in prefixes if Path(p + ".index").exists()]
        if not kept:
            raise ServingError(f"{folder / 'best'} holds no best checkpoint (the run kept none: trainer.keep_best=0, "
                               f"no eval, or no trainer.best_metric). Fix: --checkpoint latest or one of {have}.")
        return kept[0], f"best-{Path(kept[0]).name}"
    m = re.fullmatch(r"(best/)?ckpt-(\d+)", which)
    if m:
        where = folder / "best" if m.group(1) else folder
        prefix = where / f"ckpt-{m.group(2)}"
        if not Path(str(prefix) + ".index").exists() and not m.group(1) and (folder / "best" / f"ckpt-{m.group(2)}.index").exists():
            prefix = folder / "best" / f"ckpt-{m.group(2)}"  # kept only as a best copy
        if Path(str(prefix) + ".index").exists():
            return str(prefix), ("best-" if prefix.parent.name == "best" else "") + prefix.name
    raise ServingError(f"--checkpoint {which!r} is not in {folder}. Fix: latest, best, or one of {have or 'none: train first'}.")


def load_run(run: str, which: str = "latest", overrides: Sequence[str] = ()) -> RunCheckpoint:
    """The run's config (with data.*/trainer.* `overrides`) and the checkpoint `which`."""
    from omegaconf import OmegaConf

    folder = Path(run).expanduser()
    config = folder / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ServingError(f"{folder} is not a run folder (no .hydra/config.yaml). Fix: give the folder a training "
                           "run wrote (hydra.run.dir, e.g. runs/mnist/<date_time>).")
    cfg = OmegaConf.load(config)
    apply_overrides(cfg, overrides)
    prefix, name = resolve_checkpoint(folder, which)
    return RunCheckpoint(folder, cfg, prefix, name)


def checkpoint_of(source: str, which: str = "latest") -> RunCheckpoint:
    """A run folder (with `which`), its checkpoints/ folder, or a ckpt-N prefix (as trainer.export takes)."""
    from omegaconf import OmegaConf

    from trainer.export import find_run

    path = Path(source).expanduser()
    if (path / ".hydra" / "config.yaml").exists():
        return load_run(source, which)
    run, prefix = find_run(path)
    name = ("best-" if Path(prefix).parent.name == "best" else "") + Path(prefix).name
    return RunCheckpoint(run, OmegaConf.load(run / ".hydra" / "config.yaml"), prefix, name)


def eval_inputs(cfg, batches: int) -> List[Any]:
    """The inputs (no labels) of the first `batches` batches of the recipe's eval split (else train split)."""
    import keras
    import tensorflow as tf
    from hydra.utils import instantiate

    data = instantiate(cfg.data, _convert_="all")
    dataset = (data.eval or data.train)(tf.distribute.InputContext())
    return [keras.utils.unpack_x_y_sample_weight(batch)[0] for batch in dataset.take(batches)]


def apply_overrides(cfg, overrides: Sequence[str]) -> None:
    """Sets Hydra-style key=value overrides of existing data.* / trainer.* keys; checks trainer.* ranges."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ConfigError, TrainerConfig, check_ranges

    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.startswith(OVERRIDABLE):
            raise ServingError(f"{item!r}: overrides are key=value of data.* or trainer.* keys (the model must stay the "
                               "one the checkpoint holds), e.g. data.batch_size=32 trainer.eval_steps=5")
        if OmegaConf.select(cfg, key, default="<missing>", throw_on_missing=False) == "<missing>":
            section = cfg.get(key.split(".")[0]) or {}
            raise ServingError(f"{key} is not a key of this run's config. Fix: one of {sorted(section)} under {key.split('.')[0]}.")
        try:
            cfg.merge_with(OmegaConf.from_dotlist([item]))
            trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), cfg.trainer)
        except OmegaConfBaseException as e:
            raise ServingError(f"{item!r}: {str(e).splitlines()[0]}") from None
        try:
            check_ranges(TrainerConfig, {f.name: trainer[f.name] for f in dataclasses.fields(TrainerConfig)}, "trainer")
        except ConfigError as e:
            raise ServingError(str(e)) from None


def trainer_for(checkpoint: RunCheckpoint, strategy=None, model=None, policy: str = None):
    """A Trainer holding the run's trained model (restored from `checkpoint`, or `model` when given) with
    the recipe's loss and metrics, its precision (or `policy`: `model`'s) and its trainer settings; it
    writes nothing (no run_dir)."""
    import dataclasses

    import keras
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from trainer.cli import _trainer_class
    from trainer.config import PrecisionConfig, TrainerConfig
    from trainer.core import Trainer
    from trainer.export import load_trained_model

    cfg = checkpoint.cfg
    precision = PrecisionConfig(**OmegaConf.to_container(cfg.precision, resolve=True))
    if policy is not None:
        precision = dataclasses.replace(precision, policy=policy)
    trainer_cfg = TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))
    loss = instantiate(cfg.loss) if cfg.get("loss") is not None else None
    return _trainer_class(cfg.get("trainer_class", "trainer.core.Trainer"), Trainer)(
        model=model or (lambda: load_trained_model(checkpoint.prefix, precision.policy)[0]),
        loss=loss,
        optimizer=keras.optimizers.SGD,  # nothing trains: build() wants one to make its slots
        metrics={name: functools.partial(instantiate, m) for name, m in (cfg.get("metrics") or {}).items()},
        strategy=strategy,
        precision=precision,
        config=trainer_cfg,
        seed=cfg.seed,
    )


def evaluate_run(checkpoint: RunCheckpoint, model=None, policy: str = None, steps: int = None) -> Dict[str, Any]:
    """The recipe's loss and metrics of the checkpoint (or of `model` computing in `policy`, e.g. a
    converted copy) on the eval split: trainer.eval_steps (or limit_eval_batches) batches, or `steps`."""
    return evaluate_checkpoint(checkpoint, model, policy, steps)[0]


def evaluate_checkpoint(checkpoint: RunCheckpoint, model=None, policy: str = None, steps: int = None) -> Tuple[Dict[str, Any], int]:
    """evaluate_run's metrics, and the number of eval batches they were computed on."""
    from hydra.utils import instantiate

    from trainer.inputs import sample_batch

    data = instantiate(checkpoint.cfg.data, _convert_="all")
    if data.eval is None:
        raise ServingError(f"recipe {checkpoint.cfg.get('recipe')!r}'s data has no eval split (data.*: set one, e.g. "
                           "data.validation_split=0.1 for an image folder)")
    trainer = trainer_for(checkpoint, model=model, policy=policy)
    sample, _ = sample_batch(data.eval, trainer.strategy)
    trainer.build(sample)
    logs = trainer.evaluate(data.eval, step=checkpoint.step, steps=steps)
    return {k: v for k, v in logs.items() if k not in ("step", "split")}, trainer.eval_batches


def main(argv: List[str] = None) -> int:
    from trainer.quiet import quiet_tensorflow_import

    quiet_tensorflow_import()
    parser = argparse.ArgumentParser(prog="python -m trainer.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run folder (with .hydra/config.yaml and checkpoints/)")
    parser.add_argument("--checkpoint", default="latest", help="latest (default) | best | ckpt-N | best/ckpt-N")
    parser.add_argument("--out", default=None, help="the metrics JSON file (default: RUN/eval/<checkpoint>.json)")
    parser.add_argument("overrides", nargs="*", help="data.*/trainer.* key=value, e.g. trainer.eval_steps=5")
    args = parser.parse_intermixed_args(argv)  # overrides before or after the options
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        checkpoint = load_run(args.run, args.checkpoint, args.overrides)
        metrics, batches = evaluate_checkpoint(checkpoint)
    except Exception as e:  # noqa: BLE001 - ours, or a user error a builder raised (hydra wraps them)
        message = user_error(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    out = Path(args.out) if args.out else checkpoint.run / "eval" / f"{checkpoint.name}.json"
    record = {"run": str(checkpoint.run), "checkpoint": checkpoint.prefix, "step": checkpoint.step,
              "overrides": list(args.overrides), "eval_steps": batches, "metrics": metrics}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print(f"{checkpoint.name} (step {checkpoint.step}): " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"wrote {out}")
    return 0


def user_error(error: BaseException):
    """The one-line message of a user error anywhere in `error`'s cause chain (hydra's instantiate wraps
    what builders raise), else None: a bug keeps its traceback."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    from trainer.data import DataError
    from trainer.precision import PrecisionError

    ours = (ServingError, CheckpointError, ConfigError, DataError, PrecisionError, FileNotFoundError)
    cause = error
    while cause is not None and not isinstance(cause, ours):
        cause = cause.__cause__
    return None if cause is None else str(cause)


if __name__ == "__main__":
    sys.exit(main())
