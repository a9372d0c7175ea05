"""Changes made in place to a built model that a traced step cannot see: `fuse_elementwise` swaps layer
classes and activations, `recompute` replaces a block's `call`. A `tf.function` keeps what it traced, so a
change made after a Trainer traced its step would be silently left out of training. Each change is recorded
here; before it runs a step function, the Trainer (step_functions.py) asks whether a layer of its models
changed since it traced, and traces again if so. Imports nothing of the trainer.
"""
from __future__ import annotations

import threading
import weakref
from typing import Dict, Iterable, List

_lock = threading.Lock()  # edits from several threads: each its own number, and count() never goes back
_count = 0  # the changes recorded so far in this process
_changed: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> (its last change's number, by what)


def record(layers: Iterable, by: str) -> None:
    """`layers` compute differently from now on; `by` names what changed them (for the log)."""
    global _count
    layers = list(layers)
    if not layers:
        return
    with _lock:
        _count += 1
        for layer in layers:
            _changed[layer] = (_count, by)


def count() -> int:
    """How many changes were recorded so far: a function traced after `count()` of them has all of them."""
    return _count


def changed_since(models: Iterable, seen: int) -> Dict[str, List[str]]:
    """The layers of `models` (nested ones too) changed after the first `seen` changes: by what -> their names."""
    found: Dict[str, List[str]] = {}
    for model in models:
        for layer in model._flatten_layers(include_self=True, recursive=True):
            number, by = _changed.get(layer, (0, ""))
            if number > seen and layer.name not in found.get(by, []):
                found.setdefault(by, []).append(layer.name)
    return found
