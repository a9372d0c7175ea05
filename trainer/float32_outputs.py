"""The float32-output wrapper the Trainer puts around a model whose outputs are float16/bfloat16 under a
mixed policy (trainer.precision.ensure_float32_outputs). It saves as itself (`model.save(...)` writes
`trainer>Float32Outputs` around the wrapped model), so a checkpoint, a .keras file and a warm start all see
the same object graph (the weights under `inner/...`). Keras imports no class of a package other than its
own: load such a file after `import trainer` (which registers this class once Keras loads), else
`keras.saving.load_model` says "Could not locate class 'Float32Outputs'". trainer's own tools import it.
"""
from __future__ import annotations

import keras
import tensorflow as tf

# What loading a file that holds the wrapper needs, for the warning when it is added and for the docs' wording.
LOAD_NOTE = ("a .keras file trainer.model.save(...) writes holds this wrapper: load it after `import trainer` (else "
             "keras.saving.load_model says \"Could not locate class 'Float32Outputs'\"); trainer's tools (export, "
             "evaluate, predict, warm_start, init_from) do so themselves. For a file without it, save "
             "trainer.model.inner (outputs in the reduced precision)")


@keras.saving.register_keras_serializable(package="trainer")
class Float32Outputs(keras.Model):
    """Wraps a model whose outputs are float16/bfloat16 with a float32 linear activation. The original
    is `.inner`; attributes the wrapper lacks (a GAN's `.generator`, say) are read from it, and so are the ones
    Keras' Model has but would answer for the wrapper: `layers`, `get_layer` and `summary()` are the user's
    model's, so code that walks `trainer.model.layers` (freezing a backbone) acts alike under every precision.
    Its own two layers (the model and the activation) are `wrapper_layers`. Its variables and tracked attributes are
    unchanged: the same checkpoints; a .keras file names the activation's group otherwise, and loads both ways."""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{inner.name}_float32_outputs"), **kwargs)
        self.inner = inner
        self.to_float32 = keras.layers.Activation("linear", dtype="float32", name="float32_outputs")

    def __getattr__(self, name):  # only for names the wrapper does not have
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def layers(self):
        return self.inner.layers

    @property
    def wrapper_layers(self):
        """The wrapper's own layers, as Keras' `layers` would list them: the wrapped model, the float32 activation."""
        return [self.inner, self.to_float32]

    def get_layer(self, name=None, index=None):
        return self.inner.get_layer(name=name, index=index)

    def summary(self, *args, **kwargs):
        return self.inner.summary(*args, **kwargs)

    def call(self, inputs, training=None):
        outputs = self.inner(inputs, training=training)
        return tf.nest.map_structure(self.to_float32, outputs)

    def get_config(self):
        return {"name": self.name, "inner": keras.saving.serialize_keras_object(self.inner)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["inner"]), name=config.get("name"))
