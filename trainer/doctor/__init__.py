"""`python -m trainer.doctor`: measure this model on this hardware and say which precision, XLA setting and
batch size to train with, and why (hardware, model table, numerics, speed and memory, recommendation).

From Python, on any model the Trainer takes:

    report = trainer.doctor.diagnose(build_model, dataset, loss, build_optimizer, batch_size=64)

`report` is what doctor.json holds; `trainer.doctor.render_text(report)` is the printed report.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

from trainer.doctor.render import render_text  # noqa: F401  (the public API)
from trainer.doctor.report import recommend, write_json  # noqa: F401  (the public API)

SECTIONS = ("hardware", "model", "numerics", "speed")


def _progress_to_stderr(start: float) -> Callable[[str], None]:
    import sys

    def progress(message: str) -> None:
        print(f"[doctor {time.perf_counter() - start:4.0f}s] {message}", file=sys.stderr, flush=True)

    return progress


def _data_for_batch(data) -> Callable[[int], object]:
    """batch size -> data the Trainer takes. `data` is already that function, or a tf.data.Dataset of
    batches, re-batched for other sizes."""
    import tensorflow as tf

    if not isinstance(data, tf.data.Dataset):
        return data
    return lambda size: data.unbatch().batch(size, drop_remainder=True)


def _first_batches(data, count: int) -> list:
    import tensorflow as tf

    dataset = data if isinstance(data, tf.data.Dataset) else data(tf.distribute.InputContext())
    return list(dataset.take(count))


def candidate_policy(policy: str, device_kind: str) -> str:
    """The reduced precision the model table shows: the user's, or this device's natural one."""
    if policy != "float32":
        return policy
    return "mixed_float16" if device_kind == "GPU" else "mixed_bfloat16"


def baseline_xla(trainer_config, strategy, precision=None) -> bool:
    """What trainer.jit_compile resolves to for the user's precision here (the baseline of the speed-ups)."""
    import tensorflow as tf

    from trainer.xla_plan import decide_jit_compile
    from trainer.config import PrecisionConfig

    if isinstance(trainer_config.jit_compile, bool):
        return trainer_config.jit_compile
    on_cpu = not tf.config.list_physical_devices("GPU") and not isinstance(strategy, tf.distribute.TPUStrategy)
    try:
        return bool(decide_jit_compile(trainer_config, precision or PrecisionConfig(), on_cpu=on_cpu,
                                       replicas=strategy.num_replicas_in_sync))
    except Exception:  # noqa: BLE001 - a mode the decision does not take here (e.g. measure): off
        return False


def _single_model(model_builder) -> bool:
    import keras

    from trainer.doctor.model_table import same_auto_names
    from trainer.precision import set_policy

    set_policy("float32")
    with same_auto_names():
        return isinstance(model_builder(), keras.Model)


def _section(report: dict, key: str, progress: Callable[[str], None], measure: Callable[[], dict]) -> None:
    """report[key] = measure(); a model this section cannot handle gets report[key + "_skipped"] with the
    error instead, and the other sections still run."""
    try:
        report[key] = measure()
    except Exception as e:  # noqa: BLE001 - reported, not raised: the rest of the report is still worth having
        report[f"{key}_skipped"] = f"failed on this model: {type(e).__name__}: {str(e).strip()[:300]}"
        progress(f"{key}: {report[f'{key}_skipped']}")


def diagnose(model: Callable, data, loss, optimizer: Optional[Callable] = None, *, batch_size: Optional[int] = None,
             metrics=None, strategy=None, precision="float32", trainer_config=None, trainer_class=None,
             seed: int = 0, clipnorm: Optional[float] = None, weights: Optional[list] = None, quick: bool = False,
             sections: Sequence[str] = SECTIONS, overrides: Sequence[str] = (), command: str = "",
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measures `model` on this hardware and returns the report (the content of doctor.json).

    Args:
      model: a zero-argument function building the model under the current dtype policy (as for Trainer).
      data: a tf.data.Dataset of (x, y) batches, or a function batch_size -> data the Trainer takes.
      loss, optimizer, metrics, strategy, trainer_config, trainer_class, seed, clipnorm: as for Trainer
        (optimizer: a zero-argument builder: every configuration gets a fresh one).
      precision: the policy name or PrecisionConfig of the user's run (float32_layers and loss scaling
        settings carry over to every configuration).
      weights: model weights to use (a trained run's); default: the builder's initial weights.
      quick: the given batch size only, fewer rounds, one numerics batch.
      sections: which of hardware, model, numerics, speed to measure.
      overrides: the user's config overrides, repeated in the recommended command.
    """
    from trainer.assemble import Parts
    from trainer.config import TrainerConfig
    from trainer.precision import precision_config
    from trainer.trainer import Trainer

    parts = Parts(model=model, loss=loss, optimizer=optimizer, metrics=metrics,
                  precision=precision_config(precision, "diagnose(precision=...)"),
                  config=trainer_config or TrainerConfig(), trainer_class=trainer_class or Trainer, seed=seed,
                  clipnorm=clipnorm)
    return diagnose_parts(parts, data, batch_size=batch_size, strategy=strategy, weights=weights, quick=quick,
                          sections=sections, overrides=overrides, command=command, progress=progress)


def diagnose_parts(parts, data, *, batch_size: Optional[int] = None, strategy=None, weights: Optional[list] = None,
                   quick: bool = False, sections: Sequence[str] = SECTIONS, overrides: Sequence[str] = (),
                   command: str = "", progress: Optional[Callable[[str], None]] = None,
                   verify_steps: Optional[int] = None, model_identity: Optional[dict] = None) -> dict:
    """diagnose() on the parts of a Trainer (trainer.assemble.Parts, as `python -m trainer` builds from a config):
    each configuration the speed section times is `parts.build(...)` with its policy and XLA setting;
    `verify_steps`: train the recommended and the current configuration that many steps each (verify.py);
    `model_identity` (auto_precision.model_identity): what precision=auto resolves as, for this model."""
    import keras
    import tensorflow as tf

    from trainer.auto_precision import AUTO, resolve_run_with_reason
    from trainer.doctor.hardware import device_section, hardware_section

    start = time.perf_counter()
    progress = progress or _progress_to_stderr(start)
    strategy = strategy or tf.distribute.get_strategy()
    # precision=auto: what the run would use (and why; the report says it), the baseline of the comparisons
    precision, xla, why = resolve_run_with_reason(parts.precision, strategy, model=model_identity,
                                                  jit_compile=parts.config.jit_compile, overrides=overrides)
    config = parts.config if xla is None else dataclasses.replace(parts.config, jit_compile=xla)
    run_parts = parts.replace(precision=precision, config=config)  # what the run uses: the baseline
    if batch_size is None and not isinstance(data, tf.data.Dataset):
        raise ValueError("trainer.doctor.diagnose: with data given as a function of the batch "
                         "size, give batch_size too")
    data_for_batch = _data_for_batch(data)
    batches = _first_batches(data_for_batch(batch_size) if batch_size else data, 1 if quick else 2)
    if batch_size is None:
        batch_size = int(tf.nest.flatten(batches[0])[0].shape[0])
    device = device_section(strategy, precision.policy)
    report = {"meta": {"command": command, "batch_size": batch_size, "quick": quick, "overrides": list(overrides)}}
    if parts.precision.policy == AUTO:  # what it resolves to is the baseline: said in the report
        report["meta"]["auto"] = {"policy": precision.policy, "jit_compile": xla, "why": why}
    if "hardware" in sections:
        report["hardware"] = hardware_section(strategy, precision.policy, 2 if quick else 3, progress)
    else:
        report["hardware"] = {**device, "matmul": []}
    _model_and_numerics(report, run_parts, batches, batch_size // strategy.num_replicas_in_sync,
                        candidate_policy(precision.policy, device["kind"]), weights, sections, progress)
    if "speed" in sections:
        _speed_and_recommendation(report, run_parts, strategy, data_for_batch, batch_size, quick=quick,
                                  on_cpu=device["kind"] == "CPU", overrides=overrides, verify_steps=verify_steps,
                                  progress=progress)
    keras.mixed_precision.set_dtype_policy("float32")
    report["meta"]["wall_seconds"] = time.perf_counter() - start
    return report


def _model_and_numerics(report: dict, run_parts, batches: list, per_replica_batch: int, candidate: str,
                        weights: Optional[list], sections: Sequence[str], progress: Callable[[str], None]) -> None:
    """report["model"] (the layer table under the `candidate` policy) and report["numerics"] of `run_parts`
    (the run's precision resolved), or why each was skipped: both take one model, the numerics a loss too."""
    import keras

    from trainer.components import per_example_loss
    from trainer.doctor.model_table import model_section
    from trainer.doctor.numerics import numerics_section

    precision = run_parts.precision
    x, _, _ = keras.utils.unpack_x_y_sample_weight(batches[0])
    single = _single_model(run_parts.model)
    why_not = None if single else "the model builder returns several models: the table and numerics take one"
    if run_parts.loss is None and "numerics" in sections and single:
        why_not = "numerics need a loss (Trainer(loss=...))"
    if "model" in sections and single:
        progress(f"model: the layer table under {candidate}")
        _section(report, "model", progress, lambda: model_section(
            run_parts.model, candidate, x, per_replica_batch, weights=weights,
            float32_layers=precision.float32_layers))
    elif "model" in sections:
        report["model_skipped"] = why_not
    if "numerics" in sections and why_not is None:
        _section(report, "numerics", progress, lambda: numerics_section(
            run_parts.model, per_example_loss(run_parts.loss), batches, weights=weights,
            float32_layers=precision.float32_layers, progress=progress))
    elif "numerics" in sections:
        report["numerics_skipped"] = why_not


def _speed_and_recommendation(report: dict, run_parts, strategy, data_for_batch: Callable[[int], object],
                              batch_size: int, *, quick: bool, on_cpu: bool, overrides: Sequence[str],
                              verify_steps: Optional[int], progress: Callable[[str], None]) -> None:
    """report["speed"] (the grid: each configuration is `run_parts` built with its policy, XLA setting and batch)
    and report["recommendation"] against what the run uses (`run_parts`' precision and XLA setting), checked by
    --verify when `verify_steps` are given, else marked unverified."""
    from trainer.doctor.speed import plan_grid, speed_section
    from trainer.doctor.verify import mark_unverified, verify
    from trainer.quiet import no_retracing_warnings

    configs, skipped = plan_grid(batch_size, quick, on_cpu=on_cpu)

    def make_trainer(policy: str, xla: bool):
        # epochs=None: the doctor trains its own count of steps (fit(steps=...)); a run's trainer.epochs asked
        # each fit() for an epoch's size, which the doctor's data does not know, and every configuration failed
        return run_parts.replace(
            precision=dataclasses.replace(run_parts.precision, policy=policy),
            config=dataclasses.replace(run_parts.config, jit_compile=xla, progress_bar=False, verbose=False,
                                       tensorboard=False, init_from=None, epochs=None),
        ).build(strategy=strategy)

    with no_retracing_warnings():  # every configuration is a new Trainer: its train loop traces again
        report["speed"] = speed_section(make_trainer, data_for_batch, configs, skipped, rounds=10 if quick else 12,
                                        call_seconds=0.2, progress=progress)
        report["recommendation"] = recommend(report, overrides, baseline_xla(run_parts.config, strategy,
                                                                             run_parts.precision),
                                             batch_size, policy=run_parts.precision.policy)
        if verify_steps and report["recommendation"]:
            report["recommendation"] = verify(make_trainer, data_for_batch, report["recommendation"],
                                              report["speed"]["configs"], verify_steps, progress)
        elif report["recommendation"]:
            report["recommendation"] = mark_unverified(report["recommendation"])
