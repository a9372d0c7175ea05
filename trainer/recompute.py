"""Recomputation for memory (gradient checkpointing): `recompute(block)` makes a Keras layer or model keep
only its inputs for the backward pass and run its forward again there (`tf.recompute_grad`), trading
compute for the memory of its inner activations. Inference and evaluation (training=False) are unchanged.

What tf.recompute_grad alone gets wrong with Keras layers, and what this does about it:
  * a second forward draws new dropout masks (Keras 3 advances a SeedGenerator variable on each draw), so
    the gradients would belong to another network: the block's non-trainable variables (the seed states,
    BatchNormalization's moving statistics) are read before the forward pass, set back to those values for
    the recomputation, and set to their values after the forward pass again once it is done. The
    recomputation thus draws the same masks, and the moving statistics are updated once per step, not twice.
  * keyword arguments (a padding mask, `training`) cannot cross `tf.custom_gradient` in a graph: they are
    closed over; only the positional tensors are the block's differentiated inputs. A positional list or
    dict of tensors is flattened for tf.recompute_grad (which takes tensors only) and packed again.
The block's variables and their checkpoint names do not change: `recompute` replaces the instance's `call`
(on a Trainer's model after the Trainer traced its step, the Trainer traces again before its next step:
model_edits.py).
"""
from __future__ import annotations

from typing import List

import keras
import tensorflow as tf

from trainer import model_edits
from trainer.fused_elementwise import backward_follows


def recompute(block: keras.layers.Layer) -> keras.layers.Layer:
    """Wraps `block.call` so that, when training, its activations are recomputed in the backward pass.
    Returns the block (the same object)."""
    if getattr(block, "_trainer_recompute", False):
        return block
    forward = block.call

    def call(*args, **kwargs):
        leaves = tf.nest.flatten(args)
        if not kwargs.get("training") or any(isinstance(a, keras.KerasTensor) for a in leaves):
            return forward(*args, **kwargs)  # inference, or Keras tracing the model's shapes
        return _recomputed(block, forward, args, kwargs)

    block.call = call
    block._trainer_recompute = True
    model_edits.record([block], by="recompute")
    return block


def is_recomputed(block: keras.layers.Layer) -> bool:
    return bool(getattr(block, "_trainer_recompute", False))


def _state(block) -> List:
    """The variables a forward pass changes: the seed generators' states and the moving statistics, i.e. the
    non-trainable variables other than frozen weights (a frozen layer's weights stay in its Keras 3
    `_trainable_variables`; copying them each step would only cost memory)."""
    frozen = {id(v) for layer in block._flatten_layers() for v in getattr(layer, "_trainable_variables", [])}
    return [v for v in block.variables if not v.trainable and id(v) not in frozen]


def _recomputed(block, forward, args, kwargs):
    try:  # nested inputs (a list, a dict of tensors) are flattened for tf.recompute_grad and packed again
        flat = [tf.convert_to_tensor(a) if not isinstance(a, (tf.Tensor, tf.Variable)) else a
                for a in tf.nest.flatten(args)]
    except (TypeError, ValueError) as e:
        raise TypeError(f"recompute: {block.name} got an input that is not a tensor while training ({e}); pass its "
                        "inputs as tensors (nested lists or dicts of tensors are fine), or do "
                        "not recompute it") from None
    state = _state(block)
    before = [tf.identity(keras.ops.convert_to_tensor(v)) for v in state]
    passes = []

    def run(*tensors):
        inputs = tf.nest.pack_sequence_as(args, list(tensors))
        if not passes:  # the forward pass (run with recording paused; fused kernels as in the recomputation)
            passes.append("forward")
            with backward_follows():
                return forward(*inputs, **kwargs)
        after = [tf.identity(keras.ops.convert_to_tensor(v)) for v in state]
        for variable, value in zip(state, before):  # the same masks, and no second statistics update
            variable.assign(value)
        outputs = forward(*inputs, **kwargs)
        with tf.control_dependencies(tf.nest.flatten(outputs)):
            for variable, value in zip(state, after):
                variable.assign(value)
        return tf.nest.map_structure(tf.identity, outputs)

    return tf.recompute_grad(run)(*flat)
