"""The data position across a resume with another batch size: the batches a run read are kept (in
checkpoints/configured.json, by callbacks/checkpointing.py) with the batch size and an epoch's batches, so a
resume with other batches skips the same examples, in the new batches, and says so."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional

from trainer.inputs import batches_read_per_step

log = logging.getLogger("trainer.core")


def batches_per_epoch(trainer) -> Optional[int]:
    return trainer.steps_per_epoch * batches_read_per_step(trainer.config) if trainer.steps_per_epoch else None


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
    otherwise) changed since the record: the examples read, in the new batches; by epochs when both epochs'
    batches are known (an epoch drops a remainder of its own size). A position that is not a whole number of
    new batches reads the examples of the part again, said."""
    old, new, old_epoch = recorded.get("batch_size"), trainer.batch_size, recorded.get("batches_per_epoch")
    if old is None and trainer.from_cli:  # a record from before it held the batch size: the run's config record
        old = _recorded_batch_size(trainer.run_dir / ".hydra" / "config.yaml")
    if not isinstance(old, int) or not new or old == new:
        return read
    new_epoch = batches_per_epoch(trainer)
    epochs, within = divmod(read, old_epoch) if isinstance(old_epoch, int) and old_epoch and new_epoch else (0, read)
    skip, again = epochs * (new_epoch or 0) + within * old // new, within * old % new
    said = (f"Data: the run read {read} batches of {old} examples ({read * old}); batches are now {new} examples "
            f"(data.batch_size, or the data set's batching), so the resume skips {skip} batches of {new}"
            + (f" ({epochs} epochs, then {within * old} examples of the next)" if epochs else ""))
    if again:
        log.warning("%s, and the last %d examples read, not a whole batch of %d, are trained on again. To resume "
                    "exactly: keep data.batch_size=%d, or one that divides %d.", said, again, new, old, within * old)
    else:
        log.info("%s: the same examples.", said)
    return skip
