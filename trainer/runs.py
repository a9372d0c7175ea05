"""A trained run folder: its config, its checkpoints, and its model restored from one of them.

    runs/<recipe>/<date_time>/.hydra/config.yaml      the composed config (written once training began)
    runs/<recipe>/<date_time>/checkpoints/ckpt-N      the regular checkpoints (best/ckpt-N: the best kept)

One home for what evaluate, predict, export, convert and the doctor read of a finished run. Below the
commands, above the library (checkpoint, precision, config): it imports no command module.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from trainer.checkpoint import CheckpointError
from trainer.checkpoint_files import list_checkpoints, read_best_index
from trainer.errors import UserError

log = logging.getLogger(__name__)

OVERRIDABLE = ("data.", "trainer.")  # what a served run's config may change: the model stays the checkpoint's


class ServingError(UserError, ValueError):
    """A run, checkpoint, input or override cannot be used (evaluate, predict, export, convert)."""


class RunNotFound(ServingError, FileNotFoundError):
    """The path names no run folder, checkpoints/ folder, ckpt-N prefix or .keras file (a ServingError, as
    load_run raised before, and a FileNotFoundError: `except` clauses written for either still catch it)."""


@dataclass
class RunCheckpoint:
    """A run folder, its config, and one of its checkpoints."""

    run: Path
    cfg: Any  # the run's OmegaConf config, with the overrides applied
    prefix: str  # the ckpt-N prefix to restore
    name: str  # ckpt-N, or best-ckpt-N for a best/ copy
    latest: bool = False  # picked as the newest: if rotation deletes it before loading, the newest left will do

    @property
    def step(self) -> int:
        return int(re.search(r"ckpt-(\d+)$", self.prefix).group(1))

    def load_model(self, policy: str = "float32") -> Tuple[Any, Any]:
        """(trained model under `policy`, sample inputs). When the newest picked was rotated away before loading
        (a run still training), this then names the checkpoint loaded instead: a tool reports what it used."""
        model, sample, prefix = _load_model(self.prefix, policy, self.latest)
        if prefix != self.prefix:
            self.prefix, self.name = prefix, checkpoint_name(prefix)
        return model, sample


def config_path(run: Path) -> Path:
    """Where a run keeps its composed config; its presence is what makes a folder a run folder."""
    return Path(run) / ".hydra" / "config.yaml"


def is_run_folder(path: Path) -> bool:
    return config_path(path).is_file()


# What a folder Trainer(run_dir=...) wrote from Python lacks, and each command's way round it.
PYTHON_RUN = ("{path} was written by Trainer(run_dir=...) from Python: {what} no "
              ".hydra/config.yaml, the recipe the command-line tools rebuild a model and its data from (a model "
              "built in Python has none). Fix: {fix}")
_RESTORE_LATER = ("for this folder later: build the model as before, then trainer.warm_start(model, \"{folder}\") "
                  "restores its newest checkpoint")
EXPORT_FROM_PYTHON = ("save the model as a .keras file from Python and give that file instead: "
                      "trainer.model.save(\"model.keras\") after fit() (" + _RESTORE_LATER + ", then "
                      "model.save(\"model.keras\")), e.g. python -m trainer.export model.keras --format onnx "
                      "--out exported; or export from Python: trainer.model.export(\"model.onnx\", format=\"onnx\") "
                      "(docs/concepts/checkpoints.md, Export).")
SERVE_FROM_PYTHON = ("evaluate or predict from Python with your data: trainer.evaluate(data) or trainer.predict(x) on "
                     "the Trainer that trained it (" + _RESTORE_LATER + ", and Trainer(model=model, loss=..., "
                     "metrics=...).evaluate(data) uses it).")


def not_a_run_folder(path, takes: str = "", fix: str = "give the folder a training run wrote (hydra.run.dir, e.g. "
                     "runs/mnist/<date_time>)", python_fix: Optional[str] = None) -> RunNotFound:
    """The one wording of "this path is no run folder" for every command; `takes`: what else it accepts.
    With `python_fix` (the command's way round), a folder the Python API wrote (or its checkpoints) is said as such."""
    folder = python_run_of(Path(path)) if python_fix else None
    if folder is not None:
        what = ("it holds checkpoints, but" if Path(path).resolve() == folder.resolve() else
                f"its folder {folder} holds checkpoints, but" if Path(path).name == "checkpoints" else
                f"a checkpoint of {folder}, which holds")
        return RunNotFound(PYTHON_RUN.format(path=path, what=what, fix=python_fix.format(folder=folder)))
    return RunNotFound(f"{path} is not a run folder (no .hydra/config.yaml){takes}. Fix: {fix}.")


def python_run_of(path: Path) -> Optional[Path]:
    """The folder Trainer(run_dir=...) wrote from Python (checkpoints/, no .hydra/config.yaml) that `path` is,
    or whose checkpoints/ folder or ckpt-N prefix (best/ckpt-N too) it is; else None."""
    if re.fullmatch(r"ckpt-\d+", path.name):
        path = path.parent.parent if path.parent.name == "checkpoints" else path.parent.parent.parent
    elif path.name == "checkpoints":
        path = path.parent
    checkpoints = path / "checkpoints"
    held = checkpoints.is_dir() and (bool(list_checkpoints(checkpoints)) or (checkpoints / "configured.json").is_file())
    return path if held and not is_run_folder(path) else None


def checkpoint_name(prefix) -> str:
    """ckpt-N, or best-ckpt-N for a copy in best/ (the name evaluate writes its JSON under)."""
    prefix = Path(prefix)
    return ("best-" if prefix.parent.name == "best" else "") + prefix.name


def unreadable(prefix: str) -> Optional[str]:
    """Why the checkpoint cannot be read (a missing .index, one TensorFlow cannot open, a data file cut short
    or missing), else None. The sizes come from the index (trainer/checkpoint_index.py): a truncated file
    reads its index fine and fails only on the tensors past its end, and reading every tensor to find
    that cost as much as loading the checkpoint (gigabytes for a large model). A damaged byte inside a
    complete file is found when the weights load (TensorFlow checks each tensor's checksum)."""
    import tensorflow as tf

    from trainer.checkpoint_index import truncation

    try:
        tf.train.load_checkpoint(prefix)  # opens the index
        return truncation(prefix)
    except Exception as e:  # noqa: BLE001 - TF raises several types (DataLossError, NotFoundError, ...)
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def newest_readable(found: List[Tuple[int, str]], folder: Path) -> str:
    """The newest readable prefix of `found` (newest first), as training's resume falls back: a skipped
    newer one is said; none readable is a CheckpointError (exit 2)."""
    problems = []
    for _, prefix in found:
        why = unreadable(prefix)
        if why is None:
            if problems:
                log.warning("Using %s, the newest readable checkpoint: %s (training's resume falls back the same way).",
                            Path(prefix).name, "; ".join(problems))
            return prefix
        problems.append(f"{Path(prefix).name} is unreadable ({why})")
    raise CheckpointError(f"none of the checkpoints in {folder} is readable: {'; '.join(problems)}. Fix: restore the "
                          "files from a backup, or train the run again (a new run folder).")


def find_run(source: Path) -> Tuple[Path, str]:
    """(run folder, newest readable ckpt-N prefix) of a run folder, its checkpoints/ folder, or one ckpt-N prefix."""
    if is_run_folder(source):
        found = list_checkpoints(source / "checkpoints")
        if not found:
            raise CheckpointError(f"{source} has no checkpoints/ckpt-N; train it first")
        return source, newest_readable(found, source / "checkpoints")
    if source.is_dir() and is_run_folder(source.parent):
        found = list_checkpoints(source)
        if not found:
            raise CheckpointError(f"{source} has no ckpt-N checkpoints")
        return source.parent, newest_readable(found, source)
    if Path(str(source) + ".index").exists():
        for run in (source.parent.parent, source.parent.parent.parent):
            if is_run_folder(run):
                return run, str(source)
    raise not_a_run_folder(source, takes=", nor its checkpoints/ folder, a ckpt-N prefix or a .keras file",
                           python_fix=EXPORT_FROM_PYTHON)


def resolve_checkpoint(run: Path, which: str = "latest") -> Tuple[str, str]:
    """(prefix, name) of `which` = latest | best | ckpt-N in run/checkpoints (ckpt-N also in best/)."""
    folder = run / "checkpoints"
    regular, best = list_checkpoints(folder), list_checkpoints(folder / "best")
    have = [Path(p).name for _, p in regular] + [f"best/{Path(p).name}" for _, p in best]
    if which == "latest":
        if not regular:
            raise ServingError(f"{folder} has no ckpt-N checkpoints. Fix: train the run first, or "
                               "pick another run folder.")
        prefix = newest_readable(regular, folder)
        return prefix, Path(prefix).name
    if which == "best":
        ranked = read_best_index(folder / "best", None)  # a damaged record: the copies, said
        # The entries' paths are absolute when written: find them by step, so a moved run folder works.
        prefixes = [str(folder / "best" / f"ckpt-{e['step']}") for e in ranked]
        kept = [p for p in prefixes if Path(p + ".index").exists()]
        if not kept:
            raise ServingError(f"{folder / 'best'} holds no best checkpoint (the run kept none: trainer.keep_best=0, "
                               f"no eval, or no trainer.best_metric). Fix: --checkpoint latest or one of {have}.")
        _check_readable(kept[0])
        return kept[0], f"best-{Path(kept[0]).name}"
    m = re.fullmatch(r"(best/)?ckpt-(\d+)", which)
    if m:
        where = folder / "best" if m.group(1) else folder
        prefix = where / f"ckpt-{m.group(2)}"
        if (not Path(str(prefix) + ".index").exists() and not m.group(1)
                and (folder / "best" / f"ckpt-{m.group(2)}.index").exists()):
            prefix = folder / "best" / f"ckpt-{m.group(2)}"  # kept only as a best copy
        if Path(str(prefix) + ".index").exists():
            _check_readable(str(prefix))
            return str(prefix), checkpoint_name(prefix)
    raise ServingError(f"--checkpoint {which!r} is not in {folder}. Fix: latest, best, or one of "
                       f"{have or 'none: train first'}.")


def _check_readable(prefix: str) -> None:
    why = unreadable(prefix)
    if why is not None:
        raise CheckpointError(f"{prefix} is unreadable ({why}). Fix: --checkpoint latest (the newest readable one), "
                              "or another ckpt-N.")


def load_run(run: str, which: str = "latest", overrides: Sequence[str] = ()) -> RunCheckpoint:
    """The run's config (with data.*/trainer.* `overrides`) and the checkpoint `which`."""
    folder = Path(run).expanduser()
    if not is_run_folder(folder):
        raise not_a_run_folder(folder, python_fix=SERVE_FROM_PYTHON)
    cfg = OmegaConf.load(config_path(folder))
    apply_overrides(cfg, overrides)
    prefix, name = resolve_checkpoint(folder, which)
    return RunCheckpoint(folder, cfg, prefix, name, latest=which == "latest")


def checkpoint_of(source: str, which: str = "latest") -> RunCheckpoint:
    """A run folder (with `which`), its checkpoints/ folder, or a ckpt-N prefix (as trainer.export takes)."""
    path = Path(source).expanduser()
    if is_run_folder(path):
        return load_run(source, which)
    run, prefix = find_run(path)
    return RunCheckpoint(run, OmegaConf.load(config_path(run)), prefix, checkpoint_name(prefix))


def apply_overrides(cfg, overrides: Sequence[str]) -> None:
    """Sets Hydra-style key=value overrides of existing data.* / trainer.* keys; checks trainer.* ranges."""
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config import ConfigError, TrainerConfig, check_ranges

    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.startswith(OVERRIDABLE):
            raise ServingError(f"{item!r}: overrides are key=value of data.* or trainer.* keys (the model must stay "
                               "the one the checkpoint holds), e.g. data.batch_size=32 trainer.eval_steps=5")
        if OmegaConf.select(cfg, key, default="<missing>", throw_on_missing=False) == "<missing>":
            from trainer.config_check import missing_key_problem

            raise ServingError(missing_key_problem(item, cfg, "this run's config"))  # as python -m trainer says it
        try:
            cfg.merge_with(OmegaConf.from_dotlist([item]))
            trainer = OmegaConf.merge(OmegaConf.structured(TrainerConfig), cfg.trainer)
        except OmegaConfBaseException as e:
            raise ServingError(f"{item!r}: {str(e).splitlines()[0]}") from None
        try:
            check_ranges(TrainerConfig, {f.name: trainer[f.name] for f in dataclasses.fields(TrainerConfig)}, "trainer")
        except ConfigError as e:
            raise ServingError(str(e)) from None


def eval_inputs(cfg, batches: int) -> List[Any]:
    """The inputs (no labels) of the first `batches` batches of the recipe's eval split (else train split)."""
    import keras

    return [keras.utils.unpack_x_y_sample_weight(batch)[0] for batch in eval_dataset(cfg).take(batches)]


def load_trained_model(source: str, policy: str = "float32", newest_if_gone: bool = False) -> Tuple[Any, Any]:
    """Returns (model, sample_inputs) for a run folder / checkpoint / .keras file, under `policy`.
    `newest_if_gone`: `source` was picked as the newest checkpoint, so if a run still training rotated it
    away since, the newest left is what was asked for; a checkpoint the user named is never replaced."""
    return _load_model(source, policy, newest_if_gone)[:2]


def _load_model(source: str, policy: str, newest_if_gone: bool) -> Tuple[Any, Any, str]:
    """load_trained_model's (model, sample_inputs), and the prefix (or .keras file) actually loaded."""
    import keras
    import tensorflow as tf

    from trainer.precision import set_policy

    path = Path(source).expanduser()
    set_policy(policy)
    if path.suffix == ".keras":
        return (*_load_keras_file(path), str(path))
    gone = re.fullmatch(r"ckpt-\d+", path.name) and path.parent.is_dir() and not Path(str(path) + ".index").exists()
    if gone and not newest_if_gone:
        have = [Path(p).name for _, p in list_checkpoints(path.parent)]
        raise CheckpointError(f"{path} does not exist (a run still training keeps only its newest checkpoints). "
                              f"Fix: one of {have or 'none: train first'}, or --checkpoint latest.")
    if gone:
        path = Path(_newest_left(path))
    run, prefix = find_run(path)
    picked = newest_if_gone or prefix != str(path)  # not a checkpoint the user named: an older one will do
    cfg = OmegaConf.load(config_path(run))
    x, _, _ = keras.utils.unpack_x_y_sample_weight(next(iter(eval_dataset(cfg))))
    sample = tf.nest.map_structure(lambda t: t[:8], x)
    while True:
        model = _build_model(cfg, run, sample)
        try:
            _restore(model, cfg, prefix)
            break
        except tf.errors.OpError as e:  # a damaged byte in a complete file: a tensor's checksum (see unreadable)
            prefix = _after_failed_load(prefix, picked, e)
    return model, sample, prefix


def _newest_left(path: Path) -> str:
    """The newest checkpoint next to `path`, which a run still training deleted (keep_checkpoints rotation)
    since a tool picked it as the newest."""
    newer = list_checkpoints(path.parent)
    if not newer:
        raise CheckpointError(f"{path} was deleted while it was being loaded, and {path.parent} holds no other "
                              "checkpoint. Fix: run the command again once the run has saved one.")
    log.warning("%s was deleted while it was being loaded (the run is still training and keeps only its newest "
                "checkpoints): using %s, the newest left.", path.name, Path(newer[0][1]).name)
    return newer[0][1]


def _build_model(cfg, run: Path, sample):
    """The run's model, built on `sample` (a fresh one for each checkpoint tried)."""
    from hydra.utils import instantiate

    model = instantiate(cfg.model, _convert_="all")
    if isinstance(model, dict):
        raise CheckpointError(f"{run} trained several models ({sorted(model)}, e.g. recipe=gan): export takes one. "
                              "Fix: in Python, rebuild them, restore the checkpoint and save the one you need "
                              "(trainer.models[name].save(...)).")
    model(sample, training=False)  # build
    return model


def _restore(model, cfg, prefix: str) -> None:
    from trainer.ema import restore_averages

    restore_weights(model, prefix)
    restore_averages(model, cfg.get("optimizer"), prefix)  # a run with optimizer.use_ema=true: its averages


def _after_failed_load(prefix: str, picked: bool, error) -> str:
    """The checkpoint to try after `prefix` failed to load: the newest left if rotation deleted it meanwhile,
    else (one picked as the newest) the newest readable older one, said; a named one is a CheckpointError."""
    if picked and not Path(prefix + ".index").exists():
        return _newest_left(Path(prefix))
    why = (str(error).strip().splitlines() or [""])[0][:200]
    step = int(re.search(r"ckpt-(\d+)$", prefix).group(1))
    older = [p for s, p in list_checkpoints(Path(prefix).parent) if s < step and unreadable(p) is None]
    if not picked or not older:
        raise CheckpointError(f"{prefix} is damaged ({why}). Fix: --checkpoint with an older one "
                              f"({[Path(p).name for p in older] or 'none readable: train again'}).") from None
    log.warning("%s is damaged (%s): using %s, the newest readable one.", Path(prefix).name, why, Path(older[0]).name)
    return older[0]


def restore_weights(model, prefix: str) -> None:
    """Restores a built model's weights from a run's checkpoint, read-only; a weight it lacks is a ServingError."""
    from trainer.load_weights import warm_start

    report = warm_start(model, prefix, purpose="Loading weights")
    if report["missing"] or report["mismatched"]:
        raise ServingError(f"{prefix} does not hold all of this model's weights: {report}")
    log.info("Loaded %s from %s (%d variables)", model.name, prefix, len(report["restored"]))


def eval_dataset(cfg):
    """The recipe's eval split (else its train split) as one input pipeline's dataset."""
    import tensorflow as tf

    from trainer.data import build_data

    data = build_data(cfg.data)
    return (data.eval or data.train)(tf.distribute.InputContext())


def _load_keras_file(path: Path) -> Tuple[Any, Any]:
    """(model, two zero inputs of its input specs) of a .keras file."""
    import keras
    import tensorflow as tf

    import trainer.float32_outputs  # noqa: F401  (registers trainer>Float32Outputs: a model saved under a mixed policy)
    import trainer.fused_elementwise  # noqa: F401  (registers trainer>LayerNormalization and trainer>gelu)
    import trainer.layers  # noqa: F401  (registers trainer>BatchNormalization, which the recipes' models hold)

    if not path.is_file():
        raise RunNotFound(f"{path} does not exist")
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, TypeError) as e:  # not a .keras archive, one Keras cannot read, an unknown layer
        raise ServingError(f"{path} cannot be loaded as a Keras model ({e}). Fix: give a file model.save() wrote, "
                           "or the run folder.") from e
    sample = tf.nest.map_structure(
        lambda t: tf.zeros([2] + list(t.shape[1:]), t.dtype), model.inputs if len(model.inputs) > 1 else model.inputs[0]
    )
    return model, sample
