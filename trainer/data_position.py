"""The data position across a resume with another batch size: the batches a run read are kept (in
checkpoints/configured.json, by callbacks/checkpointing.py) with the batch size and the batches in one pass over
the data, so a resume with other batches skips the same examples, in the new batches, and says so."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

import tensorflow as tf

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


def position_in_new_batches(trainer, read: int, recorded: Dict) -> int:
    """The batches to skip when the run's batches (trainer.batch_size: data.batch_size, or a data set batched
    otherwise) changed since the record: the examples read, in the new batches; by passes over the data when both
    passes' batches are known (a pass drops a remainder of its own size), else by examples alone. A position that
    is not a whole number of new batches reads the examples of the part again, said."""
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
    elif by_passes:
        log.info("%s: the same examples.", said)
    else:
        log.info("%s: the same examples unless a pass over the data ended in between (its length in batches is "
                 "unknown here: a data function, overfit_batches, or a record from before it held it).", said)
    return skip
