"""State a Trainer subclass holds itself, in every checkpoint: a tf.Variable assigned in the step (MoCo's queue of
negatives and its pointer), a keras.Variable, a tf.random.Generator or keras.random.SeedGenerator, a tf.Module, Keras
layer or optimizer of its own, held as an attribute or as an item of a list, tuple or dict attribute.

Saved as `held/<attribute>` (`held/<attribute>/<index or key>`). What the Trainer saves already (step, rng, best, every
model's variables, the frozen too, the optimizers', the loss scales') is left out by identity, so nothing is saved
twice; Keras metrics restart with every log window instead (metric_attributes.py). Restored leniently (checkpoint.py's
`extra`): a checkpoint without one (written before the Trainer saved them, or before the attribute was added) resumes
with it at its initial value, said as a warning naming it. Below the Trainer: it reads the Trainer's attributes.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, Set, Tuple

import keras
import tensorflow as tf

log = logging.getLogger("trainer.core")

# The Trainer's own state that no checkpoint holds: the gradient accumulators, zeroed within each step (step.py)
_NOT_STATE = ("_accumulators",)
_VARIABLES = (tf.Variable, keras.Variable)

# checkpoint path ("queue", "buffers/0") -> (label "self.buffers[0]", the object saved, what it is for the log)
Found = Dict[str, Tuple[str, Any, str]]


def _unwrapped(v):
    """The tf.Variable a checkpoint saves: a keras.Variable's own."""
    return v.value if isinstance(v, keras.Variable) else v


def _saved_form(value):
    """What the checkpoint holds of `value` (a SeedGenerator is no trackable: its state variable is), or None."""
    if isinstance(value, keras.random.SeedGenerator):
        return value.state
    if isinstance(value, keras.metrics.Metric) or not isinstance(value, tf.__internal__.tracking.Trackable):
        return None  # a metric restarts with the windows; a plain object is not looked into
    return value


def _variables_in(saved) -> Set[int]:
    """The ids of the tf.Variables `saved` holds (itself, or those tracked under it)."""
    if isinstance(saved, _VARIABLES):
        return {id(_unwrapped(saved))}
    return {id(_unwrapped(d)) for d in tf.train.TrackableView(saved).descendants() if isinstance(d, _VARIABLES)}


def _handled(trainer, objects: Dict[str, Any]) -> Set[int]:
    """The ids of what the Trainer keeps itself, objects and their variables: those of `objects` (the checkpoint's
    own), every model (a frozen one is in no checkpoint, on purpose) and its unsaved state."""
    roots = [*objects.values(), *trainer.models.values(), *(vars(trainer).get(name) for name in _NOT_STATE)]
    ids = set()
    for root in roots:
        for item in (root.values() if isinstance(root, dict) else root if isinstance(root, list) else [root]):
            if item is None:
                continue
            found = [item] if isinstance(item, _VARIABLES) else tf.train.TrackableView(item).descendants()
            ids |= {id(d) for d in found} | {id(_unwrapped(d)) for d in found if isinstance(d, _VARIABLES)}
    return ids


def _attributes(trainer) -> Iterator[Tuple[str, str, Any]]:
    """(checkpoint path, label, value) for each attribute of the Trainer and each item of a list, tuple or dict one."""
    for name, value in list(vars(trainer).items()):
        if name in _NOT_STATE:
            continue
        if isinstance(value, (list, tuple)):
            yield from ((f"{name}/{i}", f"self.{name}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, dict):
            yield from ((f"{name}/{str(key).replace('/', '_')}", f"self.{name}[{key!r}]", item)
                        for key, item in list(value.items()))
        else:
            yield name, f"self.{name}", value


def find(trainer, objects: Dict[str, Any]) -> Found:
    """The state the Trainer subclass holds that `objects` (the checkpoint's own) do not, by checkpoint path."""
    handled, found, seen = _handled(trainer, objects), {}, set()
    for path, label, value in _attributes(trainer):
        saved = _saved_form(value)
        if saved is None or id(saved) in seen or id(saved) in handled:  # the model again (self.encoder), self.step
            continue
        variables = _variables_in(saved)
        if variables and not variables <= handled:
            seen.add(id(saved))
            found[path] = (label, saved, _described(value))
    return found


def tree(found: Found) -> Dict[str, Any]:
    """The checkpoint object of `found`: attribute -> object, or attribute -> {index or key: object}."""
    out: Dict[str, Any] = {}
    for path, (_, saved, _) in found.items():
        name, _, key = path.partition("/")
        if key:
            out.setdefault(name, {})[key] = saved
        else:
            out[name] = saved
    return out


def _described(value) -> str:
    """`tf.Variable float32 [128, 8]`, or the object's type (`SeedGenerator`, `Dense`)."""
    if isinstance(value, _VARIABLES):
        kind = "keras.Variable" if isinstance(value, keras.Variable) else "tf.Variable"
        return f"{kind} {keras.backend.standardize_dtype(value.dtype)} {list(value.shape)}"
    return type(value).__name__


def say_saved(found: Found, said: Set[str]) -> None:
    """The INFO line, once per label (`said` keeps them): what is saved in every checkpoint besides the models."""
    new = [path for path in found if found[path][0] not in said]
    if not new:
        return
    said.update(found[path][0] for path in new)
    log.info("State held by the Trainer, saved in every checkpoint and restored on resume: %s (docs/research.md, "
             "State of your own).", ", ".join(f"{found[p][0]} ({found[p][2]})" for p in new))


def _checkpoint_name(path: str) -> str:
    """A path as a checkpoint key spells it (TensorFlow escapes '.' and '/' in an object's name)."""
    return "/".join(part.replace(".", "..") for part in path.split("/"))


def restored_report(found: Found):
    """What says, after a restore, which of `found` the checkpoint lacked (checkpoint.py calls it with the keys it
    holds under `held/`): each starts from its initial value, so the resumed run is not the one it continues."""
    def report(prefix: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        missing = [label for path, (label, _, _) in found.items()
                   if not any(key.startswith(_checkpoint_name(path) + "/") for key in keys)]
        tops = {_checkpoint_name(path.split("/")[0]) for path in found}
        unused = sorted({key.split("/")[0] for key in keys} - tops)
        if missing:
            log.warning(
                "%s holds no saved value of %s: written before the Trainer saved the state its subclass holds (or "
                "before that attribute was added), so %s from %s initial value%s, and this resumed run goes on from "
                "other state than the run it continues. Checkpoints written from now on hold %s. Fix: nothing, if "
                "that is acceptable; for an exact run, start it again in a new run folder.",
                prefix, ", ".join(missing), "it starts" if len(missing) == 1 else "they start",
                "its" if len(missing) == 1 else "their", "" if len(missing) == 1 else "s",
                "it" if len(missing) == 1 else "them")
        if unused:
            log.warning("%s holds state of attributes this Trainer no longer has (%s): not restored.", prefix,
                        ", ".join(f"self.{name}" for name in unused))
    return report
