"""What a run saves: the objects of its checkpoints, the fingerprint of the weights it trains, and the
fingerprints of its frozen models, which are in no checkpoint, so a resume compares them instead
(docs/research.md, Frozen models).

Below the Trainer (it reads the Trainer's models, optimizers and state; it imports neither trainer.py nor callbacks).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable

import keras

from trainer import held_state
from trainer.checkpoint import CheckpointError


def checkpoint_objects(trainer, held: bool = True) -> Dict[str, Any]:
    """Everything a checkpoint must hold to continue exactly: every model but the frozen, optimizer and loss scale,
    and (`held`) the state the Trainer subclass holds itself (held_state.py), under `held`, when there is any."""
    saved = {name: m for name, m in trainer.models.items() if name not in trainer.frozen}
    weights = {id(w) for m in trainer.models.values() for w in m.weights}
    # Keras 3 layers keep their dropout RNG state (SeedGenerator) outside model.weights.
    seed_states = [v.value for m in trainer.models.values() for v in m.variables if id(v) not in weights]
    scales = {name: u.loss_scale for name, u in trainer.updaters.items()}
    if len(saved) == 1 and len(trainer.optimizers) == 1:  # the layout of every one-model run
        trained = dict(model=next(iter(saved.values())), optimizer=trainer.optimizer, loss_scale=trainer.loss_scale)
    else:
        trained = dict(models=saved, optimizers=dict(trainer.optimizers), loss_scales=scales)
    objects = dict(trained, step=trainer.step, rng=trainer.rng, best_metric=trainer.best, seed_states=seed_states)
    found = held_state.find(trainer, objects) if held else {}
    return dict(objects, held=held_state.tree(found)) if found else objects


def fingerprint(models: Iterable[keras.Model]) -> str:
    """SHA-256 (16 hex digits) of the models' weights: equal on every worker, and across bit-identical runs."""
    digest = hashlib.sha256()
    for model in models:
        for w in model.weights:
            digest.update(keras.ops.convert_to_numpy(w).tobytes())
    return digest.hexdigest()[:16]


def frozen_fingerprints(trainer) -> Dict[str, str]:
    """Each frozen model's weights fingerprint, by name: what the run's checkpoints were trained against."""
    return {name: fingerprint([trainer.models[name]]) for name in sorted(trainer.frozen)}


def check_frozen_unchanged(record: Path, now: Dict[str, str]) -> None:
    """On resume, after the frozen models were loaded: each must have the weights that the run's last save recorded
    in `record` (checkpoints/configured.json), else the trained models would go on against another teacher.
    A record without fingerprints (a run from before them) or without a model's name checks nothing."""
    try:
        recorded = json.loads(record.read_text()).get("frozen")
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not a dict
        return
    changed = sorted(name for name, value in now.items()
                     if isinstance(recorded, dict) and recorded.get(name, value) != value)
    if changed:
        raise CheckpointError(
            f"The frozen models {changed} have other weights than when this run last saved (fingerprint "
            f"{', '.join(f'{n}: now {now[n]}, then {recorded[n]}' for n in changed)}, per {record}): their builder or "
            "trainer.init_from now loads other weights, and the trained models would resume against them. Fix: give "
            "them the weights the run started with (the same builder and init_from), or start a new run folder "
            "(hydra.run.dir=...), warm-starting the trained models from this one with init_from={name: PATH}.")
