"""A model's weights alone, from a checkpoint or a Keras file: warm starts (`trainer.init_from`, one model or
several by name) and the trained model that export, evaluate and the doctor load from a run.

Below the Trainer, beside checkpoint.py (whose files it reads); it imports no command module.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

import keras

from trainer.checkpoint import CheckpointError
from trainer.checkpoint_files import list_checkpoints
from trainer.checkpoint_graph import saved_form
from trainer.config import ConfigError, as_given

log = logging.getLogger(__name__)

InitFrom = Union[str, os.PathLike, Mapping[str, Union[str, os.PathLike]], None]


def _setting(path: str, name: Optional[str]) -> str:
    """How the user wrote it, for messages: trainer.init_from='PATH' or trainer.init_from={name: 'PATH'}."""
    return f"trainer.init_from={path!r}" if name is None else f"trainer.init_from={{{name}: {path!r}}}"


def _resolve_checkpoint(path: str, setting: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p, p / "checkpoints"):
            found = list_checkpoints(candidate)
            if found:
                return found[0][1]
        raise CheckpointError(f"{setting}: no ckpt-N.index in it or in its checkpoints/")
    if Path(str(p) + ".index").exists():
        return str(p)
    raise CheckpointError(f"{setting} is not a checkpoint (folder, ckpt prefix), .keras or .weights.h5 file")


def _keras_file(model, path: str, purpose: str, setting: str, name: Optional[str],
                strict: bool) -> Dict[str, List[str]]:
    """warm_start from a .keras or .weights.h5 file, through Keras' loader (strict: skipping nothing). The file's
    model and this one are matched as the same form: either one inside trainer's float32-output wrapper (a model
    trained under a mixed policy) loads into, or from, the model it wraps. What Keras could not load is said."""
    from trainer.float32_outputs import Float32Outputs  # registers the class a mixed-policy .keras file names

    if not Path(path).is_file():
        raise CheckpointError(f"{setting} does not exist")
    target = model
    try:
        if path.endswith(".keras"):
            source = keras.saving.load_model(path, compile=False)
            if isinstance(source, Float32Outputs) and not isinstance(model, Float32Outputs):
                source = source.inner
            elif isinstance(model, Float32Outputs) and not isinstance(source, Float32Outputs):
                target = model.inner
            with tempfile.TemporaryDirectory() as tmp:
                source.save_weights(Path(tmp) / "w.weights.h5")
                failed, why = _load_weights_file(target, Path(tmp) / "w.weights.h5", strict)
        else:
            failed, why = _load_weights_file(target, path, strict)
            if failed is None and isinstance(model, Float32Outputs):  # nothing loaded: perhaps the wrapped model's
                target = model.inner
                failed, why = _load_weights_file(target, path, strict)
    except ValueError as e:
        if not strict:
            raise
        raise CheckpointError(f"{setting}: frozen model {name!r} does not fit {path} "
                              f"({str(e).strip()[:300]}). A frozen model never trains, so every variable must load. "
                              "Fix: name the file of this model's weights, or build the model "
                              "as it was saved") from None
    if failed is None:
        raise CheckpointError(f"{setting}: no layer of this model loaded from {path} (Keras' loader: {why}). Fix: "
                              "give the file of this model's weights, or build the model as it was saved")
    report = {"restored": [v.path for v in model.weights if v.path not in failed], "missing": sorted(failed),
              "unexpected": [], "mismatched": []}
    if failed:
        log.warning("%s%s from %s: Keras' loader could not load %d variables, left at their initial values: %s "
                    "(%s)", purpose, "" if name is None else f" of {name}", path, len(failed), sorted(failed)[:6], why)
    log.info("%s%s from %s: Keras loader, restored %d variables, not loaded %d", purpose,
             "" if name is None else f" of {name}", path, len(report["restored"]), len(failed))
    return report


def _load_weights_file(model, path, strict: bool) -> Tuple[Optional[Set[str]], str]:
    """Loads a .weights.h5 file into `model`: (the paths of the variables Keras' loader could not load, its
    example error), or (None, why) when it loaded none. Keras only warns about them ("N objects could not be
    loaded"), naming layers: their variables are what stayed at their initial values."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.load_weights(path, skip_mismatch=not strict)
    failed_layers, why = set(), ""
    for warning in caught:
        text = str(warning.message)
        if "could not be loaded" not in text:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
            continue
        head, _, listed = text.partition("List of objects that could not be loaded:")
        failed_layers |= set(re.findall(r"name=([^,>]+)", listed))
        why = " ".join(head.split())[:300]
    layers = [layer for layer in model._flatten_layers(include_self=True, recursive=True) if layer.weights]
    failed = {v.path for layer in layers if layer.name in failed_layers for v in layer.weights}
    if failed_layers and not failed_layers & {layer.name for layer in layers}:  # objects we cannot name: all
        failed = {v.path for v in model.weights}
    return (None if failed and failed >= {v.path for v in model.weights} else failed), why


def _held_models(saved) -> List[str]:
    """The models a checkpoint holds: `model` (a one-model run) and the names under `models/`."""
    held = {"model"} if any(p.startswith("model/") for p in saved) else set()
    return sorted(held | {p.split("/")[1] for p in saved if p.startswith("models/")})


def _refuse_incomplete(setting, name, prefix, where, saved, restored, missing, mismatched, strict) -> None:
    """A CheckpointError when nothing of the model loaded, or (strict: a frozen model) not all of it."""
    if strict and restored and (missing or mismatched):
        raise CheckpointError(
            f"{setting}: frozen model {name!r} is only partly in {prefix} (its {where}): "
            + "; ".join(f"{what} {found[:6]}" for what, found in (("missing", missing), ("of other shapes", mismatched))
                        if found)
            + ". A frozen model never trains, so these would stay at "
            "their initial values all run. Fix: name a checkpoint of this model (a one-model run's `model`, or a "
            "run of several models that holds it under this name), or build the model as it was saved")
    if not restored:
        what = "this model" if name is None else f"model {name!r}"
        raise CheckpointError(f"{setting}: no variable of {what} is in {prefix} (it holds the models "
                              f"{_held_models(saved)}). Fix: name a checkpoint of this model"
                              + ("" if name is None else ", or give it the name that checkpoint holds it under"))


def _mostly_new(restored: int, variables: int, mismatched: List[str], drop: str) -> str:
    """Why a warm start that restored under half of the model's variables is said loudly: the rest start as built."""
    cause = ("the checkpoint's model has other shapes (another width: model.hidden_units, a head of another number "
             "of classes)" if mismatched else "the checkpoint holds another model (other layers)")
    return (f". Only {restored} of this model's {variables} variables loaded: the others keep their initial values, "
            f"as if untrained; {cause}. Fix: build the model as the checkpoint's run did (its .hydra/config.yaml), "
            f"or drop {drop} to train from scratch")


def _layer_path(variable, checkpoint_path: str) -> str:
    """A model variable as the log names it: by its layer (`hidden/kernel`, Keras' variable path), which the user
    wrote, not the checkpoint's object path (`model/_functional/_operations/1/_kernel`)."""
    return str(getattr(variable, "path", "") or checkpoint_path)


def _match(model, prefix: str, name: Optional[str]):
    """(reader, rows, saved, where) of match_variables for the checkpoint's object that holds this model: its
    `models/<name>`, else a one-model run's `model`; in each, as saved or through trainer's float32-output wrapper
    (checkpoint_graph.saved_form). The first that holds any of its variables, else the first."""
    first = None
    for where in (["model"] if name is None else [f"models/{name}", "model"]):
        _, at, reader, rows, saved = saved_form(model, prefix, where)
        first = first or (reader, rows, saved, at)
        if any(key for _, _, key, _ in rows):
            return reader, rows, saved, at
    return first


def warm_start(model, path: Union[str, os.PathLike], purpose: str = "Warm start", name: Optional[str] = None,
               strict: bool = False, setting: Optional[str] = None, *, drop: Optional[str] = None
               ) -> Dict[str, List[str]]:
    """Loads model weights only (no optimizer, no step) and reports restored / missing / unexpected.

    `purpose` starts the log line: "Warm start" for trainer.init_from, "Loading weights" for export/doctor.
    `name`: the Trainer's name of the model (init_from={name: path}): a checkpoint of several models gives its
    `models/<name>`, one of a one-model run its `model`; None: the `model` of a one-model run.
    `setting`: what the user wrote, for errors (trainer.init_from=...); None: this Python call.
    `drop`: what to drop to train from scratch, as the user wrote it, said when a warm start loads under half of
    the model; None: `setting`.

    TF checkpoints are matched by object structure, one variable at a time, so a new head of another
    shape is reported as mismatched and left at its initial value; .keras/.weights.h5 files go through
    Keras' own loader (matching by layer, skipping mismatched shapes, said). A model trained under a mixed
    policy (inside trainer's float32-output wrapper) loads into the plain model, and the reverse.
    `strict` (a frozen model, which never trains: a part left at its initial value would stay random all run):
    any variable missing or of another shape is a CheckpointError, and Keras' loader skips nothing.
    """
    path = os.fspath(path)
    setting = setting or f"warm_start(model, {path!r})"
    if path.endswith(".keras") or path.endswith(".weights.h5"):
        return _keras_file(model, path, purpose, setting, name, strict)
    prefix = _resolve_checkpoint(path, setting)
    reader, rows, saved, where = _match(model, prefix, name)
    restored, missing, mismatched, said_missing, said_mismatched = [], [], [], [], []
    for path_in, var, key, shape in rows:
        if key is None:
            missing.append(path_in)
            said_missing.append(_layer_path(var, path_in))
        elif list(shape) != list(var.shape):
            mismatched.append(f"{path_in} {shape} vs {list(var.shape)}")
            said_mismatched.append(f"{_layer_path(var, path_in)} {shape} vs {list(var.shape)}")
        else:
            var.assign(reader.get_tensor(key))
            restored.append(path_in)
    ours = {path_in for path_in, *_ in rows}
    unexpected = sorted(p for p in saved if p.startswith(f"{where}/") and p not in ours)
    if strict:  # a frozen model's error alone: the restored count before it would read like success
        _refuse_incomplete(setting, name, prefix, where, saved, restored, missing, mismatched, strict)
    # a warm start that left most of the model as built; another purpose (export's restore) refuses any gap after
    mostly_new = purpose == "Warm start" and restored and len(restored) * 2 < len(rows)
    log.log(
        logging.WARNING if mostly_new else logging.INFO,
        "%s%s from %s (its %s): restored %d variables, missing %d %s, mismatched %d %s, unexpected %d %s%s",
        purpose, "" if name is None else f" of {name}", prefix,
        f"{where}, a one-model run's" if where.split("/")[0] == "model" and name is not None else where,
        len(restored), len(missing), said_missing[:5], len(mismatched), said_mismatched[:5], len(unexpected),
        unexpected[:5],
        _mostly_new(len(restored), len(rows), mismatched, drop or setting) if mostly_new else "",
    )
    _refuse_incomplete(setting, name, prefix, where, saved, restored, missing, mismatched, strict)
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
                      frozen: Iterable[str] = (), cli: bool = True) -> None:
    """Warm-starts each model of `targets` (init_from_targets' mapping) from its checkpoint; a frozen one strictly
    (every variable, see warm_start). `cli`: the setting was the override (else Trainer(init_from=...))."""
    for name, path in targets.items():
        setting = "trainer.init_from" if cli else "Trainer(init_from=...)"
        warm_start(next(iter(models.values())) if name is None else models[name], path, name=name,
                   strict=name in frozen, setting=_setting(path, name),
                   drop=setting if name is None else f"{name!r} from {setting}")
