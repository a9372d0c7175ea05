"""Matching a model's (or optimizer's) variables to a checkpoint through object graphs, as
tf.train.Checkpoint itself does: for the compatibility check before a resume and for warm starts."""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import keras
import tensorflow as tf

from trainer.float32_outputs import Float32Outputs


def _variables_by_path(root, with_optimizers: bool) -> Dict[str, tf.Variable]:
    """Object path (e.g. model/_functional/_operations/1/_kernel) -> variable, for everything under `root`,
    each by the first path a breadth-first walk meets it by, as tf.train.Checkpoint walks. Without
    `with_optimizers` (a model's variables) a compiled model's `optimizer` is not walked: its state is the
    optimizer's (checked and restored under the Trainer's optimizer root when adopted), not the model's
    weights, which a warm start loads alone."""
    from tensorflow.python.checkpoint import graph_view  # the children tf.train.Checkpoint itself saves

    view = graph_view.ObjectGraphView(root)
    paths = {id(root): ""}
    queue, out = [root], {}
    while queue:
        obj = queue.pop(0)
        for ref in view.list_children(obj):
            child = ref.ref
            if id(child) in paths or (not with_optimizers and isinstance(child, keras.optimizers.Optimizer)):
                continue
            paths[id(child)] = f"{paths[id(obj)]}/{ref.name}" if paths[id(obj)] else ref.name
            if isinstance(child, (tf.Variable, keras.Variable)):
                out[paths[id(child)]] = child
            queue.append(child)
    return out


_MODEL_OPTIMIZER = re.compile(r"^(model|models/[^/]+)/optimizer/")


def _saved_graph(reader):
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    return graph


def _saved_keys_by_path(graph) -> Dict[str, str]:
    """Object path -> tensor key in a checkpoint, each variable under the first path the walk meets it by:
    the listing of what the checkpoint holds (a shared variable, saved once, is listed once)."""
    out: Dict[str, str] = {}
    expanded = set()
    queue = [(0, "")]
    while queue:
        node_id, path = queue.pop(0)
        node = graph.nodes[node_id]
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE":
                out.setdefault(path, attr.checkpoint_key)
        if node_id in expanded:
            continue
        expanded.add(node_id)
        for child in node.children:
            queue.append((child.node_id, f"{path}/{child.local_name}" if path else child.local_name))
    return out


def _saved_key_at(graph, path: str) -> Optional[str]:
    """The tensor key of the variable at object path `path`, followed through the saved graph edge by edge.

    A variable shared by several objects is stored once, under whichever path the saver met first (the
    Trainer's `optimizer` root, say, which is also the compiled model's `model.optimizer`), so each path of
    the current objects is looked up by its own edges, not in a listing that holds one path per variable.
    """
    node = graph.nodes[0]
    for name in path.split("/"):
        child = next((c.node_id for c in node.children if c.local_name == name), None)
        if child is None:
            return None
        node = graph.nodes[child]
    return next((a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"), None)


def placed_at(path: str, obj):
    """(root, trackable): `obj` at object path `path` of a tf.train.Checkpoint(**{root: trackable}), each further
    part a dict level (`model/inner`: {"inner": obj} under `model`; `models/<name>`: {name: obj} under `models`)."""
    root, *parts = path.split("/")
    for part in reversed(parts):
        obj = {part: obj}
    return root, obj


def match_variables(model, prefix: str, name: str = "model"):
    """(reader, [(path, variable, saved_key or None, saved_shape or None)]) for the variables of the
    checkpoint's object `name` (the model, or the optimizer; `models/<name>`: one of several models; `model/inner`:
    the model trainer's float32-output wrapper held)."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = _saved_graph(reader)
    saved = _saved_keys_by_path(graph)
    rows = []
    root, placed = placed_at(name, model)  # models/<name>: as the Trainer saves several models, a dict by name
    if root in ("model", "models"):  # a compiled model's optimizer state: not the model's (see _variables_by_path)
        saved = {path: key for path, key in saved.items() if not _MODEL_OPTIMIZER.match(path)}
    objects = tf.train.Checkpoint(**{root: placed})
    for path, var in _variables_by_path(objects, with_optimizers=root not in ("model", "models")).items():
        key = _saved_key_at(graph, path)
        rows.append((path, var, key, shapes.get(key) if key else None))
    return reader, rows, saved


def _forms(model, name: str):
    """(object, path): `model` as it is at `name`, then as the other layout of trainer's float32-output wrapper
    (trainer/float32_outputs.py) would hold it: a run under a mixed policy whose model's outputs were not float32
    saved the wrapper, the model under `<name>/inner`; a float32 run (or a model with float32 outputs) the model
    itself. A wrapped model's `.inner` reads a plain checkpoint's `<name>`, a plain model a wrapped one's
    `<name>/inner`."""
    wrapped = isinstance(model, Float32Outputs)
    return [(model, name), (model.inner, name) if wrapped else (model, f"{name}/inner")]


def saved_form(model, prefix: str, name: str = "model"):
    """(object, path, reader, rows, saved): match_variables for the form of `model` (_forms) the checkpoint holds
    any variable of, as it is first; none: as it is (its rows then say what is missing)."""
    first = None
    for target, at in _forms(model, name):
        reader, rows, saved = match_variables(target, prefix, at)
        first = first or (target, at, reader, rows, saved)
        if any(key for _, _, key, _ in rows):
            return target, at, reader, rows, saved
    return first


def _placed(model, prefix: str, name: str):
    """`model` as tf.train.Checkpoint takes it at `name` to read the form the checkpoint holds (saved_form): itself,
    the wrapper's `.inner`, or the plain model as the wrapper's `inner`."""
    target, at = saved_form(model, prefix, name)[:2]
    return target if at == name else {"inner": target}


def as_saved(objects: Dict, prefix: str) -> Dict:
    """The Trainer's checkpoint objects with each model in the form the checkpoint holds it: a run resumed under
    another precision restores, whichever layout the float32-output wrapper gave its checkpoints. Each model that
    is held as it is stays the same object."""
    placed = dict(objects)
    if "model" in objects:
        placed["model"] = _placed(objects["model"], prefix, "model")
    if "models" in objects:
        models = {name: _placed(model, prefix, f"models/{name}") for name, model in objects["models"].items()}
        if any(models[name] is not model for name, model in objects["models"].items()):
            placed["models"] = models
    return placed


# The attribute of a model (or layer) that names the setting which nests its layers otherwise: a checkpoint whose
# variables are the same, under other object paths, is said as that setting's change (checkpoint.py).
_NESTED_BY = "_trainer_nested_by"


def say_nested_by(model: keras.Layer, setting: str) -> None:
    """Marks `model` as one whose layers `setting` groups into nested models or not (the ResNet recipe's
    model.recompute)."""
    setattr(model, _NESTED_BY, setting)


def nested_by(objects) -> List[str]:
    """The settings (say_nested_by) of the models in `objects` (a model, or a dict of them) and their layers."""
    found = set()
    for model in tf.nest.flatten(objects):
        if isinstance(model, keras.Layer):
            found |= {getattr(layer, _NESTED_BY) for layer in model._flatten_layers(include_self=True)
                      if hasattr(layer, _NESTED_BY)}
    return sorted(found)
