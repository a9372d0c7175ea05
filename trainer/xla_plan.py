"""Where XLA goes: pure decisions from the settings and the hardware, each with its reason (no state,
no Trainer): whether to compile at all (`decide_jit_compile`), how much of the train step
(`plan_xla`), and the one wrapper that compiles (`wrap_xla`). trainer/step_functions.py applies them."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Tuple

import tensorflow as tf

from trainer import precision as precision_lib
from trainer.config import PrecisionConfig, TrainerConfig
from trainer.precision import PrecisionError

log = logging.getLogger("trainer.core")


def decide_jit_compile(config: TrainerConfig, precision: PrecisionConfig, *, on_cpu: bool, replicas: int) -> bool:
    """trainer.jit_compile, with None (auto) resolved for this hardware; logs the reason. With "measure",
    auto's answer until the first loop measures (and for a run too short to measure)."""
    if config.jit_compile == "measure":
        if not precision.debug_numerics:
            log.info("XLA: trainer.jit_compile=measure: the first loop times train steps with XLA on and off "
                     "and keeps the faster")
        config = dataclasses.replace(config, jit_compile=None)
    if precision.debug_numerics:  # its checks (DebugNumericSummaryV2) are ops XLA cannot compile
        if config.jit_compile:
            raise PrecisionError("precision.debug_numerics=true cannot run inside XLA: add trainer.jit_compile=false")
        if config.jit_compile is None:
            log.info("XLA: off (precision.debug_numerics=true checks every op, which XLA cannot compile)")
        return False
    if config.jit_compile is not None:
        if config.jit_compile and on_cpu and precision.policy == "mixed_bfloat16":
            precision_lib.advise_xla_bfloat16_on_cpu()
        return bool(config.jit_compile)
    if precision.policy == "mixed_float16" and on_cpu:
        log.info("XLA: on (trainer.jit_compile=null means auto): TensorFlow's float16 kernels are very slow "
                 "on CPUs, XLA's are not. trainer.jit_compile=false turns it off.")
        return True
    if (precision.policy == "mixed_bfloat16" and on_cpu and replicas == 1
            and precision_lib.xla_bfloat16_is_faster_here()):  # measured on one replica of a 2-core CPU
        log.info(
            "XLA: on (trainer.jit_compile=null means auto): on an Intel CPU with AVX-512 BF16 and no AMX, "
            "TensorFlow's own bfloat16 matmuls are slow and XLA's are not (benchmarks/bench.py, trainer with XLA "
            "over without: MLP 1.43-1.48x, ResNet 1.17-1.28x, Transformer 1.40-1.45x). "
            "trainer.jit_compile=false turns it off."
        )
        return True
    return False


@dataclasses.dataclass(frozen=True)
class XlaPlan:
    """How the train step is compiled. `whole_step`: XLA compiles forward, backward and the update (a
    non-finite update is undone by a select); otherwise, with `jit_compile`, XLA compiles forward and
    backward and the all-reduce and update run outside it. `reason` says why, `warnings` what was ignored."""

    jit_compile: bool
    whole_step: bool
    reason: str
    warnings: Tuple[str, ...] = ()


def plan_xla(config: TrainerConfig, *, jit_compile: bool, on_cpu: bool, replicas: int, custom_step: bool,
             mean_variable_size: float) -> XlaPlan:
    """Decides the layout from the settings alone (no state). Auto, measured on a 2-core CPU
    (`python benchmarks/bench_step.py --only xla_layout`): inside XLA the step of the small ResNet and
    Transformer is 2-13% faster (no op-by-op updates of dozens of small variables); outside it the
    MLP's (20M parameters in 6 variables) is 4-10% faster (TF's fused kernels run multi-threaded,
    XLA:CPU's loops do not keep up). Measured when the update inside XLA was TF's fused kernels; Keras' ops,
    which it is now, were as fast or faster there (docs/benchmarks.md)."""
    one_cluster = replicas == 1 and config.grad_accum_steps == 1  # the all-reduce's merge_call cannot join one
    if not jit_compile:
        return XlaPlan(False, False, "XLA off")
    warnings = []
    if config.xla_whole_step and not one_cluster:
        warnings.append("trainer.xla_whole_step=true is ignored with several replicas or grad_accum_steps > 1")
    if custom_step:
        if not one_cluster:
            return XlaPlan(False, False, "an overridden train_step with several replicas runs without XLA",
                           tuple(warnings + ["XLA: an overridden train_step with several replicas runs without XLA"]))
        if config.xla_whole_step is False:
            warnings.append("trainer.xla_whole_step=false is ignored for an overridden train_step (it cannot be split)")
        return XlaPlan(True, True, "overridden train_step", tuple(warnings))
    if config.xla_whole_step is not None:
        whole = bool(config.xla_whole_step) and one_cluster
        why = "trainer.xla_whole_step" if whole else (
            "trainer.xla_whole_step=false" if config.xla_whole_step is False
            else "several replicas or gradient accumulation")
        return XlaPlan(True, whole, why, tuple(warnings))
    if not one_cluster:
        return XlaPlan(True, False, "several replicas or gradient accumulation", tuple(warnings))
    if on_cpu and mean_variable_size >= 1_000_000:
        return XlaPlan(True, False, f"auto: on a CPU, variables averaging {mean_variable_size:,.0f} parameters update "
                       "faster with TF's fused kernels; trainer.xla_whole_step=true compiles the update too",
                       tuple(warnings))
    sizes = f", variables averaging {mean_variable_size:,.0f} parameters" if on_cpu else ""
    return XlaPlan(True, True, f"auto: one replica{sizes}", tuple(warnings))


def wrap_xla(fn: Callable, replicas: int) -> Callable:
    """`fn` compiled with XLA. With several replicas, one compiled function per replica: an XLA
    cluster lives on one device, and each replica's trace must capture its own variables."""
    if replicas == 1:
        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    compiled = {}

    def per_replica(*args):
        replica = int(tf.get_static_value(tf.distribute.get_replica_context().replica_id_in_sync_group))
        if replica not in compiled:
            compiled[replica] = tf.function(fn, jit_compile=True, reduce_retracing=True)
        return compiled[replica](*args)

    return per_replica
