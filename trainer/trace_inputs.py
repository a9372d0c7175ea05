"""What a traced train step read in Python that a user may change afterwards: which variables of the models are
trainable (`layer.trainable = False`) and `Trainer.grad_multipliers`. A `tf.function` keeps what it read at trace
time, so such a change made without `reset_step_functions()` would be silently ignored (an unfreeze that never
trains the backbone). `Seen` records them as the train function's trace ends; step_functions.py asks `changes`
before every loop and traces again when something changed. Imports nothing of the trainer.

The check runs once per loop, so it reads only the `trainable` flags of the models and of their variables
listed at trace time (Keras' `layer.trainable = ...` sets its variables' flags; ~0.05 ms for ResNet50's 320
variables, where listing `trainable_variables` takes 0.16 ms), and lists the trainable variables only when a
flag moved.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Dict, Iterable, List, Optional, Tuple


_trainable_flag = operator.attrgetter("trainable")


def _flags(models: List, variables: List) -> Tuple[bool, ...]:
    return tuple(map(_trainable_flag, models)) + tuple(map(_trainable_flag, variables))


def _trainable(models: Iterable) -> Dict[int, str]:
    return {id(v): v.path for model in models for v in model.trainable_variables}


@dataclasses.dataclass
class Seen:
    """The models' trainable variables and the grad multipliers a train function was traced with."""

    models: List
    variables: List
    flags: Tuple[bool, ...]
    trainable: Dict[int, str]  # id -> path
    multipliers: Dict

    @classmethod
    def now(cls, models: Iterable, multipliers: Dict) -> "Seen":
        models = list(models)
        variables = [v for m in models for v in m.variables]
        return cls(models, variables, _flags(models, variables), _trainable(models), dict(multipliers))


def named(paths: List[str]) -> str:
    shown = ", ".join(repr(p) for p in paths[:3])
    return shown + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def changes(seen: Seen, multipliers: Dict) -> Optional[str]:
    """What changed since `seen` (None: nothing the train step reads); `seen` is brought up to date."""
    said = []
    if multipliers != seen.multipliers:
        seen.multipliers = dict(multipliers)
        said.append("grad_multipliers changed")
    flags = _flags(seen.models, seen.variables)
    if flags != seen.flags:
        seen.flags, before, seen.trainable = flags, seen.trainable, _trainable(seen.models)
        unfrozen = [p for i, p in seen.trainable.items() if i not in before]
        frozen = [p for i, p in before.items() if i not in seen.trainable]
        if unfrozen:
            said.append(f"{len(unfrozen)} variables became trainable ({named(unfrozen)})")
        if frozen:
            said.append(f"{len(frozen)} variables were frozen ({named(frozen)})")
    return "; ".join(said) or None
