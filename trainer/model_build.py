"""Creating a Trainer's variables before any step is traced: the models', the float32-output check, every
optimizer's slots. Tracing a step that creates variables would fail under tf.function, and a restore needs them
all to exist.

The one model is called once, to create its variables and to see its outputs' dtypes: on two examples of the
first batch's x (of x, (x, y) or (x, y, w)). An overridden train_step may take batches of any structure
(docs/research.md: they reach it as they are), so there, when the batch has no x or the model refuses it, a model
that says what it takes (a keras.Input, or model.build(shape)) is built on that instead (traced on it when it has
its variables; called on zeros of its shape when, subclassed, Keras' build made none), and one that does not is
a clear error naming the fix.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional, Tuple

import keras
import tensorflow as tf

from trainer import keras_compat, loss_fit, model_summary
from trainer import precision as precision_lib
from trainer.config import PrecisionConfig
from trainer.errors import UserError
from trainer.inputs import unbatched_error
from trainer.layer_probe import LayerProbe, output_layers
from trainer.step import Step

log = logging.getLogger("trainer.core")

BUILD_FIX = ("Fix: give the model a keras.Input (keras.Sequential([keras.Input(shape), ...]), or a functional "
             "model), or call model.build(input_shape) in its builder (input_shape with the batch: (None, ...))")


class UnbuiltModelError(UserError, ValueError):
    """A model whose variables the Trainer cannot create: it has none, and nothing says what its input is."""


def _overridden(trainer, name: str) -> bool:
    return getattr(type(trainer), name) is not getattr(Step, name) or name in vars(trainer)


def _default_loss_path(trainer) -> bool:
    """train_step, compute_loss and compute_gradients all Step's (none overridden by a subclass, a mixin or the
    instance): only then does trainer.loss meet the model's output and the labels as given. An override may turn
    them first (docs/research.md: one-hot the class ids, then super().compute_loss with CategoricalCrossentropy)."""
    return not any(_overridden(trainer, name) for name in ("train_step", "compute_loss", "compute_gradients"))


def build_variables(trainer, sample_batch) -> Optional[keras.Model]:
    """Creates the variables of `trainer`'s models and optimizers before any step is traced: the model (see the
    module's docstring), the float32-output check, every optimizer's slots. It reads the Trainer and sets none of
    its state: returns the one model's float32-output wrapper, which Trainer.build puts in its place, or None."""
    if len(trainer.models) > 1 and type(trainer).train_step is Step.train_step:
        raise TypeError(f"Trainer: the default train_step trains one model; with several {sorted(trainer.models)}, "
                        "override train_step and call self.update(loss, tape, name) (see docs/research.md)")
    with trainer.strategy.scope():
        wrapped = None
        if len(trainer.models) == 1:
            wrapped, outputs = _build_single_model(trainer.model, trainer.precision, sample_batch,
                                                   precision_lib.device_kind(trainer.strategy) == "GPU",
                                                   own_step=_overridden(trainer, "train_step"))
            if _default_loss_path(trainer) and trainer.loss is not None:  # the loss meets the labels as given
                loss_fit.check_labels(trainer.loss, trainer.model, sample_batch, trainer.from_cli)
                loss_fit.warn_if_logits_mismatch(trainer.loss, trainer.model, trainer.from_cli)
            if not any(_overridden(trainer, name) for name in ("train_step", "compute_gradients")):
                # the default step gives each metric the labels and outputs as they are: several are refused here
                keras_compat.check_whole_output_metrics(trainer.train_metrics, outputs, _labels_of(sample_batch))
        else:  # each called only by the user's step, none on the data
            for model in trainer.models.values():
                zeros = _zeros_to_build_on(model)
                if zeros is not None:
                    _call_as(model, ("zeros", zeros))
        # the models as the Trainer will hold them (the wrapper in the one model's place)
        models = {name: model if wrapped is None else wrapped for name, model in trainer.models.items()}
        for name, model in models.items():
            if not model.weights:
                several = (" With several models the Trainer calls none of them on the data before training (only "
                           "your step knows what each is given)." if len(models) > 1 else "")
                raise UnbuiltModelError(f"Trainer: model {name!r} has no variables yet, so its optimizer cannot be "
                                        f"built before the step is traced.{several} {BUILD_FIX}.")
            if trainer.precision.policy != "float32":
                precision_lib.check_variables_float32(model)
        for updater in trainer.updaters.values():  # a wrapper holds the model's variables: the same slots
            updater.build()
        for name, model in models.items():  # the per-layer table: model_summary.txt (callbacks/progress.py)
            # by the name the user gave it (Trainer(models={"encoder": ...})), not Keras' `sequential_1`
            log.info("Model %s: %s%s", model.name if name == "model" else name, model_summary.total_line(model),
                     f"; per layer: {trainer.run_dir / model_summary.FILE}" if trainer.run_dir is not None else "")
    return wrapped


def _labels_of(sample_batch):
    try:
        return keras.utils.unpack_x_y_sample_weight(sample_batch)[1]
    except ValueError:  # no (x, y) structure: the data of an overridden step
        return None


def _build_single_model(model: keras.Model, precision: PrecisionConfig, sample_batch, tensor_cores: bool,
                        own_step: bool) -> Tuple[Optional[keras.Model], Any]:
    """`model` called once (see the module's docstring): (its float32-output wrapper when it needs one, else None;
    its outputs). `tensor_cores`: on GPUs, where the multiples-of-8 tip applies. `own_step`: train_step is
    overridden."""
    tip = precision.policy != "float32" and tensor_cores
    probe = LayerProbe(model, record_calls=True) if tip else contextlib.nullcontext()
    with probe:  # the calls in order: which layers size the outputs (the tip leaves small ones out)
        outputs, built_on = _first_outputs(model, sample_batch, own_step)
    precision_lib.keep_layers_in_float32(model, precision.float32_layers)
    wrapped = precision_lib.ensure_float32_outputs(model, outputs, precision.strict_outputs)
    if wrapped is not model:  # build the wrapper as the model was
        _call_as(wrapped, built_on)
    if tip:  # the batch size is known where the batch's x is (not said when the model was built on its inputs)
        kind = built_on[0]
        x = keras.utils.unpack_x_y_sample_weight(sample_batch)[0] if kind == "data" else None  # the whole batch's
        per_replica = tf.nest.flatten(x)[0].shape[0] if x is not None else None
        precision_lib.warn_not_multiple_of_8(wrapped, output_layers(probe.calls, outputs), per_replica)
    return (wrapped if wrapped is not model else None), outputs


def _first_outputs(model: keras.Model, sample_batch, own_step: bool):
    """`model`'s outputs and what gave them, ("data", x's first two examples), ("specs", TensorSpecs) or ("zeros",
    tensors): the batch's x, as under the default step; under an overridden one, where the batch has no x or the
    model refuses it, what the model says it takes (own_input_specs), else an UnbuiltModelError naming the fix."""
    why = "it has no x, (x, y) or (x, y, w) structure"
    try:
        x, _, _ = keras.utils.unpack_x_y_sample_weight(sample_batch)
    except ValueError:
        if not own_step:
            raise
    else:
        try:
            first_two = tf.nest.map_structure(lambda t: t[:2], x)  # 2 examples suffice
            return model(first_two, training=False), ("data", first_two)
        except Exception as e:  # a dataset not batched? Say so, not Keras' "Invalid input shape"
            unbatched = unbatched_error(model, x)
            if unbatched is not None:
                raise unbatched from None
            if not own_step:
                raise
            said = " ".join(str(e).split())
            why = (f"calling the model on its x failed: {type(e).__name__}: {said[:300]}"
                   f"{'...' if len(said) > 300 else ''}")
    zeros = _zeros_to_build_on(model)
    specs = own_input_specs(model) if model.weights else None
    built_on = ("zeros", zeros) if zeros is not None else ("specs", specs) if specs is not None else None
    if built_on is None:
        raise _cannot_tell_input(model, sample_batch, why)
    return _call_as(model, built_on), built_on


def _call_as(model: keras.Model, built_on):
    """`model`'s outputs on `built_on` (see _first_outputs). One that refuses what it said it takes, where Keras'
    build config kept only a shape (float32 assumed), is an UnbuiltModelError naming the dtype fix."""
    kind, inputs = built_on
    if kind == "data":
        return model(inputs, training=False)
    try:
        return model(inputs, training=False) if kind == "zeros" else traced_outputs(model, inputs)
    except Exception as e:
        if getattr(model, "inputs", None):  # a keras.Input said the dtype: Keras' own error
            raise
        raise _float32_assumed(model, inputs, e) from e


def _float32_assumed(model: keras.Model, inputs, error: Exception) -> UnbuiltModelError:
    shapes = tf.nest.map_structure(lambda t: tuple(t.shape), inputs)
    said = " ".join(str(error).split())
    return UnbuiltModelError(
        f"Trainer: model {model.name!r} was built for a shape (model.build(shape) or its first call), which Keras "
        f"records without a dtype, so the Trainer assumed float32 and called it on float32 inputs of shape {shapes} "
        f"before training; it refused them: {type(error).__name__}: {said[:300]}{'...' if len(said) > 300 else ''}. "
        "Fix: say the dtype with keras.Input(shape, dtype=...) in the builder, e.g. inputs = keras.Input((2,), "
        "dtype=\"int32\"); return keras.Model(inputs, MyModel()(inputs)).")


def own_input_specs(model: keras.Model):
    """TensorSpecs of what `model` takes, in the structure it is called with: its keras.Input(s) (a functional or
    Sequential model), else the shape it was built for (model.build(shape), or its first call); None where neither
    says (or an input is sparse or ragged)."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        if any(getattr(t, "sparse", False) or getattr(t, "ragged", False) for t in inputs):
            return None
        try:
            structure = model.input  # a functional model's (a dict of inputs stays a dict)
        except (AttributeError, ValueError):  # a Sequential never called in a graph: one input
            structure = inputs[0] if len(inputs) == 1 else None
        if structure is None:
            return None
        return tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), structure)
    shape = (model.get_build_config() or {}).get("input_shape")
    if isinstance(shape, (tuple, list)) and shape and all(d is None or isinstance(d, int) for d in shape):
        return tf.TensorSpec((None, *shape[1:]), "float32")
    return None


def _zeros_to_build_on(model: keras.Model):
    """Two examples of zeros of what `model` says it takes (own_input_specs), when it has no variables yet: a
    subclassed model given model.build(shape), for which Keras creates none. None otherwise, or where a size
    besides the batch's is unknown."""
    specs = None if model.weights else own_input_specs(model)
    if specs is None or any(None in spec.shape.as_list()[1:] for spec in tf.nest.flatten(specs)):
        return None
    return tf.nest.map_structure(lambda spec: tf.zeros([2, *spec.shape[1:]], spec.dtype), specs)


def traced_outputs(model: keras.Model, specs):
    """`model`'s outputs (graph tensors: their dtypes and shapes) traced on `specs`, with no example: a built model
    creates no variable there."""
    outputs = []
    tf.function(lambda inputs: outputs.append(model(inputs, training=False))).get_concrete_function(specs)
    return outputs[0]


def _cannot_tell_input(model: keras.Model, sample_batch, why: str) -> UnbuiltModelError:
    shapes = tf.nest.map_structure(lambda t: tuple(getattr(t, "shape", ())), sample_batch)
    state = "has no variables yet" if not model.weights else "was built without a keras.Input or model.build(shape)"
    return UnbuiltModelError(
        f"Trainer: model {model.name!r} {state}, so the Trainer calls it once before training, on the x of the "
        f"first batch (x, (x, y) or (x, y, w)), to create its variables and see its outputs' dtypes; this batch "
        f"(shapes {shapes}): {why}. An overridden train_step takes batches of any structure, but then the model must "
        f"say what it takes. {BUILD_FIX}: it is then built on that, not on the data.")
