"""A model's weights alone, from a checkpoint or a Keras file: warm starts (`trainer.init_from`, one model or
several by name) and the trained model that export, evaluate and the doctor load from a run.

Below the Trainer, beside checkpoint.py (whose files it reads); it imports no command module.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Union

import keras

from trainer.checkpoint import CheckpointError
from trainer.checkpoint_files import list_checkpoints
from trainer.checkpoint_graph import match_variables
from trainer.config import ConfigError, as_given

log = logging.getLogger(__name__)

InitFrom = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]], None]


def _setting(path: str, name: Optional[str]) -> str:
    """How the user wrote it, for messages: trainer.init_from='PATH' or trainer.init_from={name: 'PATH'}."""
    return f"trainer.init_from={path!r}" if name is None else f"trainer.init_from={{{name}: {path!r}}}"


def _resolve_checkpoint(path: str, name: Optional[str] = None) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p, p / "checkpoints"):
            found = list_checkpoints(candidate)
            if found:
                return found[0][1]
        raise CheckpointError(f"{_setting(path, name)}: no ckpt-N.index in it or in its checkpoints/")
    if Path(str(p) + ".index").exists():
        return str(p)
    raise CheckpointError(f"{_setting(path, name)} is not a checkpoint (folder, ckpt prefix), "
                          ".keras or .weights.h5 file")


def _keras_file(model, path: str, purpose: str, name: Optional[str], strict: bool) -> Dict[str, List[str]]:
    """warm_start from a .keras or .weights.h5 file, through Keras' loader (strict: skipping nothing)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{_setting(path, name)} does not exist")
    try:
        if path.endswith(".keras"):
            source = keras.saving.load_model(path, compile=False)
            with tempfile.TemporaryDirectory() as tmp:
                source.save_weights(Path(tmp) / "w.weights.h5")
                model.load_weights(Path(tmp) / "w.weights.h5", skip_mismatch=not strict)
        else:
            model.load_weights(path, skip_mismatch=not strict)
    except ValueError as e:
        if not strict:
            raise
        raise CheckpointError(f"{_setting(path, name)}: frozen model {name!r} does not fit {path} "
                              f"({str(e).strip()[:300]}). A frozen model never trains, so every variable must load. "
                              "Fix: name the file of this model's weights, or build the model "
                              "as it was saved") from None
    # Keras' loader does not say which layers it skipped (it warns about each); the report cannot either.
    report = {"restored": [v.path for v in model.weights], "missing": [], "unexpected": [], "mismatched": []}
    log.info("%s%s from %s: Keras loader, %s", purpose, "" if name is None else f" of {name}", path,
             "every layer loaded" if strict else "layers of mismatched shapes skipped (see its warnings)")
    return report


def _held_models(saved) -> List[str]:
    """The models a checkpoint holds: `model` (a one-model run) and the names under `models/`."""
    held = {"model"} if any(p.startswith("model/") for p in saved) else set()
    return sorted(held | {p.split("/")[1] for p in saved if p.startswith("models/")})


def _refuse_incomplete(path, name, prefix, where, saved, restored, missing, mismatched, strict) -> None:
    """A CheckpointError when nothing of the model loaded, or (strict: a frozen model) not all of it."""
    if strict and restored and (missing or mismatched):
        raise CheckpointError(
            f"{_setting(path, name)}: frozen model {name!r} is only partly in {prefix} (its {where}): "
            + "; ".join(f"{what} {found[:6]}" for what, found in (("missing", missing), ("of other shapes", mismatched))
                        if found)
            + ". A frozen model never trains, so these would stay at "
            "their initial values all run. Fix: name a checkpoint of this model (a one-model run's `model`, or a "
            "run of several models that holds it under this name), or build the model as it was saved")
    if not restored:
        what = "this model" if name is None else f"model {name!r}"
        raise CheckpointError(f"{_setting(path, name)}: no variable of {what} is in {prefix} (it holds the models "
                              f"{_held_models(saved)}). Fix: name a checkpoint of this model"
                              + ("" if name is None else ", or give it the name that checkpoint holds it under"))


def _mostly_new(restored: int, variables: int, mismatched: List[str]) -> str:
    """Why a warm start that restored under half of the model's variables is said loudly: the rest start as built."""
    cause = ("the checkpoint's model has other shapes (another width: model.hidden_units, a head of another number "
             "of classes)" if mismatched else "the checkpoint holds another model (other layers)")
    return (f". Only {restored} of this model's {variables} variables loaded: the others keep their initial values, "
            f"as if untrained; {cause}. Fix: build the model as the checkpoint's run did (its .hydra/config.yaml), "
            "or drop trainer.init_from to train from scratch")


def warm_start(model, path: Union[str, os.PathLike], purpose: str = "Warm start", name: Optional[str] = None,
               strict: bool = False) -> Dict[str, List[str]]:
    """Loads model weights only (no optimizer, no step) and reports restored / missing / unexpected.

    `purpose` starts the log line: "Warm start" for trainer.init_from, "Loading weights" for export/doctor.
    `name`: the Trainer's name of the model (init_from={name: path}): a checkpoint of several models gives its
    `models/<name>`, one of a one-model run its `model`; None: the `model` of a one-model run.

    TF checkpoints are matched by object structure, one variable at a time, so a new head of another
    shape is reported as mismatched and left at its initial value; .keras/.weights.h5 files go through
    Keras' own loader (matching by layer, skipping mismatched shapes).
    `strict` (a frozen model, which never trains: a part left at its initial value would stay random all run):
    any variable missing or of another shape is a CheckpointError, and Keras' loader skips nothing.
    """
    path = os.fspath(path)
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return _keras_file(model, path, purpose, name, strict)
    prefix = _resolve_checkpoint(path, name)
    where = "model" if name is None else f"models/{name}"
    reader, rows, saved = match_variables(model, prefix, where)
    if where != "model" and not any(key for _, _, key, _ in rows):  # not in a checkpoint of several: a one-model run's
        where = "model"
        reader, rows, saved = match_variables(model, prefix, where)
    restored, missing, mismatched = [], [], []
    for path_in, var, key, shape in rows:
        if key is None:
            missing.append(path_in)
        elif list(shape) != list(var.shape):
            mismatched.append(f"{path_in} {shape} vs {list(var.shape)}")
        else:
            var.assign(reader.get_tensor(key))
            restored.append(path_in)
    ours = {path_in for path_in, *_ in rows}
    unexpected = sorted(p for p in saved if p.startswith(f"{where}/") and p not in ours)
    if strict:  # a frozen model's error alone: the restored count before it would read like success
        _refuse_incomplete(path, name, prefix, where, saved, restored, missing, mismatched, strict)
    mostly_new = restored and len(restored) * 2 < len(rows)  # a warm start that left most of the model as built
    log.log(
        logging.WARNING if mostly_new else logging.INFO,
        "%s%s from %s (its %s): restored %d variables, missing %d %s, mismatched %d %s, unexpected %d %s%s",
        purpose, "" if name is None else f" of {name}", prefix,
        "model, a one-model run's" if where == "model" and name is not None else where,
        len(restored), len(missing), missing[:5], len(mismatched), mismatched[:5], len(unexpected), unexpected[:5],
        _mostly_new(len(restored), len(rows), mismatched) if mostly_new else "",
    )
    _refuse_incomplete(path, name, prefix, where, saved, restored, missing, mismatched, strict)
    return {"restored": restored, "missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def init_from_targets(init_from: InitFrom, models: Mapping[str, keras.Model],
                      cli: bool = True) -> Dict[str, Optional[str]]:
    """trainer.init_from as model name -> path, checked: one path for a Trainer of one model, else a mapping
    whose names are the Trainer's models. (The mapping's keys come back; the single form's is None.) An error
    names the setting as its user gave it: the override (`cli`) or Trainer(init_from=...)."""
    if init_from is None or init_from == "" or isinstance(init_from, Mapping) and not init_from:
        return {}
    python = "Trainer(init_from=...)"
    path_like = (str, os.PathLike)
    if not isinstance(init_from, (*path_like, Mapping)) or isinstance(init_from, Mapping) and not all(
            isinstance(k, str) and isinstance(v, path_like) for k, v in init_from.items()):
        forms = ("trainer.init_from=PATH (one model) or trainer.init_from={teacher:PATH} (several)" if cli else
                 "Trainer(init_from=PATH) (one model) or Trainer(init_from={'teacher': PATH}) (several)")
        raise ConfigError(f"{as_given('trainer.init_from', init_from, python, cli)} is neither a path nor model "
                          f"name -> path. Fix: {forms}")
    if isinstance(init_from, path_like):
        init_from = os.fspath(init_from)
        if len(models) > 1:
            first = next(iter(models))
            each = f"trainer.init_from={{{first}:PATH}}" if cli else f"Trainer(init_from={{{first!r}: PATH}})"
            raise ConfigError(f"{as_given('trainer.init_from', init_from, python, cli)} is one path, and this "
                              f"Trainer has several models {sorted(models)}. Fix: say which model each checkpoint "
                              f"is for, e.g. {each}")
        return {None: init_from}
    unknown = sorted(set(init_from) - set(models))
    if unknown:
        setting = "trainer.init_from" if cli else python
        raise ConfigError(f"{setting} names {unknown}, not models of this Trainer (models: {sorted(models)})")
    return {name: os.fspath(path) for name, path in init_from.items()}


def warm_start_models(models: Mapping[str, keras.Model], targets: Mapping[Optional[str], str],
                      frozen: Iterable[str] = ()) -> None:
    """Warm-starts each model of `targets` (init_from_targets' mapping) from its checkpoint; a frozen one strictly
    (every variable, see warm_start)."""
    for name, path in targets.items():
        warm_start(next(iter(models.values())) if name is None else models[name], path, name=name,
                   strict=name in frozen)
