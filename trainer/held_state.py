"""State a Trainer subclass holds itself, in every checkpoint: a tf.Variable assigned in the step (MoCo's queue of
negatives and its pointer), a keras.Variable, a tf.random.Generator or keras.random.SeedGenerator, a tf.data iterator
the step reads (a second data stream), a tf.Module, Keras layer or optimizer of its own, held as an attribute or as an
item of a list, tuple or dict in one (however deep).

Saved as `held/<attribute>` (`held/<attribute>/<index or key>/...`). What the Trainer saves already (step, rng, best,
every model's variables, the frozen too, the optimizers', the loss scales') is left out by identity, so nothing is
saved twice; Keras metrics restart with every log window instead (metric_attributes.py). Restored leniently
(checkpoint.py's `extra`): a checkpoint without one (written before the Trainer saved them, or before the attribute
was added) resumes with it at its initial value, said as a warning naming it. What is made after fit() starts is in
no checkpoint: said after the first loop (HeldState.check_made_late). Below the Trainer: it reads the Trainer's
attributes.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Iterator, Optional, Set, Tuple

import keras
import tensorflow as tf

from trainer.config import ConfigError

log = logging.getLogger("trainer.core")

# The Trainer's own state that no checkpoint holds: the gradient accumulators, zeroed within each step (step.py)
_NOT_STATE = ("_accumulators",)
_VARIABLES = (tf.Variable, keras.Variable)
# A data iterator the step reads itself (a second, unlabelled stream): its position (and shuffle and prefetch
# buffers) is its state, held in no variable
_ITERATORS = (tf.data.Iterator,)

Path = Tuple[str, ...]
# checkpoint path (("queue",), ("buffers", "0")) -> (label "self.buffers[0]", the object saved, what it is for the log)
Found = Dict[Path, Tuple[str, Any, str]]
_NO_KEY = object()


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


def _key_part(owner: str, value: dict) -> Dict[Any, str]:
    """Each key of dict `value` as one part of a checkpoint path (TensorFlow escapes '/' and '.' in it); two keys
    spelled alike (1 and '1') are a ConfigError: one would be saved in place of the other."""
    parts: Dict[Any, str] = {}
    for key in list(value):
        part = str(key)
        twin = next((k for k, p in parts.items() if p == part), _NO_KEY)
        if twin is not _NO_KEY:
            raise ConfigError(f"{owner} has the keys {twin!r} and {key!r}, which a checkpoint names alike ({part!r}): "
                              "one would be saved in place of the other. Fix: give them keys that differ as strings.")
        parts[key] = part
    return parts


def _items(path: Path, label: str, value, seen: Set[int]) -> Iterator[Tuple[Path, str, Any]]:
    """(path, label, value) for `value` and each item of a list, tuple or dict in it, however deep."""
    if not isinstance(value, (list, tuple, dict)):
        yield path, label, value
    elif id(value) not in seen:  # a container that holds itself is walked once
        seen.add(id(value))
        if isinstance(value, dict):
            parts = _key_part(label, value)
            items = [(parts[key], f"{label}[{key!r}]", item) for key, item in list(value.items())]
        else:
            items = [(str(i), f"{label}[{i}]", item) for i, item in enumerate(value)]
        for part, item_label, item in items:
            yield from _items(path + (part,), item_label, item, seen)


def _attributes(trainer) -> Iterator[Tuple[Path, str, Any]]:
    """(checkpoint path, label, value) for each attribute of the Trainer and each item of a list, tuple or dict in
    one (self.nested["q"][0] too)."""
    seen: Set[int] = set()
    for name, value in list(vars(trainer).items()):
        if name not in _NOT_STATE:
            yield from _items((name,), f"self.{name}", value, seen)


def find(trainer, objects: Dict[str, Any], refused: Optional[Dict[Path, str]] = None) -> Found:
    """The state the Trainer subclass holds that `objects` (the checkpoint's own) do not, by checkpoint path; a data
    iterator TensorFlow cannot save is left out, and put in `refused` (label, then why)."""
    handled, found, seen = _handled(trainer, objects), {}, set()
    for path, label, value in _attributes(trainer):
        saved = _saved_form(value)
        if saved is None or id(saved) in seen or id(saved) in handled:  # the model again (self.encoder), self.step
            continue
        seen.add(id(saved))
        if isinstance(saved, _ITERATORS):
            why = _unsaveable(saved)
            if why is None:
                found[path] = (label, saved, _described(value))
            elif refused is not None:
                refused[path] = f"{label} ({why})"
            continue
        variables = _variables_in(saved)
        if variables and not variables <= handled:
            found[path] = (label, saved, _described(value))
    return found


def _unsaveable(iterator) -> Optional[str]:
    """Why TensorFlow cannot save `iterator` (its dataset holds a stateful op: from_generator's PyFunc, a
    tf.random.uniform in a map, or one its options let through), else None: the dataset's graph serialized as a
    checkpoint write would, without copying the buffers."""
    dataset = getattr(iterator, "_dataset", None)
    if dataset is None:
        return None
    try:
        dataset._as_serialized_graph(external_state_policy=tf.data.experimental.ExternalStatePolicy.FAIL)
    except tf.errors.OpError as e:
        reason = str(e).strip().splitlines()[0].split("}}")[-1].split(" [Op:")[0]
        return reason.replace("Failed to serialize the input pipeline graph: ", "").strip().rstrip(".")
    return None


def tree(found: Found) -> Dict[str, Any]:
    """The checkpoint object of `found`: attribute -> object, or attribute -> {index or key: ... -> object}."""
    out: Dict[str, Any] = {}
    for path, (_, saved, _) in found.items():
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = saved
    return out


def _described(value) -> str:
    """`tf.Variable float32 [128, 8]`, or the object's type (`SeedGenerator`, `Dense`)."""
    if isinstance(value, _VARIABLES):
        kind = "keras.Variable" if isinstance(value, keras.Variable) else "tf.Variable"
        return f"{kind} {keras.backend.standardize_dtype(value.dtype)} {list(value.shape)}"
    if isinstance(value, _ITERATORS):
        return "tf.data iterator: its position and buffers"
    return type(value).__name__


def say_saved(found: Found, said: Set[str]) -> None:
    """The INFO line, once per label (`said` keeps them): what is saved in every checkpoint besides the models."""
    new = [path for path in found if found[path][0] not in said]
    if not new:
        return
    said.update(found[path][0] for path in new)
    log.info("State held by the Trainer, saved in every checkpoint and restored on resume: %s (docs/research.md, "
             "State of your own).", ", ".join(f"{found[p][0]} ({found[p][2]})" for p in new))


def _checkpoint_name(path: Path) -> str:
    """A path as a checkpoint key spells it (TensorFlow escapes '.' as '..' and '/' as '.S' in an object's name)."""
    return "/".join(part.replace(".", "..").replace("/", ".S") for part in path)


def restored_report(found: Found):
    """What says, after a restore, which of `found` the checkpoint lacked (checkpoint.py calls it with the keys it
    holds under `held/`): each starts from its initial value, so the resumed run is not the one it continues."""
    def report(prefix: str, keys: Iterable[str]) -> None:
        keys = list(keys)
        missing = [label for path, (label, _, _) in found.items()
                   if not any(key.startswith(_checkpoint_name(path) + "/") for key in keys)]
        tops = {_checkpoint_name(path[:1]) for path in found}
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
            log.warning("%s holds state of attributes this Trainer no longer has (%s): not restored. Fix: nothing, "
                        "if they were dropped on purpose; renamed? give the attribute its old name again, for this "
                        "run to go on from its saved value.", prefix, ", ".join(f"self.{name}" for name in unused))
    return report


def _say_unsaveable(trainer, refused: Iterable[str], said: Set[str]) -> None:
    """The WARNING (once per iterator; a ConfigError under deterministic=true, at every fit() call)."""
    refused = [label for label in refused if trainer.config.deterministic or label not in said]
    if not refused:
        return
    said.update(refused)
    message = (
        f"A data iterator the Trainer holds cannot be saved: {', '.join(refused)}: its dataset holds state TensorFlow "
        "cannot save (Python's, from from_generator, py_function or numpy_function; a stateful random op's, from "
        "tf.random.* or tf.image.random_* in a map), so no checkpoint holds its position and a resumed run reads it "
        "again from its start. Fix: zip it into the data given to fit() (tf.data.Dataset.zip((labelled, "
        "unlabelled)): a resume puts that data back at the step's batch), or build it of tensors or files "
        "(from_tensor_slices, TFRecord) with stateless random ops (tf.random.stateless_*, "
        "tf.image.stateless_random_*) (docs/research.md, A second data stream).")
    if trainer.config.deterministic:
        raise ConfigError(f"trainer.deterministic=true, but: {message}")
    log.warning(message)


def _say_replicas(trainer, found: Found) -> None:
    """Replicas that each call next() on one iterator take its batches in an order TensorFlow does not fix."""
    labels = [label for label, saved, _ in found.values() if isinstance(saved, _ITERATORS)]
    if not labels or trainer.strategy.num_replicas_in_sync < 2:
        return
    message = (f"{', '.join(labels)}: a data iterator the step reads, on {trainer.strategy.num_replicas_in_sync} "
               "replicas: each replica's next() takes a batch of it in an order TensorFlow does not fix, so runs "
               "(and a resume) can differ. Fix: zip the stream into the data given to fit() "
               "(tf.data.Dataset.zip((labelled, unlabelled))), which every replica reads its share of "
               "(docs/research.md, A second data stream).")
    if trainer.config.deterministic:
        raise ConfigError(f"trainer.deterministic=true, but: {message}")
    log.warning(message)


class HeldState:
    """What of the state the Trainer subclass holds a Checkpointer saves (`found`), found when each fit() call starts
    (callbacks/checkpointing.py): an attribute added between calls is saved from then on."""

    def __init__(self):
        self.found: Found = {}
        self._said: Set[str] = set()  # the labels the INFO line named

    def hold(self, trainer, checkpointer, fresh: bool = False) -> None:
        """Saves from the next save on what the Trainer holds now (`fresh`: a new Checkpointer, that saves none)."""
        if fresh:
            self.found = {}
        refused: Dict[Path, str] = {}
        found = find(trainer, checkpointer.objects, refused)
        if refused:
            _say_unsaveable(trainer, refused.values(), self._said)
        _say_replicas(trainer, found)
        if any(_identities(found).get(path) != held for path, held in _identities(self.found).items()):
            trainer.reset_step_functions()  # the traced step reads the object replaced (or dropped) since
        if _identities(found) != _identities(self.found):
            checkpointer.set_extra("held", tree(found) if found else None)
            self.found = found
        checkpointer.set_report("held", restored_report(found))  # also when none: what a checkpoint held
        say_saved(found, self._said)

    def check_made_late(self, trainer, checkpointer) -> None:
        """After the first loop of a fit() call, before any save: state made since the call started (a callback's
        on_train_begin, a layer the step builds) is in no checkpoint, said as a WARNING, a ConfigError under
        trainer.deterministic=true (a resumed run would not be the run it continues)."""
        saved = _identities(self.found)
        late = [value for path, value in find(trainer, checkpointer.objects).items()
                if saved.get(path) != id(value[1])]
        if not late:
            return
        message = (
            f"State held by the Trainer was made after fit() started, when what a checkpoint holds was already fixed, "
            f"so no checkpoint holds it: {', '.join(f'{label} ({kind})' for label, _, kind in late)}. A resumed run "
            "starts it again from its initial value and goes on from other state than the run it continues. Fix: "
            "make it in __init__ (before fit()), not in a callback or the step; build a layer there too "
            "(self.head.build(input_shape)), so its variables exist when fit() starts (docs/research.md, State of "
            "your own).")
        if trainer.config.deterministic:
            raise ConfigError(f"trainer.deterministic=true, but: {message} Nothing of this loop was saved.")
        log.warning(message)


def _identities(found: Found) -> Dict[Path, int]:
    return {path: id(saved) for path, (_, saved, _) in found.items()}
