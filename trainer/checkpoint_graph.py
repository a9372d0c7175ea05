"""Matching a model's (or optimizer's) variables to a checkpoint through object graphs, as
tf.train.Checkpoint itself does: for the compatibility check before a resume and for warm starts."""
from __future__ import annotations

import re
from typing import Dict, Optional

import keras
import tensorflow as tf


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


def match_variables(model, prefix: str, name: str = "model"):
    """(reader, [(path, variable, saved_key or None, saved_shape or None)]) for the variables of the
    checkpoint's object `name` (the model, or the optimizer; `models/<name>`: one of several models)."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = _saved_graph(reader)
    saved = _saved_keys_by_path(graph)
    rows = []
    root, _, child = name.partition("/")  # models/<name>: as the Trainer saves several models, a dict by name
    if root in ("model", "models"):  # a compiled model's optimizer state: not the model's (see _variables_by_path)
        saved = {path: key for path, key in saved.items() if not _MODEL_OPTIMIZER.match(path)}
    objects = tf.train.Checkpoint(**{root: {child: model} if child else model})
    for path, var in _variables_by_path(objects, with_optimizers=root not in ("model", "models")).items():
        key = _saved_key_at(graph, path)
        rows.append((path, var, key, shapes.get(key) if key else None))
    return reader, rows, saved
