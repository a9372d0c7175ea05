"""The data position across a resume with another batch size or worker count: the batches a run read are kept (in
checkpoints/configured.json, by callbacks/checkpointing.py) with the batch size, the batches in one pass over
the data and the input pipelines that read it, so a resume with other batches skips the same examples, in the new
batches, and says so; one with another number of workers reads other examples (each worker reads its own shard
in its own order), said loudly, refused under trainer.deterministic."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import tensorflow as tf

from trainer.config import ConfigError, written
from trainer.distribute import input_pipelines

log = logging.getLogger("trainer.core")


def pass_batches(config, train_data, known: Optional[int] = None) -> Optional[int]:
    """The batches in one real pass over the training data (the data repeats after it, whatever steps_per_epoch
    or gradient accumulation call an epoch): a tf.data.Dataset's cardinality, else `known` (the CLI's
    train_examples // batch_size), else None; None under overfit_batches (its batches repeat, not the data's)."""
    if config.overfit_batches:
        return None
    if isinstance(train_data, tf.data.Dataset) and int(train_data.cardinality()) > 0:
        return int(train_data.cardinality())
    return known if isinstance(known, int) and known > 0 else None


def _recorded_batch_size(path: Path) -> Optional[int]:
    """data.batch_size in the run's config record (.hydra/config.yaml, rewritten only once a resume trained a loop:
    here, the last run's), or None."""
    import yaml

    try:
        data = (yaml.safe_load(path.read_text()) or {}).get("data") or {}
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return data.get("batch_size") if isinstance(data, dict) else None


def _as_read_by(count: int) -> str:
    return "one process (one input pipeline)" if count == 1 else f"{count} workers ({count} input shards)"


def _resume_as(trainer, count: int) -> str:
    """How to resume with the `count` input pipelines of the run's start, in the user's terms."""
    if trainer.from_cli:
        return (f"resume with python -m trainer.launch --workers {count} -- and the same overrides" if count > 1 else
                "resume in one process: python -m trainer with the same overrides (or python -m trainer.launch "
                "--workers 1 -- ...)")
    return (f"resume with the strategy of the run's start, over {count} workers" if count > 1 else
            "resume with a strategy in one process (the default, one_device or mirrored)")


def reads_other_examples(trainer, recorded: Dict) -> bool:
    """Whether this resume reads the training data with another number of input pipelines (workers) than the
    record's run: it skips as many examples as that run trained on, but each worker reads its own shard in its
    own shuffled order, both set by the count, so they are other examples, in another order. Said with the fix;
    a ConfigError under trainer.deterministic (a resume it asks to repeat). A record without the count (from
    before it held it) says nothing."""
    old, new = recorded.get("input_pipelines"), input_pipelines(trainer.strategy)
    if not isinstance(old, int) or old == new:
        return False
    cause = (f"the run this one resumes read its training data as {_as_read_by(old)}, this one reads it as "
             f"{_as_read_by(new)}. Each worker reads its own shard of the examples in its own shuffled order, so "
             "the resume skips as many examples as the run trained on, but other ones: from here on it reads "
             "other examples, in another order, than the run it continues would have")
    fix = _resume_as(trainer, old)
    if trainer.config.deterministic:
        asked = written("trainer.deterministic", True, "Trainer(deterministic=...)", trainer.from_cli)
        other = written("trainer.deterministic", False, "Trainer(deterministic=...)", trainer.from_cli)
        raise ConfigError(f"{asked} and {cause}. Fix: {fix}, or {other} to go on with other examples.")
    log.warning("Data: %s. To resume exactly: %s.", cause, fix)
    return True


def position_in_new_batches(trainer, read: int, recorded: Dict, other_examples: bool = False) -> int:
    """The batches to skip when the run's batches (trainer.batch_size: data.batch_size, or a data set batched
    otherwise) changed since the record: the examples read, in the new batches; by passes over the data when both
    passes' batches are known (a pass drops a remainder of its own size), else by examples alone. A position that
    is not a whole number of new batches reads the examples of the part again, said. `other_examples`: another
    worker count reads other examples anyway (reads_other_examples), so none is claimed to be the same."""
    old, new = recorded.get("batch_size"), trainer.batch_size
    if old is None and trainer.from_cli:  # a record from before it held the batch size: the run's config record
        old = _recorded_batch_size(trainer.run_dir / ".hydra" / "config.yaml")
    if not new or old == new:
        return read
    if not isinstance(old, int):
        log.warning("Data: the run's record (checkpoints/configured.json, from before it held the batch size) cannot "
                    "be compared with the batches now, %d examples: the resume skips %d batches of %d, the same "
                    "examples only if the batch size did not change. To resume exactly: the batch size of the run's "
                    "start.", new, read, new)
        return read
    old_pass, new_pass = recorded.get("pass_batches"), getattr(trainer, "data_pass_batches", None)
    by_passes = isinstance(old_pass, int) and old_pass > 0 and isinstance(new_pass, int)
    passes, within = divmod(read, old_pass) if by_passes else (0, read)
    skip, again = passes * (new_pass or 0) + within * old // new, within * old % new
    said = (f"Data: the run read {read} batches of {old} examples ({read * old}); batches are now {new} examples "
            f"(data.batch_size, or the data set's batching), so the resume skips {skip} batches of {new}"
            + (f" ({passes} passes over the data, then {within * old} examples of the next)" if passes else ""))
    if again:
        log.warning("%s, and the last %d examples read, not a whole batch of %d, are trained on again. To resume "
                    "exactly: keep data.batch_size=%d, or one that divides %d.", said, again, new, old, within * old)
    elif other_examples:
        log.info("%s: as many examples as the run read (other ones: the worker count changed, said above).", said)
    elif by_passes:
        log.info("%s: the same examples.", said)
    else:
        log.info("%s: the same examples unless a pass over the data ended in between (its length in batches is "
                 "unknown here: a data function, overfit_batches, or a record from before it held it).", said)
    return skip
