"""What Python code in a traced step does that a graph cannot: it runs once per trace (once or twice a run), not once
per step. Three habits of eager code go silently wrong there, and each is said when the step is traced:

- a data iterator made inside the step (`next(iter(self.unlabelled_ds))`): a new iterator at every call, so every
  step reads the data set's first batch (a WARNING: wrong in any run);
- a plain Python value of the Trainer changed by the step (`self.calls += 1`, a NumPy array changed in place): it
  changes once per trace, not per step (a WARNING naming the attribute);
- a tensor of a trace stored on the Trainer (`self.ema = 0.9 * self.ema + 0.1 * loss`): it exists only inside that
  trace, so a later trace that reads it fails with TensorFlow's "out of scope" error pointing into the framework
  (that error becomes a ConfigError naming the attribute).

The Trainer's attributes are read before and after each trace of the train and eval steps (and of the throwaway
trace that learns an overridden step's logs): the plain public ones (int, float, NumPy numbers and arrays, by content
up to _ARRAY_BYTES_COMPARED, larger ones by identity and shape) and one level into a list, tuple or dict for a
tensor. The graph is searched once per trace of a train or eval function. Each finding is said once per
Trainer. Below step_functions.py: it reads the Trainer's attributes and the traced graph.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf

from trainer.config import ConfigError
from trainer.tracing import framework_code, graph_nodes

log = logging.getLogger("trainer.core")
_said: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Trainer -> what its traces were said to do

_PLAIN = (int, float, np.number)  # counts and sums (a flag or a phase's name set at a trace is left alone)
_ARRAY_BYTES_COMPARED = 1 << 20  # a bigger array (data, not state) is compared by identity and shape only
# The ops that start reading a data set: an iterator made in the graph (OwnedIterator's MakeIterator, a multi-device
# iterator's init); their first input is the data set.
_ITERATOR_MAKING_OPS = frozenset({"MakeIterator", "MultiDeviceIteratorInit"})


class TracedTensorError(ConfigError):
    """A tensor of a traced step stored on the Trainer: it belongs to that trace's graph and cannot be read after."""

    ag_pass_through = True  # raised while a step is traced: AutoGraph passes it on as it is, not in a StagingError


def _plain_form(value):
    """(what is compared, the object) of a plain value; None when it is not plain (not compared)."""
    if isinstance(value, np.ndarray):
        small = value.nbytes <= _ARRAY_BYTES_COMPARED and value.dtype != object
        return ("array", value.dtype.str, value.shape, value.tobytes() if small else id(value)), id(value)
    if isinstance(value, _PLAIN):
        return (type(value), value), id(value)
    return None


@framework_code
def before_trace(trainer) -> Dict[str, Any]:
    """The Trainer's plain attributes as a trace starts, to compare with after it (`check_trace`)."""
    forms = {}
    for name, value in list(vars(trainer).items()):
        form = None if name.startswith("_") or isinstance(value, bool) else _plain_form(value)
        if form is not None:
            forms[name] = form
    return forms


@framework_code
def check_trace(trainer, before: Dict[str, Any], what: str, graph=None) -> None:
    """At the end of a trace of `what` ("train_step", "test_step"): a tensor of it stored on the Trainer is a
    TracedTensorError; a plain attribute changed since `before` and (with the traced `graph`) a data iterator made
    inside it are WARNINGs, each once per Trainer."""
    said = _said.setdefault(trainer, set())
    changed = [name for name, form in before.items() if name in vars(trainer)
               and _changed(form, _plain_form(vars(trainer)[name])) and ("changed", name) not in said]
    if changed:
        said.update(("changed", name) for name in changed)
        _warn_changed(trainer, changed, before, what)
    if graph is not None and ("iterator",) not in said and _makes_iterator_from_outside(graph):
        said.add(("iterator",))
        _warn_iterator_made_in_step(trainer, what)


def _changed(before, after) -> bool:
    """Whether a plain value changed (a value that is no longer plain is left alone: a tensor is refused above)."""
    return after is not None and before[0] != after[0]  # (a float's NaN equals itself: the same object)


def _symbolic(item) -> bool:
    return isinstance(item, tf.Tensor) and tf.is_symbolic_tensor(item)


def _stored_tensors(trainer) -> List[str]:
    """`self.name` (or `self.name[key]`) of each graph tensor the Trainer's attributes hold, one level in."""
    found = []
    for name, value in list(vars(trainer).items()):
        if _symbolic(value):
            found.append(f"self.{name}")
        elif isinstance(value, dict):
            found += [f"self.{name}[{k!r}]" for k, v in list(value.items()) if _symbolic(v)]
        elif isinstance(value, (list, tuple)):
            found += [f"self.{name}[{i}]" for i, v in enumerate(value) if _symbolic(v)]
    return found


@contextlib.contextmanager
def watched(trainer, what: str, in_graph: bool = True):
    """Around a trace of `what` ("train_step", "test_step"): checks it once it ends (`check_trace`; `in_graph`: the
    with-block ends inside the traced function, whose graph is searched)."""
    before = before_trace(trainer)
    yield
    check_trace(trainer, before, what, tf.compat.v1.get_default_graph() if in_graph else None)


@contextlib.contextmanager
def tensors_explained(trainer, what: str):
    """Around a call that traces `what`: TensorFlow's 'out of scope' error, raised when a trace read a tensor an
    earlier trace stored on the Trainer (`self.ema = 0.9 * self.ema + 0.1 * loss`), becomes a TracedTensorError
    naming it. One written before it is read in each trace (a value passed between methods) works: nothing said."""
    try:
        yield
    except TypeError as e:
        stored = _stored_tensors(trainer)
        if "out of scope" not in str(e) or not stored:
            raise
        name = stored[0].split("[")[0]
        raise TracedTensorError(
            f"{what} read a tensor an earlier trace stored on the Trainer: {', '.join(stored)}. Python code in a step "
            "runs once, when TensorFlow traces the step into a graph, and the tensors it makes belong to that graph "
            "(TensorFlow: 'out of scope'); no step's value ever reaches such an attribute. Fix: make it a tf.Variable "
            f"in __init__ ({name} = tf.Variable(0.0, trainable=False)) and assign to it in the step "
            f"({name}.assign(0.9 * {name} + 0.1 * loss)): it changes at every step, and the Trainer saves it in every "
            "checkpoint (docs/research.md, State of your own).") from None


def _warn_changed(trainer, changed: List[str], before: Dict[str, Any], what: str) -> None:
    def said(name):
        (old, old_id), (new, new_id) = before[name], _plain_form(vars(trainer)[name])
        if old[0] == "array":
            return f"self.{name} (a NumPy array, changed{' in place' if old_id == new_id else ''})"
        return f"self.{name} ({old[1]!r} -> {new[1]!r})"

    first = changed[0]
    log.warning(
        "%s changed %s of the Trainer while TensorFlow traced it. Python code in a step runs once per trace (once or "
        "twice a run, again when the step is traced again), not once per step, so such a value counts traces, not "
        "steps, and the step's graph keeps the value it read at the trace. Fix: a tf.Variable made in __init__ "
        "(self.%s = tf.Variable(0, trainable=False)), changed in the step with assign/assign_add "
        "(self.%s.assign_add(1)): it changes at every step and the Trainer saves it in every checkpoint "
        "(docs/research.md, State of your own). A value set once on purpose at the first trace (a flag) is fine.",
        what, ", ".join(said(name) for name in changed), first, first)


def _makes_iterator_from_outside(graph) -> bool:
    """Whether the traced graph (or a function it calls: loop bodies, strategy.run's replicas) makes an iterator
    over a data set made outside it (a captured one: the graph's input). One built inside the step from its tensors
    is read anew on purpose."""
    for nodes in graph_nodes(graph):
        making = [node for node in nodes if node.op in _ITERATOR_MAKING_OPS and node.input]
        by_name = {node.name: node for node in nodes} if making else {}
        for node in making:
            source = by_name.get(node.input[0].lstrip("^").split(":")[0])
            while source is not None and source.op == "Identity" and source.input:
                source = by_name.get(source.input[0].lstrip("^").split(":")[0])
            if source is None or source.op == "Placeholder":  # a function's argument, or a capture
                return True
    return False


def _warn_iterator_made_in_step(trainer, what: str) -> None:
    held = [f"self.{name}" for name, value in list(vars(trainer).items()) if isinstance(value, tf.data.Dataset)]
    log.warning(
        "%s makes a data iterator at every call (iter(dataset) inside the step%s): a new iterator starts at the data "
        "set's beginning each time, so every step reads the same first batch(es). Python code in a step runs once, "
        "when it is traced, and the graph makes the iterator anew at each step. Fix: make the iterator once, in "
        "__init__ (self.unlabelled = iter(%s); next(self.unlabelled) in the step reads on, and the Trainer saves a "
        "held iterator in every checkpoint), or zip the second stream into the data given to fit() "
        "(fit(tf.data.Dataset.zip((labelled, unlabelled))): the step gets ((x, y), unlabelled_batch)).",
        what, f"; the Trainer holds the data set {', '.join(held)}" if held else "", held[0] if held else "dataset")
