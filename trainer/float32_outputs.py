"""The float32-output wrapper the Trainer puts around a model whose outputs are float16/bfloat16 under a
mixed policy (trainer.precision.ensure_float32_outputs), and how it saves: `model.save(...)` writes it as a
plain Keras Functional model (the wrapped model, then a float32 linear activation), which
`keras.saving.load_model` reads in any process, without `import trainer` (Keras imports no class of a
package other than its own: a registered class loads only once its module is imported).
"""
from __future__ import annotations

import logging
from typing import Optional

import keras
import tensorflow as tf

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable(package="trainer")
class Float32Outputs(keras.Model):
    """Wraps a model whose outputs are float16/bfloat16 with a float32 linear activation. The original
    is `.inner`; attributes the wrapper lacks (a GAN's `.generator`, say) are read from it."""

    def __init__(self, inner: keras.Model, **kwargs):
        super().__init__(name=kwargs.pop("name", f"{inner.name}_float32_outputs"), **kwargs)
        self.inner = inner
        self.to_float32 = keras.layers.Activation("linear", dtype="float32", name="float32_outputs")

    def __getattr__(self, name):  # only for names the wrapper does not have
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def call(self, inputs, training=None):
        outputs = self.inner(inputs, training=training)
        return tf.nest.map_structure(self.to_float32, outputs)

    def get_config(self):
        return {"name": self.name, "inner": keras.saving.serialize_keras_object(self.inner)}

    @classmethod
    def from_config(cls, config):
        return cls(keras.saving.deserialize_keras_object(config["inner"]), name=config.get("name"))

    def as_functional(self) -> Optional[keras.Model]:
        """The same computation, sharing these weights, as one Keras Functional model: the wrapped model's
        graph (a Functional's, or a Sequential's) with the float32 activation on its outputs; None when the
        wrapped model has no graph (a subclassed model)."""
        graph = getattr(self.inner, "_functional", None) or self.inner  # a built Sequential keeps its graph there
        inputs, outputs = getattr(graph, "_inputs_struct", None), getattr(graph, "_outputs_struct", None)
        if inputs is None or outputs is None:
            return None
        return keras.Model(inputs, tf.nest.map_structure(self.to_float32, outputs), name=self.name)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves as a plain Keras model (as_functional), which loads without `import trainer`. A compiled
        wrapper (its optimizer and loss are part of the file) or one around a subclassed model saves as
        itself: loading it needs `import trainer` first, said here."""
        plain = None if self.compiled else self.as_functional()
        if plain is not None:
            return plain.save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
        log.warning("%s holds trainer's float32-output wrapper (%s): load it with `import trainer` before "
                    "keras.saving.load_model (else Keras says \"Could not locate class 'Float32Outputs'\"). To save a "
                    "file that loads without trainer, save the wrapped model: model.inner.save(...) (its outputs "
                    "are then in the reduced precision).", filepath,
                    "it is compiled" if self.compiled else "the wrapped model is subclassed, without symbolic inputs")
        return super().save(filepath, overwrite=overwrite, zipped=zipped, **kwargs)
