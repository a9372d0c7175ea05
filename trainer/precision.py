"""Dtype policies and the checks that go with them: float32 outputs, hardware advice, multiples of 8."""
from __future__ import annotations

import dataclasses
import difflib
import logging
from pathlib import Path
from typing import Iterable, List, Mapping, Tuple

import keras
import tensorflow as tf

from trainer.config import ConfigError, PrecisionConfig
from trainer.errors import UserError

log = logging.getLogger(__name__)

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


class PrecisionError(UserError, ValueError):
    """A model or setting that mixed precision cannot run correctly."""


def precision_config(value, where: str = "Trainer(precision=...)") -> PrecisionConfig:
    """A precision argument from Python (`where` names it) as a PrecisionConfig: a policy name, a
    PrecisionConfig, a dict of its fields, or a Keras dtype policy (keras.mixed_precision.Policy, by its name);
    a wrong name or field is a ConfigError naming the one meant, any other type a TypeError."""
    if isinstance(value, PrecisionConfig):
        return value
    if isinstance(value, str):
        return PrecisionConfig(policy=value)
    if isinstance(value, keras.DTypePolicy):
        return PrecisionConfig(policy=value.name)
    if isinstance(value, Mapping):
        fields = [f.name for f in dataclasses.fields(PrecisionConfig)]
        unknown = [key for key in value if key not in fields]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), fields, n=1)
            raise ConfigError(f"{where}: the dict's key {unknown[0]!r} is no field of PrecisionConfig. Fix: "
                              + (f"did you mean {close[0]!r}? " if close else "") + f"Its fields: {', '.join(fields)}.")
        return PrecisionConfig(**value)
    raise TypeError(f"{where} got {value!r} ({type(value).__name__}): it takes a policy name ({', '.join(POLICIES)} or "
                    "auto), a trainer.PrecisionConfig, a dict of PrecisionConfig's fields or a Keras dtype policy "
                    "(keras.mixed_precision.Policy). Fix: e.g. Trainer(precision=\"mixed_bfloat16\").")


def set_policy(policy: str) -> None:
    """Sets Keras' global dtype policy; must happen before any layer is built."""
    if policy not in POLICIES:
        raise PrecisionError(f"precision.policy={policy!r} is not one of {list(POLICIES)}")
    keras.mixed_precision.set_dtype_policy(policy)


def for_ready_made(model, precision: PrecisionConfig, given: bool) -> PrecisionConfig:
    """A model made under Keras' mixed_float16 policy (its compile() optimizer a LossScaleOptimizer, or float16
    layers) trains in float16: under another policy of the Trainer its gradients would go unscaled (float16
    underflows them to zero, silently). Not `given` a precision, the Trainer takes mixed_float16 (said at INFO),
    whose loss scale replaces compile()'s; given another, a PrecisionError names the fix."""
    if not isinstance(model, keras.Model) or precision.policy == "mixed_float16":
        return precision
    if isinstance(getattr(model, "optimizer", None), keras.optimizers.LossScaleOptimizer):
        why = "its compile() optimizer is a LossScaleOptimizer (compiled under the mixed_float16 policy)"
    elif any(layer.compute_dtype == "float16" for layer in _layers(model)):
        why = "its layers compute in float16 (built under the mixed_float16 policy)"
    else:
        return precision
    if not given:
        log.info("The model was made for mixed precision: %s. Training in precision mixed_float16, with the "
                 "Trainer's loss scaling (Trainer(precision=...) chooses another).", why)
        return dataclasses.replace(precision, policy="mixed_float16")
    raise PrecisionError(
        f"The model was made for mixed_float16: {why}. With Trainer(precision={precision.policy!r}) it would train "
        "in float16 without loss scaling (small gradients underflow to zero). Fix: Trainer(precision="
        "\"mixed_float16\"), or build (and compile) the model under the policy the Trainer is given.")


def compute_dtype(policy: str) -> tf.DType:
    return {"float32": tf.float32, "mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}[policy]


def _layers(model: keras.Model) -> List[keras.layers.Layer]:
    return list(model._flatten_layers(include_self=False, recursive=True))


def keep_layers_in_float32(model: keras.Model, class_names: Iterable[str]) -> List[str]:
    """Runs the named layer classes (e.g. LayerNormalization, Softmax) in float32.

    Keras casts a layer's inputs to its compute dtype on every call, so changing the policy of a built
    layer takes effect at the next call; variables are float32 under every policy anyway.
    """
    wanted = set(class_names)
    if not wanted:
        return []
    changed = []
    for layer in _layers(model):
        if type(layer).__name__ in wanted and layer.compute_dtype != "float32":
            layer.dtype_policy = keras.DTypePolicy("float32")
            changed.append(layer.name)
    known = {type(layer).__name__ for layer in _layers(model)}
    unknown = wanted - known
    if unknown:  # a typo would leave the layer it meant in reduced precision, without a word
        raise PrecisionError(f"precision.float32_layers: no layer of class {sorted(unknown)} in model {model.name!r}; "
                             f"its layer classes are {sorted(known)}. Fix: name classes from that list.")
    if changed:
        log.info("Kept in float32 (precision.float32_layers): %s", ", ".join(changed))
    return changed


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


def ensure_float32_outputs(model: keras.Model, outputs, strict: bool) -> keras.Model:
    """Returns `model` if all its outputs are float32, else the model wrapped to make them so.

    Args:
      outputs: the model's outputs on a sample batch (their dtypes are what is checked).
      strict: raise instead of wrapping.
    """
    bad = sorted({t.dtype.name for t in tf.nest.flatten(outputs) if t.dtype != tf.float32})
    if not bad:
        return model
    if strict:
        raise PrecisionError(
            f"model {model.name!r} outputs {bad}, not float32; softmax and the loss are not safe in "
            "reduced precision. Give the last layer dtype='float32' (the mixed-precision guide's rule), "
            "or set precision.strict_outputs=false to have a float32 activation appended."
        )
    log.warning(
        "Model %r outputs %s; appended a float32 linear activation so the loss is computed in float32: "
        "trainer.model is now a Float32Outputs wrapper, your model is trainer.model.inner (the wrapper "
        "forwards its attributes). Give the last layer dtype='float32' to silence this.",
        model.name,
        bad,
    )
    return Float32Outputs(model)


def check_variables_float32(model: keras.Model) -> None:
    bad = [v.path for v in model.trainable_variables if v.dtype != "float32"]
    if bad:
        raise PrecisionError(f"trainable variables must be float32 under mixed precision, found {bad[:5]}")


def dims_not_multiple_of_8(model: keras.Model) -> List[Tuple[keras.layers.Layer, str, int]]:
    """(layer, attribute, value) of each Dense units / conv filters / attention key_dim that is not a
    multiple of 8, in layers computing in reduced precision (a float32 head or kept-float32 layer does not
    use reduced-precision units, so 1000 output classes are fine)."""
    found = []
    for layer in _layers(model):
        if layer.compute_dtype == "float32":
            continue
        for attr in ("units", "filters", "key_dim", "num_heads_times_key_dim"):
            value = getattr(layer, attr, None)
            if isinstance(value, int) and value % 8:
                found.append((layer, attr, value))
    return found


def warn_not_multiple_of_8(model: keras.Model, per_replica_batch: int | None) -> List[str]:
    """The guide's tip: Tensor Cores want Dense units, conv filters and batch sizes in multiples of 8."""
    offenders = [f"{layer.name}.{attr}={value}" for layer, attr, value in dims_not_multiple_of_8(model)]
    if per_replica_batch and per_replica_batch % 8:
        offenders.append(f"per-replica batch size={per_replica_batch}")
    if offenders:
        log.warning(
            "Mixed precision runs fastest when these are multiples of 8 (Tensor Core tiles): %s",
            ", ".join(offenders),
        )
    return offenders


def _cpuinfo_field(name: str) -> str:
    """The value of the first `name` line of /proc/cpuinfo ("" where there is none, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set:
    return set(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    return _cpuinfo_field("vendor_id")


def cpu_model() -> str:
    return _cpuinfo_field("model name")


def cpu_bfloat16_kernels(flags: set) -> str:
    """Which bfloat16 matmul hardware this CPU gives oneDNN: "AMX", "AMD with AVX-512 BF16" (a Zen 4: faster
    than float32), "AVX-512 BF16" (Intel without AMX: slower, measured), or "" (none); the figures, and where
    they were measured: docs/concepts/precision.md."""
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AMD with AVX-512 BF16" if cpu_vendor() == "AuthenticAMD" else "AVX-512 BF16"
    return ""


def xla_bfloat16_is_faster_here() -> bool:
    """The one CPU kind where XLA's bfloat16 matmuls were measured faster than TensorFlow's (oneDNN's):
    Intel with AVX-512 BF16 and no AMX (see advise_xla_bfloat16_on_cpu)."""
    return cpu_bfloat16_kernels(cpu_flags()) == "AVX-512 BF16" and cpu_vendor() == "GenuineIntel"


def advise_xla_bfloat16_on_cpu() -> None:
    """XLA's CPU backend (TF 2.21) does not use oneDNN's bfloat16 matmul kernels, which is a loss where
    those kernels are fast and a gain where they are not. Measured with benchmarks/bench.py (MLP matmuls,
    bfloat16 with XLA over without): ~0.45x on an AMD Zen 4, ~0.19x on an Intel Xeon with AMX, ~1.5x on
    an Intel Xeon with AVX-512 BF16 but no AMX."""
    kernels = cpu_bfloat16_kernels(cpu_flags())
    measure = "`python benchmarks/bench.py --workloads mlp --precisions mixed_bfloat16` compares both here"
    if kernels in ("AMX", "AMD with AVX-512 BF16"):
        log.warning(
            "XLA with mixed_bfloat16 on this CPU (%s): XLA's CPU backend does not use the fast bfloat16 "
            "matmul kernels (oneDNN) that TensorFlow uses without XLA; measured at 0.2-0.45x their speed on "
            "such CPUs. trainer.jit_compile=false is likely faster here (%s).",
            kernels, measure,
        )
    else:
        log.info(
            "XLA with mixed_bfloat16 on a CPU without AMX: on an Intel Xeon with AVX-512 BF16 and no AMX, XLA's "
            "bfloat16 matmuls measured ~1.5x TensorFlow's own (oneDNN's are slow there); %s.", measure,
        )


def hardware_report(policy: str, strategy: tf.distribute.Strategy) -> str:
    """Says, in words, whether this hardware runs `policy` fast. Advice only: never fails."""
    if isinstance(strategy, (tf.distribute.TPUStrategy,)):
        return "TPU: bfloat16 is native (pick mixed_bfloat16); float16 is not supported well on TPUs."
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        lines = []
        for gpu in gpus:
            details = tf.config.experimental.get_device_details(gpu)
            cc = details.get("compute_capability")
            name = details.get("device_name", gpu.name)
            cc_text = f"{cc[0]}.{cc[1]}" if cc else "unknown"
            fp16 = cc is not None and cc >= (7, 0)
            bf16 = cc is not None and cc >= (8, 0)
            lines.append(
                f"GPU {name} (compute capability {cc_text}): float16 Tensor Cores "
                f"{'yes' if fp16 else 'no (needs >= 7.0)'}, bfloat16 {'yes' if bf16 else 'no (needs >= 8.0)'}"
            )
        return "; ".join(lines)
    flags = cpu_flags()
    kernels = cpu_bfloat16_kernels(flags)
    if kernels == "AMX":
        bf16 = "fast here (AMX)"
    elif kernels:
        bf16 = ("supported here (AVX-512 BF16, no AMX), and whether it trains faster than float32 depends on the "
                "CPU and the model (`python -m trainer.doctor` measures your model)")
    else:
        bf16 = "emulated and slow here (no AVX-512 BF16/AMX)"
    fp16 = "avx512_fp16" in flags
    text = (
        "No GPU or TPU found: running on the CPU. "
        f"bfloat16 is {bf16}; "
        f"float16 is {'supported by AVX-512 FP16 but ' if fp16 else ''}slow on CPUs: "
        "mixed_float16 is for GPUs (compute capability >= 7.0)."
    )
    advice = cpu_policy_advice(policy, kernels)
    return f"{text} {advice}" if advice else text


def cpu_policy_advice(policy: str, kernels: str) -> str:
    """What to pick instead of `policy` on a CPU with these bfloat16 kernels (cpu_bfloat16_kernels), or ""
    when `policy` already fits. It follows the measurements in docs/concepts/precision.md (where measured)."""
    bench = "`python benchmarks/bench.py --workloads mlp` measures it"
    if kernels in ("AMX", "AMD with AVX-512 BF16"):
        return "Consider precision=mixed_bfloat16 on this machine." if policy == "mixed_float16" else ""
    if kernels:  # Intel AVX-512 BF16 without AMX: bfloat16 measured 0.56x float32
        if policy == "float32":
            return ""
        return f"Consider precision=float32 on this machine: reduced precision is likely slower here ({bench})."
    if policy != "float32":
        return "Use precision=float32 on this machine: this CPU has no fast float16 or bfloat16 matmuls."
    return ""
