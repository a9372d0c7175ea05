"""ResNets for image classification: CIFAR-style ResNet-20/32/56/... and keras.applications ResNet50+.

Run: python -m trainer recipe=resnet                        (ResNet-20 on real Fashion-MNIST, offline, CPU minutes)
     python -m trainer recipe=resnet precision=mixed_float16 model=resnet50 data=image_folder \
         data.train_dir=/data/imagenet/train data.eval_dir=/data/imagenet/val data.num_classes=1000
     python -m trainer recipe=resnet_finetune model=resnet50 model.weights=imagenet data=image_folder ...
     python -m trainer recipe=resnet_finetune trainer.init_from=runs/resnet/<previous run>

Every model is `backbone` (a nested keras.Model that ends in global average pooling) + a new `logits`
Dense head in float32, so fine-tuning can freeze exactly the backbone (FineTune below) and
`trainer.init_from` can restore it while a head of another shape stays at its initial value.
The data pipeline (recipes/images.py) applies the preprocessing the model declares
(`model.preprocessing`, copied into `data.preprocessing`): ImageNet weights only work with theirs.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import keras
from omegaconf import II

from trainer.callbacks import Callback
from trainer.config import ConfigError, ranged
from trainer.layers import BatchNormalization

log = logging.getLogger(__name__)

# CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 weighted layers, three stages of 16/32/64 filters.
CIFAR_RESNETS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9,
                 "resnet110": 18}
# keras.applications builders, the weight file stem Keras uses, and the preprocessing their weights expect.
KERAS_RESNETS = {
    "resnet50": ("ResNet50", "resnet50", "caffe"),
    "resnet101": ("ResNet101", "resnet101", "caffe"),
    "resnet152": ("ResNet152", "resnet152", "caffe"),
    "resnet50v2": ("ResNet50V2", "resnet50v2", "tf"),
    "resnet101v2": ("ResNet101V2", "resnet101v2", "tf"),
    "resnet152v2": ("ResNet152V2", "resnet152v2", "tf"),
}
MODEL_NAMES = sorted(CIFAR_RESNETS, key=lambda n: CIFAR_RESNETS[n]) + list(KERAS_RESNETS)
BACKBONE = "backbone"
HEAD = "logits"


@dataclass
class ResNetModelConfig:
    _target_: str = "trainer.recipes.resnet.build_model"
    name: str = "resnet20"  # resnet8|14|20|32|44|56|110 (CIFAR style) | resnet50|101|152[v2] (keras.applications)
    weights: Optional[str] = "none"  # none | imagenet | PATH to a backbone weights file
    # size of the new float32 logits head (follows the data)
    num_classes: int = ranged(II("data.num_classes"), "[2, inf)")
    image_size: int = ranged(II("data.image_size"), "[1, inf)")  # input side (follows the data)
    dropout: float = ranged(0.0, "[0, 1)")  # before the new head
    base_filters: int = ranged(16, "[1, inf)")  # CIFAR ResNets: width of the first stage (16 in the paper)
    preprocessing: str = "tf"  # what the data pipeline applies: caffe (ResNet v1 weights) | tf (v2) | torch | none
    # CIFAR ResNets: recompute each residual block's activations in the
    # backward pass (less memory, more compute; docs/recipes/resnet.md)
    recompute: bool = False


def register_configs(cs) -> None:
    cs.store(group="model", name="base_resnet", node=ResNetModelConfig)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, kernel_initializer="he_normal",
        name=f"{name}_conv"
    )(x)
    # momentum 0.9 (not Keras' 0.99): moving statistics settle within a short run. Fused: Keras' own
    # BatchNormalization is a chain of float32 elementwise ops that costs more than the convolutions (trainer.layers).
    x = BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def cifar_resnet_backbone(depth_n: int, image_size: int, base_filters: int = 16,
                          recompute: bool = False) -> keras.Model:
    """ResNet v1 for small images: a 3x3 stem, 3 stages of `depth_n` basic blocks (stride 2 at the start
    of stages 2 and 3), 1x1 projection shortcuts where the shape changes, global average pooling.
    `recompute`: each block is a nested model whose activations are recomputed in the backward pass
    (trainer.recompute); the same layers and names, grouped one level deeper."""
    from trainer.recompute import recompute as recomputed

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = _conv_bn(inputs, base_filters, 3, 1, "stem")
    for stage in range(3):
        filters = base_filters * 2**stage
        for block in range(depth_n):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"stage{stage + 1}_block{block + 1}"
            if recompute:
                block_input = keras.Input(x.shape[1:], name=f"{name}_input")
                x = recomputed(keras.Model(block_input, _basic_block(block_input, filters, stride, name), name=name))(x)
            else:
                x = _basic_block(x, filters, stride, name)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=BACKBONE)


def _basic_block(x, filters: int, stride: int, name: str):
    y = _conv_bn(x, filters, 3, stride, f"{name}_1")
    y = _conv_bn(y, filters, 3, 1, f"{name}_2", relu=False)
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = _conv_bn(x, filters, 1, stride, f"{name}_shortcut", relu=False)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def _keras_home() -> Path:
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras").expanduser()


def imagenet_weights_file(name: str, download_timeout: float = 60.0) -> str:
    """Path of the no-top ImageNet weights of a keras.applications ResNet: from the Keras cache
    (KERAS_HOME/models), else downloaded into it. Offline, a ValueError says what to do instead."""
    _, stem, _ = KERAS_RESNETS[name]
    file_name = f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached = _keras_home() / "models" / file_name
    if cached.is_file():
        log.info("ImageNet weights for %s from the Keras cache: %s", name, cached)
        return str(cached)
    try:  # where and how keras.applications itself downloads them (hash checked)
        from keras.src.applications.resnet import BASE_WEIGHTS_PATH, WEIGHTS_HASHES

        origin, file_hash = BASE_WEIGHTS_PATH + file_name, WEIGHTS_HASHES[stem][1]
    except (ImportError, KeyError):
        origin, file_hash = f"https://storage.googleapis.com/tensorflow/keras-applications/resnet/{file_name}", None
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(download_timeout)  # urllib in get_file has no timeout of its own
    try:
        log.info("ImageNet weights for %s are not in %s: downloading %s", name, cached.parent, origin)
        return keras.utils.get_file(file_name, origin, cache_subdir="models", file_hash=file_hash,
                                    cache_dir=str(_keras_home()))
    except Exception as e:
        raise ConfigError(
            f"model.weights=imagenet: the ImageNet weights of {name} are not in the Keras cache ({cached}) and "
            f"downloading them failed ({type(e).__name__}: {str(e)[:200]}); this machine looks offline. Fix: copy "
            f"{file_name} (from {origin}) into {cached.parent}/ (or set KERAS_HOME), or pass its path as "
            f"model.weights=/path/to/{file_name}, or train from scratch with model.weights=none."
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _weights_arg(weights: Optional[str]) -> Optional[str]:
    """'none'/None -> None, 'imagenet' -> 'imagenet', anything else must be an existing file."""
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights!r} is neither none, imagenet nor an existing weights file")
    return str(path)


def build_backbone(name: str, weights: Optional[str], image_size: int, base_filters: int = 16,
                   preprocessing: Optional[str] = None, recompute: bool = False) -> keras.Model:
    """The feature extractor (pooled features), named `backbone`, with its weights loaded."""
    weights = _weights_arg(weights)
    if name in CIFAR_RESNETS:
        if weights == "imagenet":
            raise ConfigError(
                f"model.weights=imagenet: there are no ImageNet weights for {name} (a CIFAR-style ResNet); "
                f"use model=resnet50 (or another of {list(KERAS_RESNETS)}), or model.weights=none|PATH"
            )
        backbone = cifar_resnet_backbone(CIFAR_RESNETS[name], image_size, base_filters, recompute)
        if weights:
            _load_backbone_weights(backbone, weights)
        return backbone
    if name not in KERAS_RESNETS:
        raise ConfigError(f"model.name={name!r} is not a known ResNet; choose one of {MODEL_NAMES}")
    if recompute:
        raise ConfigError(f"model.recompute=true applies to the CIFAR ResNets ({', '.join(CIFAR_RESNETS)}); {name} is "
                          "keras.applications' single graph, with no blocks to recompute. Fix: model.recompute=false, "
                          "or wrap blocks of your own model with trainer.recompute.recompute (docs/research.md)")
    builder, _, expected = KERAS_RESNETS[name]
    if weights == "imagenet":
        if preprocessing is not None and preprocessing != expected:
            raise ConfigError(
                f"{name}'s ImageNet weights expect '{expected}' preprocessing but "
                f"model.preprocessing={preprocessing!r}: set model.preprocessing={expected} (the "
                "data pipeline follows it)"
            )
        weights = imagenet_weights_file(name)
    if image_size < 32:
        raise ConfigError(f"{name} needs images of at least 32x32 (data.image_size={image_size})")
    try:
        return getattr(keras.applications, builder)(
            include_top=False, weights=weights, input_shape=(image_size, image_size, 3), pooling="avg", name=BACKBONE
        )
    except ValueError as e:
        if weights is None:
            raise
        raise ConfigError(f"model.weights={weights!r} does not fit {name} without its top ({str(e)[:300]})") from None


def _load_backbone_weights(backbone: keras.Model, path: str) -> None:
    try:
        backbone.load_weights(path)
    except Exception as e:
        raise ConfigError(
            f"model.weights={path!r} is not a weights file of this backbone ({type(e).__name__}: {str(e)[:300]}). "
            "model.weights takes backbone weights (e.g. backbone.save_weights('b.weights.h5')); to start from a "
            "whole previous run use trainer.init_from=RUN_DIR instead"
        ) from None
    log.info("Backbone weights loaded from %s", path)


def build_model(
    name: str = "resnet20",
    weights: Optional[str] = "none",
    num_classes: int = 10,
    image_size: int = 32,
    dropout: float = 0.0,
    base_filters: int = 16,
    preprocessing: Optional[str] = None,
    recompute: bool = False,
) -> keras.Model:
    """backbone -> [dropout] -> Dense(num_classes) logits in float32 (the mixed-precision rule)."""
    if name not in CIFAR_RESNETS and name not in KERAS_RESNETS:
        raise ConfigError(f"model.name={name!r} is not a known ResNet; choose one of {MODEL_NAMES}")
    backbone = build_backbone(name, weights, image_size, base_filters, preprocessing, recompute)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = backbone(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    logits = keras.layers.Dense(num_classes, dtype="float32", name=HEAD)(x)
    return keras.Model(inputs, logits, name=name)


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
    """

    def __init__(self, freeze_steps: int = 0, backbone_lr_mult: float = 1.0, new_head: bool = False,
                 backbone: str = BACKBONE):
        if freeze_steps < 0 or backbone_lr_mult < 0:
            raise ConfigError(f"FineTune: freeze_steps={freeze_steps} and "
                              f"backbone_lr_mult={backbone_lr_mult} must be >= 0")
        self.freeze_steps = int(freeze_steps)
        self.backbone_lr_mult = float(backbone_lr_mult)
        self.new_head = new_head
        self.backbone_name = backbone
        self.frozen = False

    def on_train_begin(self, trainer) -> None:
        self.backbone = find_layer(trainer.model, self.backbone_name)
        step = int(trainer.step.numpy())
        if self.new_head and step == 0 and trainer.config.init_from:
            self.reinitialize_head(trainer.model)
        if self.backbone_lr_mult != 1.0 and not isinstance(trainer.optimizer, keras.optimizers.SGD):
            log.warning(
                "FineTune: backbone_lr_mult scales the backbone's gradients, which equals a lower learning rate "
                "only for SGD; %s normalizes gradient scale away (use optimizer=sgd)", type(trainer.optimizer).__name__
            )
        if step < self.freeze_steps:
            self.freeze(trainer)
        else:
            self.unfreeze(trainer)

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
