"""Dtype policies and the checks that go with them: float32 outputs, hardware advice, multiples of 8."""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Iterable, List, Mapping, Tuple

import keras
import tensorflow as tf

from trainer.config import ConfigError, PrecisionConfig
from trainer.errors import UserError
from trainer.float32_outputs import LOAD_NOTE, Float32Outputs  # its home before: `from trainer.precision import` works

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
        "forwards its attributes, its layers and get_layer included); %s. Give the last layer dtype='float32' to "
        "silence this.",
        model.name,
        bad,
        LOAD_NOTE,
    )
    return Float32Outputs(model)


def check_variables_float32(model: keras.Model) -> None:
    bad = [v.path for v in model.trainable_variables if v.dtype != "float32"]
    if bad:
        raise PrecisionError(f"trainable variables must be float32 under mixed precision, found {bad[:5]}")


SIZE_ATTRIBUTES = ("units", "filters", "key_dim", "num_heads_times_key_dim")  # the sizes Tensor Cores tile


def dims_not_multiple_of_8(model: keras.Model) -> List[Tuple[keras.layers.Layer, str, int]]:
    """(layer, attribute, value) of each Dense units / conv filters / attention key_dim that is not a
    multiple of 8, in layers computing in reduced precision (a float32 head or kept-float32 layer does not
    use reduced-precision units, so 1000 output classes are fine)."""
    found = []
    for layer in _layers(model):
        if layer.compute_dtype == "float32":
            continue
        for attr in SIZE_ATTRIBUTES:
            value = getattr(layer, attr, None)
            if isinstance(value, int) and value % 8:
                found.append((layer, attr, value))
    return found


# An output layer narrower than this has the task's size (its classes): the tip leaves it out. A wider one (a
# vocabulary) is named, with OUTPUT_PAD_NOTE: padding it pays, where the task allows.
SMALL_OUTPUT = 256
OUTPUT_PAD_NOTE = "output layer: pad the vocabulary to a multiple of 8 (64 is better) if you can"


def is_small_output(layer, value: int, output_layer_ids: set) -> bool:
    """Whether `layer` is an output layer (layer_probe.output_layers) of the task's size (< SMALL_OUTPUT)."""
    return id(layer) in output_layer_ids and value < SMALL_OUTPUT


def tensor_core_offenders(model: keras.Model, output_layer_ids: set) -> List[Tuple[keras.layers.Layer, str, int, str]]:
    """dims_not_multiple_of_8 with a note each, less the small output layers: (layer, attribute, value, note);
    the note is OUTPUT_PAD_NOTE for a wide output layer, else "". What the Trainer's tip and the doctor's fixes name."""
    return [(layer, attr, value, OUTPUT_PAD_NOTE if id(layer) in output_layer_ids else "")
            for layer, attr, value in dims_not_multiple_of_8(model)
            if not is_small_output(layer, value, output_layer_ids)]


def device_kind(strategy: tf.distribute.Strategy) -> str:
    """"TPU", "GPU" or "CPU": what the steps run on. Only GPUs have Tensor Cores (the multiples-of-8 tip);
    "CPU" is where float16 is emulated and XLA is turned on for it."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "TPU"
    return "GPU" if tf.config.list_physical_devices("GPU") else "CPU"


def warn_not_multiple_of_8(model: keras.Model, output_layer_ids: set, per_replica_batch: int | None) -> List[str]:
    """The guide's tip: Tensor Cores want Dense units, conv filters and batch sizes in multiples of 8. A small
    output layer is left out (its size is the task's, 10 classes say), a wide one (a vocabulary) is named with
    a note; the caller gives the tip only on GPUs (device_kind)."""
    offenders = [f"{layer.name}.{attr}={value}" + (f" ({note})" if note else "")
                 for layer, attr, value, note in tensor_core_offenders(model, output_layer_ids)]
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


def _onednn_custom_ops_on() -> bool:
    """TF_ENABLE_ONEDNN_OPTS as TensorFlow read it when it loaded."""
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):  # TensorFlow moved it: the switch's own default (on, on Linux x86)
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") not in ("0", "false", "False")


def dt_half_line_here() -> str:
    """Whether TensorFlow prints `E... util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512` at
    its first float16 op: "yes", "maybe" or "no". It does when oneDNN's custom ops are on and the CPU lacks
    oneDNN float16 kernels; TF 2.21 (tensorflow/core/util/util.cc, IsDataTypeSupportedByOneDNNOnThisCPU, since
    tensorflow/tensorflow#69087) has them with (AVX-512 BW and (AVX-512 FP16 or AMX-FP16)) or AVX-NE-CONVERT.
    Linux's /proc/cpuinfo does not list AVX-NE-CONVERT (Intel's cores without AVX-512 may have it), and some
    systems have no flags there (not Linux; aarch64 lists `Features`): "maybe" then."""
    if not _onednn_custom_ops_on():
        return "no"
    flags = cpu_flags()
    if not flags:
        return "maybe"
    if ("avx512bw" in flags and flags & {"avx512_fp16", "amx_fp16"}) or "avx_ne_convert" in flags:
        return "no"
    if "avx512bw" not in flags and cpu_vendor() == "GenuineIntel":
        return "maybe"
    return "yes"


DT_HALF_LINE = "E0000 ... util.cc:131] oneDNN supports DT_HALF only on platforms with AVX-512 ..."  # TF 2.21's


def dt_half_line_note(line_here: str) -> str:
    """Says TensorFlow's DT_HALF line is harmless: plainly where it is printed, hedged where it may be, "" where not."""
    what = f"TensorFlow's line `{DT_HALF_LINE}` (once, at the first float16 op)"
    if line_here == "yes":
        return f"{what} is harmless, not a failure: float16 is emulated on this CPU, in float32. "
    if line_here == "maybe":
        return f"If {what} is printed, it is harmless, not a failure: float16 is emulated, in float32. "
    return ""


_said_once: set = set()  # the warnings given once per process (as TensorFlow's own line is)


def forget_said_once() -> None:
    """As a new process: each once-per-process warning is given again (tests)."""
    _said_once.clear()


def warn_float16_on_cpu() -> None:
    """mixed_float16 on a CPU: slow, and TensorFlow's error-level line about it reads like a failure; said (with
    the policy this CPU wants) before the first float16 op, so that it comes first; once per process, as
    TensorFlow's line is (a sweep builds many Trainers)."""
    if "float16_on_cpu" in _said_once:
        return
    _said_once.add("float16_on_cpu")
    flags = cpu_flags()
    advice = (cpu_policy_advice("mixed_float16", cpu_bfloat16_kernels(flags)) if flags else
              "This CPU's flags are unknown here: `python -m trainer.doctor` measures which precision is fastest.")
    log.warning("precision=mixed_float16 on a CPU: float16 is slow on CPUs (mixed_float16 is for GPUs with Tensor "
                "Cores). %s%s", dt_half_line_note(dt_half_line_here()), advice)


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
