"""Typed config schemas (Hydra ConfigStore) and the one helper that turns config into objects.

Every YAML file under `conf/` extends one of these dataclasses, so an unknown key, a wrong type or a
missing group option is an error at composition time, before any work starts.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# The range machinery and ConfigError live in config_ranges; check_ranges is importable here too, as before.
from trainer.config_ranges import (MAX_STEPS, Checked, ConfigError, check_ranges, chosen, combined,  # noqa: F401
                                   as_given, meant_option, ranged, written)


@dataclass
class TrainerConfig(Checked):
    """The training loop: how long, how often to log/evaluate/checkpoint, how steps are compiled."""

    config_key: ClassVar[str] = "trainer"
    python_call: ClassVar[str] = "Trainer"  # its keyword options are these fields

    # total train steps; with `epochs` too, the smaller wins (a warning says so when it cuts the epochs); from the
    # command line, trainer.epochs alone replaces the config's max_steps (docs/getting-started.md#run-length)
    max_steps: Optional[int] = ranged(None, f"[1, {MAX_STEPS}]")
    # needs a data set of known size; an epoch is ⌊batches / (grad_accum_steps × batches_per_step)⌋ steps,
    # the batches left over start the next epoch
    epochs: Optional[float] = ranged(None, "(0, inf)")
    # steps between train log events (metrics.jsonl, TensorBoard, progress bar)
    log_every: int = ranged(100, "[1, inf)")
    eval_every: int = ranged(0, "[0, inf)")  # steps between evaluations; 0: evaluate at the end only
    # eval batches per evaluation; None: the whole eval set (or limit_eval_batches)
    eval_steps: Optional[int] = ranged(None, "[1, inf)")
    checkpoint_every: int = ranged(500, "[0, inf)")  # steps between checkpoints (and one at the end); 0: end only
    checkpoint_every_secs: Optional[float] = ranged(None, "(0, inf)")
    keep_checkpoints: int = ranged(3, "[1, inf)")
    keep_best: int = ranged(1, "[0, inf)")
    best_metric: Optional[str] = "accuracy"  # an eval metric name; None: no best-checkpoint tracking
    # whether a larger or a smaller best_metric is better; auto: from its name, as EarlyStopping's mode=auto
    # (loss-like min, accuracy-like max); a resumed run keeps the mode it began with
    best_mode: str = chosen("auto", "auto|max|min")
    # the final eval metric a multirun sweeper (Optuna) optimizes:
    # `accuracy`, `loss`; None: best_metric, or the loss without one
    sweep_metric: Optional[str] = None
    # whether a larger or a smaller sweep_metric is better; None:
    # best_mode for best_metric (auto: from its name), min for a name ending in loss
    sweep_mode: Optional[str] = chosen(None, "max|min")
    resume: bool = True  # resume from the run folder's checkpoints when there are any
    # resume from this checkpoint, not the newest: ckpt-N | best | best/ckpt-N | a checkpoint's path;
    # what came after is set aside in checkpoints/set-aside-after-N/ (docs/concepts/checkpoints.md)
    resume_from: Optional[str] = None
    # warm start, model weights only (a checkpoint, .keras, .weights.h5); several models: {name:PATH}
    init_from: Any = None
    # Divergence (docs/faults.md). 100x the first loss is far beyond a healthy run's noise (a spike of a
    # few x), yet a diverging run passes it within a log window or two (lr=1e6 on MNIST: 2.4 at step 1,
    # then a mean of 7e22 over the first 10 steps).

    # a train loss above this x the run's first is a divergence; None: off
    divergence_factor: Optional[float] = ranged(100.0, "(1, inf)")
    # stop (exit 3) | rollback (last good checkpoint, half the lr; also on precision.max_consecutive_skips) | warn
    on_divergence: str = chosen("stop", "stop|rollback|warn")
    max_rollbacks: int = ranged(3, "[1, inf)")  # on_divergence=rollback: rollbacks per run before it stops (exit 3)
    # A run that does not learn (docs/faults.md): a train loss still >= 95% of the run's first at
    # not_learning_at of the run (not before step 200), with no accuracy clearly above chance; or, at the end, a
    # train loss that fell with the final eval accuracy at chance.

    # warn | divergence (as trainer.on_divergence says: stop exits 3) | off
    not_learning: str = chosen("warn", "warn|divergence|off")
    # the part of the run after which the loss must be below its start (judged once, not before step 200)
    not_learning_at: float = ranged(0.25, "(0, 1]")
    # Compile the steps with XLA: true | false | null (auto) | measure. measure: the first loop times a few
    # real train steps each way and keeps the faster (docs/concepts/distribution.md); a resumed run keeps
    # that choice. Auto: on a CPU, a run of 10,000+ steps measures (float32, bfloat16; not with deterministic);
    # otherwise XLA is on only without a GPU for mixed_float16 (TensorFlow's float16 CPU kernels are ~100x slower than
    # XLA's) and for mixed_bfloat16 on an Intel CPU with AVX-512 BF16 and no AMX.
    jit_compile: Any = chosen(None, "true|false|null|measure")
    xla_auto_cluster: bool = False  # TF's XLA auto-clustering (global)
    # With XLA on one replica: compile the optimizer update into the step's XLA cluster (true) or run it
    # outside XLA with TF's multi-threaded fused kernels (false). None (auto): inside, except on a CPU for
    # models whose variables average >= 1M parameters (the guide's MLP), where the kernels outside win.
    xla_whole_step: Optional[bool] = None
    steps_per_loop: int = ranged(1, "[1, inf)")  # train steps per tf.function call
    grad_accum_steps: int = ranged(1, "[1, inf)")  # micro-batches accumulated per optimizer update
    # K > 1: a train_step whose class sets takes_several_batches = True gets a tuple of
    # K fresh batches (a WGAN's critic updates); an epoch stays one pass over the data
    batches_per_step: int = ranged(1, "[1, inf)")
    # Keras Adam/AdamW/SGD(momentum) updates in one TensorFlow kernel per variable (same arithmetic;
    # see trainer/fused.py; a step XLA compiles whole keeps Keras' ops, which XLA fuses); false: Keras' own ops.
    fused_optimizer: bool = True
    deterministic: bool = False  # op determinism + seeded everything: bit-identical reruns on CPU
    # a progress bar: None (auto) when stderr is a terminal (or a notebook), as tqdm's disable=None, so a log
    # (`2>log`, a batch job) gets log lines, not bar frames; true: always; false: a log line per log and eval event
    progress_bar: Optional[bool] = None
    # fit() from Python: its log lines and end summary on stderr, where no logging is configured (the CLI
    # configures it); false: quiet, no log lines and no progress bar.
    verbose: bool = True
    tensorboard: bool = True
    # Seeing where time goes, and debug modes (docs/debugging.md).

    # [N, M]: a TensorBoard profiler trace of train steps N..M, under the run folder's tensorboard/
    profile_steps: Optional[List[int]] = ranged(None, "[1, inf)")
    # a dry run from fresh weights: true, 2 train steps and 2 eval batches; N (Lightning's whole number),
    # N of each; 0/false: off. No checkpoints, metrics or TensorBoard files; the run folder is neither read nor written
    fast_dev_run: Any = combined(False)
    # N > 0: train, and evaluate, on the same first N training batches over and over (the loss should go near 0); 0: off
    overfit_batches: int = ranged(0, "[0, inf)")
    # Lightning's name: N >= 1 evaluates N batches (as eval_steps), a fraction in (0, 1) that share of the
    # eval set (of known size). Set this or eval_steps: both, to different values, is an error.
    limit_eval_batches: Optional[float] = ranged(None, "(0, inf)")

    @staticmethod
    def check_combined(values: Mapping[str, Any], prefix: str, python: Optional[Mapping[str, str]] = None) -> None:
        """The rules across fields: batches_per_step not with grad_accum_steps; profile_steps is [N, M] with
        N <= M; fast_dev_run is a bool or a whole number >= 0; limit_eval_batches above 1 is a whole number, and
        agrees with eval_steps. `python`: as in check_ranges, the fixes name the Python argument."""
        def fix(name: str, value: Any) -> str:
            return written(f"{prefix}.{name}", value, (python or {}).get(name, ""), cli=not python)

        def named(name: str, value: Any, quoted: bool = False) -> str:  # the lead-in's `trainer.x=1`, `Trainer(x=1)`
            return as_given(f"{prefix}.{name}", value, (python or {}).get(name, ""), not python,
                         None if quoted else str(value))

        if (per_step := values.get("batches_per_step", 1)) > 1 and values.get("grad_accum_steps", 1) > 1:
            raise ConfigError(f"{named('batches_per_step', per_step)} and "
                              f"{named('grad_accum_steps', values['grad_accum_steps'])}: the overridden step that "
                              "takes several batches is not accumulated. Fix: set only one of them.")
        steps = values.get("profile_steps")
        if steps is not None and (len(steps) != 2 or steps[0] > steps[1]):
            raise ConfigError(f"{named('profile_steps', list(steps))} must be two steps [N, M] with 1 <= N <= M. "
                              f"Fix: e.g. {fix('profile_steps', [10, 20])} (a trace of steps 10 to 20).")
        dev = values.get("fast_dev_run", False)
        # an Any field (OmegaConf lets 2.5, "yes" and null in), judged here alone: a range said -1 as "must be >= 0"
        if not isinstance(dev, (bool, numbers.Integral)) or (not isinstance(dev, bool) and dev < 0):
            raise ConfigError(f"{named('fast_dev_run', dev, quoted=True)} is neither true/false nor a whole number "
                              f"of batches (>= 0). Fix: {fix('fast_dev_run', True)} (2 train steps and 2 eval "
                              f"batches) or a number N (N of each, as Lightning's fast_dev_run=N), e.g. "
                              f"{fix('fast_dev_run', 5)}; {'false' if not python else 'False'} or 0: off.")
        limit, eval_steps = values.get("limit_eval_batches"), values.get("eval_steps")
        if limit is not None and limit > 1 and limit != int(limit):
            raise ConfigError(f"{named('limit_eval_batches', limit)} is neither a whole number of batches nor a "
                              f"fraction in (0, 1) of the eval set. Fix: e.g. {fix('limit_eval_batches', int(limit))} "
                              f"or {fix('limit_eval_batches', 0.25)}.")
        if limit is not None and eval_steps is not None and limit != eval_steps:
            raise ConfigError(f"{named('limit_eval_batches', limit)} and {named('eval_steps', eval_steps)} both limit "
                              f"evaluation, to different sizes. Fix: set only one of them (limit_eval_batches "
                              "is Lightning's name; it also takes a fraction of the eval set).")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.jit_compile, str) and self.jit_compile != "measure":  # "true" from Python, or quoted
            self.jit_compile = {"true": True, "false": False, "null": None}[self.jit_compile]


@dataclass
class PrecisionConfig(Checked):
    """Dtype policy and loss scaling (see trainer/loss_scale.py)."""

    config_key: ClassVar[str] = "precision"

    # the Keras dtype policy; auto: trainer/auto_precision.py
    policy: str = chosen("float32", "float32|mixed_float16|mixed_bfloat16|auto")
    loss_scale: Optional[float] = ranged(None, "(0, inf)")  # a number: fixed scale; None: dynamic (float16) or none
    initial_scale: float = ranged(2.0**15, "(0, inf)")
    growth_interval: int = ranged(2000, "[1, inf)")
    scale_bfloat16: bool = False  # bfloat16 has float32's range: no scaling unless asked
    strict_outputs: bool = False  # reject, rather than fix, a model whose outputs are not float32
    max_consecutive_skips: int = ranged(100, "[1, inf)")  # stop the run after this many non-finite steps in a row
    # Without loss scaling (float32, bfloat16): skip a non-finite update (true), or apply every update
    # unconditionally and stop at the first non-finite step (false: no wait on the finite check before
    # the update: 2% faster on the bench Transformer, benchmarks/bench_step.py; see README "When numbers go bad").
    skip_nonfinite: bool = True
    float32_layers: List[str] = field(default_factory=list)  # layer class names kept in float32
    debug_numerics: bool = False  # tf.debugging.enable_check_numerics: names the first bad op

    def __post_init__(self) -> None:
        policies = self.__dataclass_fields__["policy"].metadata["choices"]
        if self.policy not in policies:  # from Python (the CLI checks its overrides first): the policy meant
            meant = meant_option("precision", self.policy, policies) if isinstance(self.policy, str) else None
            fix = (f"did you mean {meant}? From Python: Trainer(precision=\"{meant}\") (or "
                   f"PrecisionConfig(policy=\"{meant}\"))" if meant
                   else 'give one of them, e.g. Trainer(precision="mixed_bfloat16")')
            # named as Python gives it: Trainer(precision=...) or PrecisionConfig(policy=...), not the config key
            raise ConfigError(f"precision policy {self.policy!r} is not one of {'|'.join(policies)}. Fix: {fix}.")
        super().__post_init__()


@dataclass
class StrategyConfig(Checked):
    """Which tf.distribute strategy runs the steps (see trainer/distribute.py)."""

    config_key: ClassVar[str] = "strategy"

    name: str = chosen("default", "default|one_device|mirrored|multi_worker|tpu")  # the tf.distribute strategy
    device: Optional[str] = None  # one_device: e.g. /gpu:0 (default: first GPU, else CPU)
    devices: Optional[List[str]] = None  # mirrored: explicit devices (default: all GPUs)
    # mirrored on CPU: split the CPU into N logical devices; None: no split
    logical_cpus: Optional[int] = ranged(None, "[1, inf)")
    communication: str = chosen("auto", "auto|ring|nccl")  # multi_worker: the collective implementation
    tpu: Optional[str] = None  # tpu: name or grpc address ("" or local for a TPU VM)


@dataclass
class OptimizerConfig(Checked):
    """A Keras optimizer. `lr` becomes `learning_rate` (or a schedule's peak); clipping is ours."""

    config_key: ClassVar[str] = "optimizer"

    _target_: str = "keras.optimizers.Adam"
    lr: float = ranged(1e-3, "(0, inf)")
    # global-norm clip of the *unscaled* gradients, in the train step
    clipnorm: Optional[float] = ranged(None, "(0, inf)")
    # each gradient value clipped to [-v, v]: Keras' option, on the unscaled, all-reduced gradients (after clipnorm)
    clipvalue: Optional[float] = ranged(None, "(0, inf)")
    schedule: Optional[str] = chosen(None, "constant|cosine|linear|step")  # None: constant (see trainer/optim.py)
    warmup_steps: int = ranged(0, "[0, inf)")
    decay_steps: Optional[int] = ranged(None, "[1, inf)")  # None: the run's steps after the warmup
    alpha: float = ranged(0.0, "[0, 1]")  # cosine: final lr as a fraction of lr
    # step: global steps after which lr is multiplied by `decay_rate`
    boundaries: List[int] = ranged(interval="[1, inf)", factory=list)
    decay_rate: float = ranged(0.1, "(0, inf)")
    # keep an exponential moving average of the weights: evaluation,
    # best/, the summary and export use it (docs/training-control.md)
    use_ema: bool = False
    # use_ema: average = momentum x average + (1 - momentum) x weights, after every applied update
    ema_momentum: float = ranged(0.99, "[0, 1]")
    # use_ema: the momentum warms up, min(ema_momentum, (1 + n) / (10 + n)), n = optimizer iterations, skipped
    # updates counted (TF's num_updates, timm's ModelEmaV3); false: ema_momentum from the first update (Keras')
    ema_warmup: bool = True
    # use_ema: every N updates the weights themselves are replaced by the average (Keras'); None: never
    ema_overwrite_frequency: Optional[int] = ranged(None, "[1, inf)")


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.Adam"
    beta_1: float = ranged(0.9, "[0, 1)")
    beta_2: float = ranged(0.999, "[0, 1)")
    epsilon: float = ranged(1e-7, "(0, inf)")


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "keras.optimizers.AdamW"
    weight_decay: float = ranged(0.01, "[0, inf)")
    epsilon: float = ranged(1e-6, "(0, inf)")
    exclude_from_weight_decay: List[str] = field(default_factory=lambda: ["bias", "gamma", "beta"])


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.SGD"
    lr: float = ranged(0.1, "(0, inf)")
    momentum: float = ranged(0.9, "[0, 1)")
    nesterov: bool = False
    weight_decay: Optional[float] = ranged(None, "[0, inf)")


@dataclass
class MonitorConfig(Checked):
    """What a training-control callback watches, and when it acts (trainer/callbacks/control.py)."""

    # an eval result as trainer.best_metric names it (loss, accuracy), or a train log as train/NAME
    monitor: str = "loss"
    # min: lower is better, max: higher; auto: max for accuracy-like names, min for losses
    mode: str = chosen("auto", "auto|min|max")
    # monitored events (evaluations, or train logs) without improvement before it acts
    patience: int = ranged(3, "[0, inf)")
    min_delta: float = ranged(0.0, "[0, inf)")  # a change smaller than this is no improvement


@dataclass
class EarlyStoppingConfig(MonitorConfig):
    """callbacks=[early_stopping]: stop when the monitored value stops improving."""

    config_key: ClassVar[str] = "callbacks.early_stopping"
    python_call: ClassVar[str] = "EarlyStopping"

    _target_: str = "trainer.callbacks.EarlyStopping"
    # stop when the value has not beaten this within `patience` events; None: off
    baseline: Optional[float] = ranged(None, "(-inf, inf)")
    start_from_step: int = ranged(0, "[0, inf)")  # warm-up: events before this step are not judged


@dataclass
class ReduceLROnPlateauConfig(MonitorConfig):
    """callbacks=[reduce_lr_on_plateau]: multiply every learning rate (or schedule) by `factor` on a plateau."""

    config_key: ClassVar[str] = "callbacks.reduce_lr_on_plateau"
    python_call: ClassVar[str] = "ReduceLROnPlateau"

    _target_: str = "trainer.callbacks.ReduceLROnPlateau"
    min_delta: float = ranged(1e-4, "[0, inf)")  # a change smaller than this is no improvement (Keras' default)
    factor: float = ranged(0.1, "(0, 1)")  # the new learning rate is the old one times this
    cooldown: int = ranged(0, "[0, inf)")  # monitored events after a reduction during which nothing is judged
    min_lr: float = ranged(0.0, "[0, inf)")  # no reduction takes a learning rate below this


@dataclass
class FinetuneConfig(Checked):
    """Fine-tuning knobs a recipe's fine-tune callback reads (see trainer.recipes.resnet.FineTune)."""

    config_key: ClassVar[str] = "finetune"

    # the backbone is frozen (BatchNorm in inference mode) for these first steps
    freeze_steps: int = ranged(0, "[0, inf)")
    # then its gradients are scaled by this (an SGD learning-rate multiplier)
    backbone_lr_mult: float = ranged(1.0, "[0, inf)")
    new_head: bool = False  # re-initialize the head after trainer.init_from (a new task)


@dataclass
class DataOptions:
    """Keys of every labelled recipe's data config that the framework reads itself (the recipe's builder does
    not see them: data.build_data)."""

    # class -> weight of its training examples in the loss, as Keras' fit: data.class_weight={0:1.0,1:2.0}
    class_weight: Any = None


@dataclass
class Config:
    """The whole run. `data` and `model` are typed by the schema their group option extends."""

    seed: int = ranged(0, "[0, 4294967295]")  # NumPy's seeds are unsigned 32-bit
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
    # more eval sets, name -> data.* keys that differ: +eval_sets.ood.path=ood.npz (docs/training-control.md)
    eval_sets: Dict[str, Any] = field(default_factory=dict)
    # the logger group's picks, name -> {_target_: ...}: logger=[jsonl,tensorboard,csv,mlflow,wandb] (docs/loggers.md)
    logger: Dict[str, Any] = field(default_factory=dict)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)


def register_schemas(cs: ConfigStore) -> None:
    """Puts the framework's schemas in Hydra's ConfigStore; YAML files name them in their defaults lists.
    The recipes' own schemas come from the composition root (trainer.assemble.register_configs)."""
    cs.store(name="base_config", node=Config)
    # as precision and strategy: each group's option names its schema
    cs.store(group="trainer", name="base_trainer", node=TrainerConfig)
    cs.store(group="precision", name="base_precision", node=PrecisionConfig)
    cs.store(group="strategy", name="base_strategy", node=StrategyConfig)
    cs.store(group="optimizer", name="base_adam", node=AdamConfig)
    cs.store(group="optimizer", name="base_adamw", node=AdamWConfig)
    cs.store(group="optimizer", name="base_sgd", node=SGDConfig)
    cs.store(group="callbacks", name="base_early_stopping", node=EarlyStoppingConfig)
    cs.store(group="callbacks", name="base_reduce_lr_on_plateau", node=ReduceLROnPlateauConfig)
