"""A window into every layer: within `with LayerProbe(model, on_output):` each layer's eager call hands
its outputs to `on_output(name, layer, outputs)`. The doctor's model table reads their dtypes, its numerics
their magnitudes and (under a GradientTape) the gradients of the loss with respect to them; with
record_calls the calls are kept in order, and output_layers reads which layers size the outputs (the
Trainer's multiples-of-8 tip and the doctor's table alike)."""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional

import keras
import tensorflow as tf

from trainer.precision import SIZE_ATTRIBUTES


def model_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """Every layer, nested ones included, in the model's order."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def layer_names(model: keras.Model) -> Dict[int, str]:
    """id(layer) -> a name unique in the model: the layer's own, with #2, #3... for repeats (nested
    models may reuse a name)."""
    names, seen = {}, {}
    for layer in model_layers(model):
        count = seen[layer.name] = seen.get(layer.name, 0) + 1
        names[id(layer)] = layer.name if count == 1 else f"{layer.name}#{count}"
    return names


OnOutput = Callable[[str, keras.layers.Layer, object], None]


class LayerCall(NamedTuple):
    layer: keras.layers.Layer
    before: int  # how many calls had finished when this one began
    inputs: list  # the tensors it was given (held: their ids stay theirs)
    outputs: list


def _tensors(structure) -> list:
    return [t for t in tf.nest.flatten(structure) if hasattr(t, "shape") and hasattr(t, "dtype")]


class LayerProbe:
    """Wraps each layer's `call` (an instance attribute shadowing the method: Keras' __call__ calls
    self.call), and restores the method on exit. Eager calls only: in a tf.function the outputs would
    be symbolic. `record_calls`: `.calls` gets each call (LayerCall), in the order they finished."""

    def __init__(self, model: keras.Model, on_output: Optional[OnOutput] = None, *, record_calls: bool = False):
        self.model, self.on_output, self.record_calls = model, on_output, record_calls
        self.names = layer_names(model)
        self.layers = model_layers(model)
        self.calls: List[LayerCall] = []

    def __enter__(self) -> "LayerProbe":
        for layer in self.layers:
            method = layer.call

            def call(*args, _method=method, _layer=layer, **kwargs):
                before = len(self.calls)
                outputs = _method(*args, **kwargs)
                if self.record_calls:
                    self.calls.append(LayerCall(_layer, before, _tensors((args, kwargs)), _tensors(outputs)))
                if self.on_output is not None:
                    self.on_output(self.names[id(_layer)], _layer, outputs)
                return outputs

            object.__setattr__(layer, "call", call)  # bypasses Keras' attribute tracking
        return self

    def __exit__(self, *exc) -> bool:
        for layer in self.layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        return False


def _sized(layer) -> bool:
    return any(isinstance(getattr(layer, attr, None), int) for attr in SIZE_ATTRIBUTES)


def output_layers(calls: List[LayerCall], outputs) -> set:
    """The ids of the layers whose size is the outputs' (the task's: 10 classes), from the calls of one eager
    model call (LayerProbe's record_calls), alike for Sequential, functional and subclassed models: from each
    output back through the layers that returned it unsized (an Activation, Dropout, Reshape, a nested model)
    to the first sized one (Dense, conv, attention). A tensor no layer returned (Keras' cast of a float32
    layer's float16 inputs, an op in a subclassed model's call) is taken as the latest earlier call's output
    of its shape; where there is none, nothing is found (and the tip then leaves nothing out)."""
    producer: Dict[int, LayerCall] = {}
    for call in calls:  # innermost first: a nested model returns its last layer's tensor after that layer
        for tensor in call.outputs:
            producer.setdefault(id(tensor), call)
    found: set = set()
    seen: set = set()
    pending = [(tensor, len(calls)) for tensor in _tensors(outputs)]
    while pending:
        tensor, before = pending.pop()
        call = producer.get(id(tensor)) or _latest_of_shape(calls[:before], tensor.shape)
        if call is None or id(call) in seen:
            continue
        seen.add(id(call))
        if _sized(call.layer):
            found.add(id(call.layer))
        else:
            pending += [(upstream, call.before) for upstream in call.inputs]
    return found


def _latest_of_shape(calls: List[LayerCall], shape) -> Optional[LayerCall]:
    for call in reversed(calls):
        if any(t.shape == shape for t in call.outputs):
            return call
    return None
