"""Typed config schemas (Hydra ConfigStore) and the one helper that turns config into objects.

Every YAML file under `conf/` extends one of these dataclasses, so an unknown key, a wrong type or a
missing group option is an error at composition time, before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import importlib
import logging
import pkgutil

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING


class ConfigError(ValueError):
    """A config value that cannot work (a model, optimizer or data option); the message names the key and
    the fix. The CLI exits 2 on it, without a traceback."""



@dataclass
class TrainerConfig:
    """The training loop: how long, how often to log/evaluate/checkpoint, how steps are compiled."""

    max_steps: Optional[int] = None  # total train steps; with `epochs` too, the smaller wins
    epochs: Optional[float] = None  # needs a data set of known size
    log_every: int = 100  # steps between train log events (metrics.jsonl, TensorBoard, progress bar)
    eval_every: int = 0  # steps between evaluations; 0: evaluate at the end only
    eval_steps: Optional[int] = None  # None: the whole eval set
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end); 0: end only
    checkpoint_every_secs: Optional[float] = None
    keep_checkpoints: int = 3
    keep_best: int = 1
    best_metric: Optional[str] = "accuracy"  # an eval metric name; None: no best-checkpoint tracking
    best_mode: str = "max"  # max | min
    resume: bool = True  # resume from the run folder's checkpoints when there are any
    init_from: Optional[str] = None  # warm start: model weights only, from a checkpoint or .keras/.weights.h5
    # Compile the steps with XLA. None (auto): on only without a GPU for mixed_float16 (TensorFlow's
    # float16 CPU kernels are ~100x slower than XLA's) and for mixed_bfloat16 on an Intel CPU with
    # AVX-512 BF16 and no AMX (its bfloat16 kernels are slow, XLA's are not).
    jit_compile: Optional[bool] = None
    xla_auto_cluster: bool = False  # TF's XLA auto-clustering (global)
    # With XLA on one replica: compile the optimizer update into the step's XLA cluster (true) or run it
    # outside XLA with TF's multi-threaded fused kernels (false). None (auto): inside, except on a CPU for
    # models whose variables average >= 1M parameters (the guide's MLP), where the kernels outside win.
    xla_whole_step: Optional[bool] = None
    steps_per_loop: int = 1  # train steps per tf.function call
    grad_accum_steps: int = 1  # micro-batches accumulated per optimizer update
    # Keras Adam/AdamW/SGD(momentum) updates in one TensorFlow kernel per variable (same arithmetic;
    # see trainer/fused.py); false: Keras' own ops.
    fused_optimizer: bool = True
    deterministic: bool = False  # op determinism + seeded everything: bit-identical reruns on CPU
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class PrecisionConfig:
    """Dtype policy and loss scaling (see trainer/loss_scale.py)."""

    policy: str = "float32"  # float32 | mixed_float16 | mixed_bfloat16
    loss_scale: Optional[float] = None  # a number: fixed scale; None: dynamic (float16) or none
    initial_scale: float = 2.0**15
    growth_interval: int = 2000
    scale_bfloat16: bool = False  # bfloat16 has float32's range: no scaling unless asked
    strict_outputs: bool = False  # reject, rather than fix, a model whose outputs are not float32
    max_consecutive_skips: int = 100  # stop the run after this many non-finite steps in a row
    # Without loss scaling (float32, bfloat16): skip a non-finite update (true), or apply every update
    # unconditionally and stop at the first non-finite step (false: no wait on the finite check before
    # the update: 2% faster on the bench Transformer, scripts/bench_step.py; see README "When numbers go bad").
    skip_nonfinite: bool = True
    float32_layers: List[str] = field(default_factory=list)  # layer class names kept in float32
    debug_numerics: bool = False  # tf.debugging.enable_check_numerics: names the first bad op


@dataclass
class StrategyConfig:
    """Which tf.distribute strategy runs the steps (see trainer/distribute.py)."""

    name: str = "default"  # default | one_device | mirrored | multi_worker | tpu
    device: Optional[str] = None  # one_device: e.g. /gpu:0 (default: first GPU, else CPU)
    devices: Optional[List[str]] = None  # mirrored: explicit devices (default: all GPUs)
    logical_cpus: int = 0  # mirrored on CPU: split the CPU into N logical devices
    communication: str = "auto"  # multi_worker: auto | ring | nccl
    tpu: Optional[str] = None  # tpu: name or grpc address ("" or local for a TPU VM)


@dataclass
class OptimizerConfig:
    """A Keras optimizer. `lr` becomes `learning_rate` (or a schedule's peak); clipping is ours."""

    _target_: str = "keras.optimizers.Adam"
    lr: float = 1e-3
    clipnorm: Optional[float] = None  # global-norm clip of the *unscaled* gradients, in the train step
    schedule: Optional[str] = None  # None | constant | cosine | step (see trainer/optim.py)
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # None: the run's steps after the warmup
    alpha: float = 0.0  # cosine: final lr as a fraction of lr
    boundaries: List[int] = field(default_factory=list)  # step: global steps after which lr is multiplied by `decay_rate`
    decay_rate: float = 0.1


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.Adam"
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "keras.optimizers.AdamW"
    weight_decay: float = 0.01
    epsilon: float = 1e-6
    exclude_from_weight_decay: List[str] = field(default_factory=lambda: ["bias", "gamma", "beta"])


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.SGD"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: Optional[float] = None


@dataclass
class FinetuneConfig:
    """Fine-tuning knobs a recipe's fine-tune callback reads (see recipes/resnet.py FineTune)."""

    freeze_steps: int = 0  # the backbone is frozen (BatchNorm in inference mode) for these first steps
    backbone_lr_mult: float = 1.0  # then its gradients are scaled by this (an SGD learning-rate multiplier)
    new_head: bool = False  # re-initialize the head after trainer.init_from (a new task)


@dataclass
class Config:
    """The whole run. `data` and `model` are typed by the schema their group option extends."""

    seed: int = 0
    recipe: str = "mnist"  # set by the recipe group: names the run in logs
    trainer_class: str = "trainer.Trainer"  # a recipe with its own step names its Trainer subclass here
    data: Any = MISSING
    model: Any = MISSING
    optimizer: OptimizerConfig = MISSING
    loss: Any = field(
        default_factory=lambda: {
            "_target_": "keras.losses.SparseCategoricalCrossentropy",
            "from_logits": True,
        }
    )
    metrics: Dict[str, Any] = field(
        default_factory=lambda: {"accuracy": {"_target_": "keras.metrics.SparseCategoricalAccuracy"}}
    )
    callbacks: Dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ...}: extra Callbacks
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


def register_configs() -> None:
    """Puts the schemas in Hydra's ConfigStore; YAML files name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="precision", name="base_precision", node=PrecisionConfig)
    cs.store(group="strategy", name="base_strategy", node=StrategyConfig)
    cs.store(group="optimizer", name="base_adam", node=AdamConfig)
    cs.store(group="optimizer", name="base_adamw", node=AdamWConfig)
    cs.store(group="optimizer", name="base_sgd", node=SGDConfig)
    # Each recipe module (recipes/*.py, installed as trainer.recipes) stores the schemas of its own
    # data and model options in its register_configs(cs); recipes import heavy libraries lazily.
    import trainer.recipes

    for info in pkgutil.iter_modules(trainer.recipes.__path__):
        try:
            module = importlib.import_module(f"trainer.recipes.{info.name}")
        except Exception as e:  # noqa: BLE001 - one broken recipe must not take the others down
            logging.getLogger(__name__).warning(
                "recipe module trainer.recipes.%s failed to import (%s: %s); its config options are unavailable",
                info.name, type(e).__name__, e,
            )
            continue
        if hasattr(module, "register_configs"):
            module.register_configs(cs)
