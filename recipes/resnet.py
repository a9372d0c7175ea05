"""ResNets for image classification: CIFAR-style ResNet-20/32/56/... and keras.applications ResNet50+.

Run: python -m trainer recipe=resnet                        (ResNet-20 on real Fashion-MNIST, offline, CPU minutes)
     python -m trainer recipe=resnet precision=mixed_float16 model=resnet50 data=image_folder \
         data.train_dir=/data/imagenet/train data.eval_dir=/data/imagenet/val data.num_classes=1000
     python -m trainer recipe=resnet_finetune model=resnet50 model.weights=imagenet data=image_folder ...
     python -m trainer recipe=resnet_finetune trainer.init_from=runs/resnet/<previous run>

Every model is `backbone` (a nested keras.Model that ends in global average pooling) + a new `logits`
Dense head in float32, so fine-tuning can freeze exactly the backbone (FineTune, in _resnet_training.py) and
`trainer.init_from` can restore it while a head of another shape stays at its initial value.
The data pipeline (recipes/_image_pipeline.py) applies the preprocessing the model declares
(`model.preprocessing`, copied into `data.preprocessing`): ImageNet weights only work with theirs.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from omegaconf import II

from trainer.config import ConfigError, ranged
from trainer.lazy import lazy_module

keras = lazy_module("keras")  # loaded when a run builds the model: register_configs needs none
log = logging.getLogger(__name__)
_TRAINING = ("SparseCrossentropyWithSmoothing", "FineTune", "find_layer", "head_layers")  # recipes/_resnet_training.py

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
    from trainer.layers import BatchNormalization

    x = BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def cifar_resnet_backbone(depth_n: int, image_size: int, base_filters: int = 16,
                          recompute: bool = False) -> keras.Model:
    """ResNet v1 for small images: a 3x3 stem, 3 stages of `depth_n` basic blocks (stride 2 at the start
    of stages 2 and 3), 1x1 projection shortcuts where the shape changes, global average pooling.
    `recompute`: each block is a nested model whose activations are recomputed in the backward pass
    (trainer.recompute); the same layers and names, grouped one level deeper."""
    from trainer.checkpoint_graph import say_nested_by
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
    backbone = keras.Model(inputs, x, name=BACKBONE)
    say_nested_by(backbone, "model.recompute")  # a resume that switches it finds the same weights nested otherwise
    return backbone


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


def __getattr__(name: str):
    """The loss and the FineTune callback (`_target_: trainer.recipes.resnet.FineTune`) live in
    recipes/_resnet_training.py: their classes subclass Keras' and trainer's, which load TensorFlow, and this
    module is imported at every CLI start (its config schema), a config error included."""
    if name in _TRAINING:
        try:
            from trainer.recipes import _resnet_training
        except AttributeError as e:  # Hydra's locate would read it as "no such name" and hide the cause
            raise ImportError(f"trainer.recipes._resnet_training failed to import: {e}") from e
        return getattr(_resnet_training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_TRAINING])
