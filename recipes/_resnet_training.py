"""The ResNet recipe's training parts: label-smoothed sparse cross-entropy and the FineTune callback
(recipes/resnet.py has the models and names these `trainer.recipes.resnet.<Name>`, as conf/recipe/ does).

A module of its own because a class statement needs its base: keras.losses.Loss and trainer.Callback load
TensorFlow, and recipes/resnet.py is imported at every CLI start (its config schema), a config error
included. Modules of trainer.recipes whose name starts with `_` are not recipes: assemble.register_configs
skips them.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import keras

from trainer.callbacks import Callback
from trainer.config import ConfigError

__all__ = ["FineTune", "SparseCrossentropyWithSmoothing", "find_layer", "head_layers"]
log = logging.getLogger("trainer.recipes.resnet")  # the recipe's log channel, as before the split


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="trainer")
class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Sparse categorical cross-entropy with label smoothing (Keras' sparse loss has none): integer
    labels become one-hot with 1 - eps on the true class and eps / num_classes spread over all."""

    def __init__(self, from_logits=True, label_smoothing=0.0, reduction="sum_over_batch_size",
                 name="sparse_crossentropy", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        self.from_logits = from_logits
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        if not self.label_smoothing:
            return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=self.from_logits)
        labels = keras.ops.cast(keras.ops.reshape(y_true, [-1]), "int32")
        one_hot = keras.ops.one_hot(labels, y_pred.shape[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )

    def get_config(self):
        return {**super().get_config(), "from_logits": self.from_logits, "label_smoothing": self.label_smoothing}


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def find_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    """The layer called `name` anywhere in `model` (the trainer may have wrapped the model)."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if layer.name == name:
            return layer
    raise ConfigError(f"model {model.name!r} has no layer named {name!r}; FineTune needs the "
                      "backbone as one nested layer")


def head_layers(model: keras.Model, backbone: keras.layers.Layer) -> List[keras.layers.Layer]:
    """Layers with weights that are not part of the backbone."""
    inside = {id(l) for l in backbone._flatten_layers(include_self=True, recursive=True)}
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if id(l) not in inside and l.weights and not l._layers]


class FineTune(Callback):
    """Practitioners' fine-tuning: freeze the backbone for `freeze_steps`, then train it at a lower rate.

    While frozen, `backbone.trainable = False`: its variables leave `model.trainable_variables` (the step
    is re-traced, so they get no gradient, no update and no weight decay) and its BatchNormalization
    layers run in inference mode (Keras 3 ties BN's mode to `trainable`), so the pretrained moving
    statistics are kept. After `freeze_steps` the backbone trains again with its gradients multiplied by
    `backbone_lr_mult` (through `trainer.grad_multipliers`: a per-variable learning rate under SGD).
    A resumed run past `freeze_steps` starts unfrozen with the multiplier.

    Args:
      freeze_steps: steps with the backbone frozen (0: never frozen).
      backbone_lr_mult: the backbone's learning rate relative to the head's once unfrozen.
      new_head: re-initialize the head when starting from trainer.init_from (a new task with the same
        number of classes would otherwise inherit the old task's classifier).
      backbone: the name of the nested backbone layer.
      backbone_weights: where the backbone's weights come from (the recipe passes model.weights): "none" is
        freshly initialized, which a run without trainer.init_from then freezes or slows down (said loudly);
        None: not known, nothing said.
    """

    def __init__(self, freeze_steps: int = 0, backbone_lr_mult: float = 1.0, new_head: bool = False,
                 backbone: str = "backbone", backbone_weights: Optional[str] = None):  # recipes/resnet.py's BACKBONE
        if freeze_steps < 0 or backbone_lr_mult < 0:
            raise ConfigError(f"FineTune: freeze_steps={freeze_steps} and "
                              f"backbone_lr_mult={backbone_lr_mult} must be >= 0")
        self.freeze_steps = int(freeze_steps)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.new_head = new_head
        self.backbone_name = backbone
        self.backbone_weights = backbone_weights
        self.frozen = False

    def on_train_begin(self, trainer) -> None:
        self.backbone = find_layer(trainer.model, self.backbone_name)
        step = int(trainer.step.numpy())
        if self.new_head and step == 0 and trainer.config.init_from:
            self.reinitialize_head(trainer.model)
        if step == 0:
            self.warn_if_random_backbone(trainer)
        if self.backbone_lr_mult != 1.0 and not isinstance(trainer.optimizer, keras.optimizers.SGD):
            log.warning(
                "FineTune: backbone_lr_mult scales the backbone's gradients, which equals a lower learning rate "
                "only for SGD; %s normalizes gradient scale away (use optimizer=sgd)", type(trainer.optimizer).__name__
            )
        if step < self.freeze_steps:
            self.freeze(trainer)
        else:
            self.unfreeze(trainer)

    def warn_if_random_backbone(self, trainer) -> None:
        """Freezing (or slowing) a freshly initialized backbone trains a head on random features, with BatchNorm's
        initial statistics: the run finishes and learns next to nothing. Said before training, with the fix; not
        refused: a smoke run (fast_dev_run) or a from-scratch baseline of the recipe is a choice."""
        random = self.backbone_weights is not None and str(self.backbone_weights).lower() in ("none", "null", "")
        if not random or trainer.config.init_from or not (self.freeze_steps or self.backbone_lr_mult < 1):
            return
        held = (f"frozen for the first {self.freeze_steps} steps (BatchNorm in inference mode, with its initial "
                "statistics)" if self.freeze_steps else "")
        slowed = f"trained at x{self.backbone_lr_mult:g} the head's rate" if self.backbone_lr_mult < 1 else ""
        outcome = ("the head learns on random features, so the run learns little or nothing" if self.freeze_steps
                   else "the backbone learns slowly from random features, and the head on them")
        log.warning(
            "FineTune: the backbone holds freshly initialized (random) weights, no pretrained ones (no "
            "trainer.init_from, model.weights=none), and is %s: %s. Fix: start from trained weights with "
            "trainer.init_from=RUN_DIR (a run of recipe=resnet) or model.weights=imagenet|PATH; or train the whole "
            "model from scratch with recipe=resnet "
            "(or finetune.freeze_steps=0 finetune.backbone_lr_mult=1).",
            " and then ".join(w for w in (held, slowed) if w), outcome)

    def on_loop_end(self, trainer, step: int) -> None:
        if self.frozen and step >= self.freeze_steps:
            self.unfreeze(trainer)

    def freeze(self, trainer) -> None:
        self.backbone.trainable = False
        for v in self.backbone.weights:
            trainer.grad_multipliers.pop(v.path, None)
        trainer.reset_step_functions()
        self.frozen = True
        log.info(
            "FineTune: backbone frozen until step %d (BatchNorm in inference mode); training %d "
            "of %d weights (the head)",
            self.freeze_steps, len(trainer.model.trainable_variables), len(trainer.model.weights),
        )

    def unfreeze(self, trainer) -> None:
        self.backbone.trainable = True
        variables = self.backbone.trainable_variables
        paths = [v.path for v in trainer.model.trainable_variables]
        if len(set(paths)) != len(paths):
            raise RuntimeError("FineTune: variable paths are not unique in this model; "
                               "grad_multipliers cannot address them")
        if self.backbone_lr_mult != 1.0:
            trainer.grad_multipliers.update({v.path: self.backbone_lr_mult for v in variables})
        trainer.reset_step_functions()
        if self.frozen or self.freeze_steps or self.backbone_lr_mult != 1.0:
            log.info(
                "FineTune: backbone trainable at step %d (%d variables, learning rate x%g)",
                int(trainer.step.numpy()), len(variables), self.backbone_lr_mult,
            )
        self.frozen = False

    def reinitialize_head(self, model: keras.Model) -> None:
        """Gives the head fresh initial values (after trainer.init_from restored the old task's head)."""
        names = []
        for layer in head_layers(model, self.backbone):
            for var in layer.trainable_weights:
                initializer = getattr(layer, f"{var.name}_initializer", None)
                if initializer is None:
                    raise ConfigError(f"FineTune(new_head=True): cannot re-initialize {var.path} "
                                      f"(no {var.name}_initializer)")
                var.assign(initializer(var.shape, var.dtype))
                names.append(var.path)
        log.info("FineTune: new head, re-initialized %s", ", ".join(names))
