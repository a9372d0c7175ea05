"""Matching a model's (or optimizer's) variables to a checkpoint through object graphs, as
tf.train.Checkpoint itself does: for the compatibility check before a resume and for warm starts."""
from __future__ import annotations

from typing import Dict

import keras
import tensorflow as tf


def _variables_by_path(root) -> Dict[str, tf.Variable]:
    """Object path (e.g. model/_functional/_operations/1/_kernel) -> variable, for everything under `root`."""
    from tensorflow.python.checkpoint import graph_view  # the traversal tf.train.Checkpoint itself uses

    objects, paths = graph_view.ObjectGraphView(root).breadth_first_traversal()
    return {
        "/".join(ref.name for ref in paths[obj]): obj
        for obj in objects
        if isinstance(obj, (tf.Variable, keras.Variable))
    }


def _saved_keys_by_path(reader) -> Dict[str, str]:
    """Object path -> tensor key in a checkpoint, from its object graph.

    A variable shared by several objects is stored once, under whichever path the saver met first
    (the optimizer's list of variables, say), so a model variable must be found through the graph,
    not by guessing its key from the model's own path.
    """
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    graph = trackable_object_graph_pb2.TrackableObjectGraph()
    graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    out: Dict[str, str] = {}
    expanded = set()
    queue = [(0, "")]
    while queue:
        node_id, path = queue.pop(0)
        node = graph.nodes[node_id]
        for attr in node.attributes:
            if attr.name == "VARIABLE_VALUE":
                out[path] = attr.checkpoint_key
        if node_id in expanded:
            continue
        expanded.add(node_id)
        for child in node.children:
            queue.append((child.node_id, f"{path}/{child.local_name}" if path else child.local_name))
    return out


def match_variables(model, prefix: str, name: str = "model"):
    """(reader, [(path, variable, saved_key or None, saved_shape or None)]) for the variables of the
    checkpoint's object `name` (the model, or the optimizer; `models/<name>`: one of several models)."""
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    saved = _saved_keys_by_path(reader)
    rows = []
    root, _, child = name.partition("/")  # models/<name>: as the Trainer saves several models, a dict by name
    for path, var in _variables_by_path(tf.train.Checkpoint(**{root: {child: model} if child else model})).items():
        key = saved.get(path)
        rows.append((path, var, key, shapes.get(key) if key else None))
    return reader, rows, saved
