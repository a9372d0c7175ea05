"""`python -m trainer`: compose the config, log it, instantiate, fit. A short, flat sequence.

Composing and checking the config loads no TensorFlow or Keras (tested): a config error, `--cfg job` and
`--help` answer in half a second instead of five. They load once a run starts, quietly (trainer/quiet.py,
hooked by `import trainer`), so this module imports the Trainer's modules inside the functions of the run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import signal
import sys
from typing import Optional, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer import iterator_release  # at start: its exit hook is registered as TensorFlow loads, before a run's
from trainer.assemble import (check_eval_sets, eval_data_of, parts_of, register_configs, run_length_of_command_line,
                              schema, strategy_of)
from trainer.config import ConfigError, PrecisionConfig, TrainerConfig
from trainer.config_check import check_config
from trainer.errors import EXIT_NUMERICAL, EXIT_USER_ERROR, exit_code_of, find_error, report_error
from trainer.launch import launch_command
from trainer.signals import take_signal_the_run_finished_despite
from trainer.sweep import (BASIC_SWEEPER, job_value, metric_names, register_resolver,
                           register_sweeper_configs)
from trainer.sweep_table import program

log = logging.getLogger("trainer")
logging.getLogger("tensorflow").setLevel(logging.WARNING)  # collective all-reduce chatter at INFO

register_configs()
register_resolver()  # conf/config.yaml's ${job_folder:...}: a multirun job's folder name
register_sweeper_configs()  # hydra/sweeper=optuna, maximizing or minimizing trainer.sweep_metric


def run(cfg: DictConfig) -> dict:
    """Builds everything the config names and trains; returns the final logs."""
    from pathlib import Path

    from trainer.console import log_to_worker_file, say_once_when_log_files_fail

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    log_to_worker_file(run_dir, cfg.strategy.name)  # a non-chief worker's lines, from its first
    say_once_when_log_files_fail()  # a full disk: one line, not a traceback per log line
    _quiet_absl()
    check_config(cfg, HydraConfig.get().runtime.choices)  # a single run's was checked before its folder existed
    check_eval_sets(cfg)
    with _job_folder_lock(run_dir, cfg):
        return _run_in(run_dir, cfg)


def _quiet_absl() -> None:
    """tf.train.Checkpoint logs sharding timings at INFO through absl. absl.logging is imported first: it
    makes the "absl" logger of its own class only when nobody made that logger before it."""
    import absl.logging  # noqa: F401

    logging.getLogger("absl").setLevel(logging.WARNING)


def _job_folder_lock(run_dir, cfg: DictConfig):
    """A multirun job holds its folder's lock while it runs; a single run's lock is held by
    trainer.runlock.RunFolderCallback, taken before Hydra wrote anything into the folder."""
    from trainer.runlock import is_chief_process, run_folder_lock

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return contextlib.nullcontext()
    return run_folder_lock(run_dir, hold=is_chief_process(cfg.strategy.name))


def _run_in(run_dir, cfg: DictConfig) -> dict:
    from trainer.signals import sigterm_deferred_until_training

    run_length = run_length_of_command_line(cfg, HydraConfig.get().overrides.task)  # replaces the recipe's
    trainer_cfg = schema(TrainerConfig, cfg.trainer)
    precision = schema(PrecisionConfig, cfg.precision)
    log.info("Recipe: %s | precision: %s | strategy: %s | run folder: %s", cfg.recipe, precision.policy,
             cfg.strategy.name, run_dir)
    if run_length:
        log.info(run_length)
    if trainer_cfg.fast_dev_run and HydraConfig.get().mode != RunMode.MULTIRUN:
        log.info("fast_dev_run: the run folder above is a temporary one, deleted at the end; the configured "
                 "hydra.run.dir is neither read nor written")

    loggers = [instantiate(node, _convert_="all") for node in cfg.logger.values()]  # a missing package: exit 2 now
    strategy = strategy_of(cfg)  # before TF initializes devices
    precision, trainer_cfg = _resolve_auto_precision(cfg, precision, trainer_cfg, strategy, run_dir)
    with sigterm_deferred_until_training():  # until the loop begins (trainer/signals.py)
        return _build_and_fit(cfg, strategy, run_dir, trainer_cfg, precision, loggers)


def _resolve_auto_precision(cfg: DictConfig, precision: PrecisionConfig, trainer_cfg: TrainerConfig, strategy,
                            run_dir) -> Tuple[PrecisionConfig, TrainerConfig]:
    """precision=auto becomes this machine's policy for this recipe and model (logged with why) before
    anything is built, or on a resume the policy the run trained in; a stored doctor answer's XLA setting
    too, where trainer.jit_compile was left at its default. The run's recorded config holds them, so an
    export computes in what trained."""
    from omegaconf import open_dict

    from trainer.auto_precision import model_identity_of, resolve_run

    resolved, xla = resolve_run(precision, strategy, run_dir=run_dir, model=model_identity_of(cfg),
                                jit_compile=trainer_cfg.jit_compile, overrides=HydraConfig.get().overrides.task)
    with open_dict(cfg):
        cfg.precision.policy = resolved.policy
        if xla is not None:  # resolve_run decided it applies (and logged and recorded it)
            cfg.trainer.jit_compile = xla
            trainer_cfg = dataclasses.replace(trainer_cfg, jit_compile=xla)
    return resolved, trainer_cfg


def _build_and_fit(cfg: DictConfig, strategy, run_dir, trainer_cfg: TrainerConfig, precision: PrecisionConfig,
                   loggers: list) -> dict:
    import tensorflow as tf

    from trainer import debug
    from trainer.callbacks.loggers import flatten
    from trainer.config_record import RunConfigWriter
    from trainer.trainer import Trainer
    from trainer.data import build_data, check_batch_size
    from trainer.distribute import is_chief
    from trainer.inputs import batches_read_per_step, check_step_settings
    from trainer.precision import hardware_report

    chief = is_chief(strategy)
    log.info("Hardware: %s", hardware_report(precision.policy, strategy))
    if trainer_cfg.xla_auto_cluster:
        tf.config.optimizer.set_jit("autoclustering")
        log.info("XLA auto-clustering: on")
    if trainer_cfg.jit_compile is True:  # "measure" decides in the first loop
        log.info("XLA jit_compile: on (train and eval steps)")

    check_batch_size(cfg.data.get("batch_size", 1))  # before the division by it below
    check_step_settings(parts_of(cfg).trainer_class, trainer_cfg)  # before the data is loaded
    data = build_data(cfg.data)
    log.info("Data: %s", data.description)
    examples_per_step = data.batch_size * batches_read_per_step(trainer_cfg)  # an epoch: one pass over the data
    steps_per_epoch = debug.steps_per_epoch(trainer_cfg,
                                            data.train_examples // examples_per_step if data.train_examples else None)
    total = Trainer.total_steps(trainer_cfg.max_steps, trainer_cfg.epochs, steps_per_epoch, cli=True)
    trainer = parts_of(cfg, total, HydraConfig.get().overrides.task).build(
        strategy=strategy,
        run_dir=run_dir,
        is_chief=chief,
        callbacks=[instantiate(c, _convert_="all") for c in cfg.callbacks.values()]
        + ([] if trainer_cfg.fast_dev_run else [RunConfigWriter(cfg, run_dir, HydraConfig.instance().cfg)]),
        loggers=loggers,
    )
    trainer.resume_command = resume_command(run_dir)
    trainer.data_pass_batches = data.train_examples // data.batch_size if data.train_examples else None
    trainer.sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN
    trainer.hparams = flatten(OmegaConf.to_container(cfg, resolve=True))  # the loggers' params (MLflow)
    class_weight = cfg.data.get("class_weight") or None  # config.DataOptions: None (the default) weighs nothing
    logs = trainer.fit(data.train, eval_data_of(cfg, data), steps_per_epoch=steps_per_epoch, batch_size=data.batch_size,
                       class_weight=None if class_weight is None else OmegaConf.to_container(class_weight))
    # The Trainer holds itself in reference cycles (its checkpoint's callback state, its step functions' closures)
    # that only the cyclic GC breaks: it lived until the exit hook, which waited for its kept train iterator and
    # warned to `del trainer` (iterator_release.py). Freed now, the iterator is released on its thread.
    del trainer
    gc.collect()
    return logs


def resume_command(run_dir) -> str:
    """The command line that resumes this run: the user's overrides with the run folder named, since the
    default folder (runs/<recipe>/<date_time>) is new at every start. Hydra keeps the user's overrides
    apart from its own (overrides.task, overrides.hydra). In a grid sweep, the sweep's command with its folder: it
    resumes every job (a job's single-run command, the fallback without the sweep's record and for a sampler such as
    Optuna's, which samples anew, resumes that job alone)."""
    import shlex

    if HydraConfig.get().mode == RunMode.MULTIRUN and HydraConfig.get().sweeper._target_ == BASIC_SWEEPER:
        from pathlib import Path

        from trainer.sweep_table import sweep_command

        command = sweep_command(Path(str(HydraConfig.get().sweep.dir)).absolute())
        if command:
            return command
    overrides = HydraConfig.get().overrides
    ours = ("hydra.mode=", "hydra.run.dir=", "hydra.sweep.")
    kept = [o for o in overrides.hydra if not o.startswith(ours)] + list(overrides.task) + [f"hydra.run.dir={run_dir}"]
    return launch_command(kept) or " ".join([program(), *map(shlex.quote, kept)])  # the launcher's, in its workers


@hydra.main(version_base="1.3", config_path="pkg://trainer.conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float:
    from trainer.loop import TrainingInterrupted

    failed = None  # (exit code, message): acted on after the except blocks, which hold the run's frames
    take_signal_the_run_finished_despite()  # one a Python-API run in this process finished despite
    try:
        logs = run(cfg)
        _stop_the_sweep_after_a_signal(cfg)
    except Exception as e:  # noqa: BLE001 - ours (trainer/errors.py, found through hydra's wrapping) or a fault below
        ours = exit_code_of(e)
        if ours is not None and isinstance(ours[1], TrainingInterrupted):
            _table_of_a_stopped_sweep(cfg, str(ours[1]))
            sys.exit(ours[0])  # a checkpoint was saved and the signal logged; a signal ends a sweep too
        failed = _failure(e, ours, cfg)
        if failed is None:
            raise
    finally:
        if cfg.precision.debug_numerics:  # process-wide: the next job of a multirun must not inherit it
            import tensorflow as tf

            tf.debugging.disable_check_numerics()
    if failed is None:
        value, problem = job_value(logs, cfg.trainer, metric_names(cfg))  # what a multirun sweeper optimizes
        if problem and (HydraConfig.get().mode == RunMode.MULTIRUN
                        and HydraConfig.get().sweeper._target_ != BASIC_SWEEPER):
            log.error("%s", problem)
            failed = (EXIT_USER_ERROR, f"ConfigError: {problem}")  # a failed trial, not a NaN it would rank
    if failed is not None:
        _remove_unused_run_folder(failed[0])
        _job_failed(*failed)
    return value


def _remove_unused_run_folder(code: int) -> None:
    """Bad input found once data or model were built (a data.path, trainer.init_from, labels) leaves no run folder,
    as a config error found before it does: a folder this run made, holding only its lock and log, goes."""
    from trainer.runlock import remove_if_unused

    folder = HydraConfig.get().runtime.output_dir
    if code == EXIT_USER_ERROR and HydraConfig.get().mode != RunMode.MULTIRUN and remove_if_unused(folder):
        log.info("Removed the run folder %s this run had made: nothing was trained in it", folder)


def _failure(error: BaseException, ours, cfg: DictConfig) -> Optional[tuple]:
    """(exit code, message) of a run that failed on `error`, logged; None for a bug (its traceback stays).
    `ours`: exit_code_of(error). Beyond our errors: a full disk or memory, and precision.debug_numerics'
    first non-finite op (tf.debugging.enable_check_numerics raises an InvalidArgumentError on it)."""
    if ours is not None:
        code, cause = ours
        cause = _in_command_line_terms(cause)
        log.error("%s", cause)
        return code, f"{type(cause).__name__}: {cause}"
    out_of = _out_of_resources(error, cfg)
    if out_of is not None:
        log.error("%s", out_of)
        return EXIT_USER_ERROR, out_of
    label = _label_out_of_range(error)
    if label is not None:
        log.error("%s", label)
        return EXIT_USER_ERROR, label
    if cfg.precision.debug_numerics and "Infinity or NaN" in str(error):
        detail = next((line.strip() for line in str(error).splitlines() if "Infinity or NaN" in line), str(error))
        log.error("precision.debug_numerics: the first non-finite value came from: %s", detail)
        return EXIT_NUMERICAL, f"non-finite value: {detail}"
    return None


def _in_command_line_terms(cause: BaseException) -> BaseException:
    """A checkpoint that does not fit because this command runs another recipe or model than the run folder's
    run: said as that (config_record.started_otherwise), not as a Trainer's changed models or frozen=."""
    checkpoint = sys.modules.get("trainer.checkpoint")  # not loaded: no checkpoint was read
    if checkpoint is None or not isinstance(cause, checkpoint.CheckpointError):
        return cause
    import re

    from trainer.config_record import started_otherwise

    shapes = re.search(r" does not fit this \w+ \((.*)\)\. The (config changed|model's layers are nested)", str(cause))
    other = started_otherwise(HydraConfig.get().runtime.output_dir, dict(HydraConfig.get().runtime.choices),
                              found=shapes.group(1) if shapes else "", warm_start="trainer.init_from=" in str(cause))
    return checkpoint.CheckpointError(other) if other else cause


def _label_out_of_range(error: BaseException) -> Optional[str]:
    """The message for a label the step met outside the model's classes (a streamed set, checked by no loader),
    from the sparse cross-entropy's InvalidArgumentError on a CPU; else None."""
    import re

    found = re.search(r"Received a label value of (-?\d+) which is outside the valid range of \[0, (\d+)\)", str(error))
    if found is None:
        return None
    label, classes = found.groups()
    return (f"a training batch holds label {label}, but the model has {classes} outputs (classes "
            f"0..{int(classes) - 1}). Fix: set the model's number of classes (model.num_classes, or data.num_classes "
            "where the model follows it) to cover every label, or repair the labels (data.label_offset for "
            "files that count from 1).")


def _out_of_resources(error: BaseException, cfg: DictConfig) -> Optional[str]:
    """The message for a full disk (or another write the disk refused: trainer/storage_errors.py) or an exhausted
    memory anywhere in `error`'s chain, else None.

    TensorFlow reports both as tf.errors.ResourceExhaustedError ("No space left on device" from a file
    op; "Failed to allocate memory", "OOM when allocating" from a batch or an op of the step)."""
    import re

    import tensorflow as tf

    from trainer.storage_errors import storage_failure

    run_dir = HydraConfig.get().runtime.output_dir
    refused = find_error(error, (tf.errors.OpError, OSError), implicit=True)
    if refused is not None and storage_failure(refused) is not None:
        cause, fix = storage_failure(refused)
        denied = cause.startswith(("permission", "the write is not"))  # a data file's is not the run folder's
        named = getattr(refused, "filename", None) or next(iter(re.findall(r"/[^\s:;,'\"]+", str(refused))), None)
        in_run = str(run_dir) in str(refused) or str(named or "").startswith(str(run_dir))
        if in_run or not denied:
            first = str(refused).strip().splitlines()[0][:300] or type(refused).__name__
            where = (f"under the run folder {run_dir}" if in_run  # a data or cache mount's is named as it is
                     else f"at {named}" if named else "on a disk the error does not name")
            return (f"{cause} {where} ({first}). Fix: {fix}, and resume from the last checkpoint with: "
                    f"{resume_command(run_dir)}")
    seen = find_error(error, (tf.errors.ResourceExhaustedError,), implicit=True)
    if seen is None:
        return None
    first = str(seen).strip().splitlines()[0][:300] if str(seen).strip() else type(seen).__name__
    op = re.search(r"\[Op:(\w+)\]", str(seen))
    # IteratorGetNext: tf.data allocating a batch; any other op: a variable of the model, or the step.
    where = ("the batch does not fit in memory" if op and op.group(1) == "IteratorGetNext"
             else "the model or a training step does not fit in memory")
    batch = cfg.data.get("batch_size")
    accum, k = cfg.trainer.grad_accum_steps, cfg.trainer.get("batches_per_step", 1)
    lower = (f"data.batch_size or trainer.batches_per_step={k} (a step holds its {k} batches at once)" if k > 1
             else "data.batch_size")
    return (f"out of memory: {where} (data.batch_size={batch}, trainer.grad_accum_steps={accum}; "
            f"TensorFlow: {first}). Fix: lower {lower} (with trainer.grad_accum_steps=K an update still "
            "sees K batches), or pick a smaller model or shorter inputs.")


def _stop_the_sweep_after_a_signal(cfg: DictConfig) -> None:
    """A signal in a job's last loop lets the job finish (it is complete); a multirun then stops with the
    signal's exit code instead of starting the next job (a single run exits 0)."""
    signum = take_signal_the_run_finished_despite()
    if signum is not None and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.warning("Received %s during this job's last loop: job complete; sweep stopped (exit %d).",
                    signal.Signals(signum).name, 128 + signum)
        _table_of_a_stopped_sweep(cfg, signal.Signals(signum).name)
        sys.exit(128 + signum)


def _table_of_a_stopped_sweep(cfg: DictConfig, signal_name: str) -> None:
    """A multirun a signal stops writes its table of the jobs so far (Hydra's on_job_end is not reached)."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        from trainer.sweep_table import table_of_a_stopped_sweep

        table_of_a_stopped_sweep(cfg, HydraConfig.get(), signal_name)


class JobFailed(CompactHydraException, RuntimeError):
    """One job of a multirun sweep failed; the sweep goes on and Hydra exits non-zero at its end. Compact:
    Hydra prints its message, not a traceback of this module (the job's error was logged in full)."""


def _job_failed(code: int, message: str) -> None:
    """A single run exits with `code`. In a multirun an exit would end the whole sweep (Hydra only
    catches Exceptions), so the job fails with an exception and the other jobs still run. It carries a
    message, not the error: Hydra keeps it to the sweep's end, and the error's traceback holds the
    job's whole Trainer (model, optimizer state) alive."""
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise JobFailed(f"exit code {code} as a single run: {message}")
    sys.exit(code)


def main() -> None:
    from trainer.argv_check import problem_in
    from trainer.cli_help import help_text

    problem = problem_in(sys.argv[1:])  # what Hydra would reject without the fix (trainer/argv_check.py)
    if problem:
        sys.exit(report_error(ConfigError(problem), prefix="[trainer][ERROR] - "))
    text = help_text(sys.argv[1:])  # Hydra's --help without its slow listing of the groups (trainer/cli_help.py)
    if text is not None:
        print(text)
        sys.exit(0)  # as Hydra's --help
    try:
        _hydra_main()
    except KeyboardInterrupt:  # a second Ctrl-C (trainer/signals.py), or one before the run catches signals
        print("[trainer] stopped at once by Ctrl-C (SIGINT): the newest complete checkpoint is kept (what a save it "
              "cut short left is removed at the next start); run the same command to resume.", file=sys.stderr,
              flush=True)
        iterator_release.exit_promptly(130)
        sys.exit(130)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) or e.code is None else 1
        if code:  # 143/130 after a signal: no minute-long wait at exit for the iterators being freed
            iterator_release.exit_promptly(code)
        raise


def command() -> None:
    """`python -m trainer` and the `trainer` script: main(), then an exit that does not wait for the teardown of an
    iterator over replicas (main() alone, called by a program of its own, leaves the exit to that program)."""
    main()
    iterator_release.exit_promptly(0)


if __name__ == "__main__":
    command()
