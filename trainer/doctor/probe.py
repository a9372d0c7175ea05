"""A window into every layer: within `with LayerProbe(model, on_output):` each layer's eager call hands
its outputs to `on_output(name, layer, outputs)`. The model table reads their dtypes, the numerics their
magnitudes and (under a GradientTape) the gradients of the loss with respect to them."""
from __future__ import annotations

from typing import Callable, Dict, List

import keras


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


class LayerProbe:
    """Wraps each layer's `call` (an instance attribute shadowing the method: Keras' __call__ calls
    self.call), and restores the method on exit. Eager calls only: in a tf.function the outputs would
    be symbolic."""

    def __init__(self, model: keras.Model, on_output: Callable[[str, keras.layers.Layer, object], None]):
        self.model, self.on_output = model, on_output
        self.names = layer_names(model)
        self.layers = model_layers(model)

    def __enter__(self) -> "LayerProbe":
        for layer in self.layers:
            method = layer.call

            def call(*args, _method=method, _layer=layer, **kwargs):
                outputs = _method(*args, **kwargs)
                self.on_output(self.names[id(_layer)], _layer, outputs)
                return outputs

            object.__setattr__(layer, "call", call)  # bypasses Keras' attribute tracking
        return self

    def __exit__(self, *exc) -> bool:
        for layer in self.layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        return False
