"""A frozen model keeps the weights it started with: it is in no checkpoint (saved.py), so a resumed run gets it again
from its builder or init_from, and one changed during the run (a BYOL target or a MoCo key encoder updated by `assign`
in the step, listed in `frozen`) would resume against other weights than the run it continues. Its weights
fingerprint, taken when each fit() call starts (weights set between calls on purpose are allowed), is compared after
the first loop of each fit() call, before every checkpoint and every best/ copy is written and at the end of each fit()
call (a hash per check, never per step); a change is a ConfigError naming the model and the fix, before anything of
that step is saved. The record a resume checks (configured.json's, callbacks/checkpointing.py) is another. The warning
for a frozen model left at random weights (components.random_frozen) is said once it is known not to change: after
the first loop, and at each fit()'s end.

Below the Trainer (it reads the Trainer's models and frozen names).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from trainer import components
from trainer.config import ConfigError
from trainer.saved import frozen_fingerprints


class FrozenWatch:
    """The frozen models' fingerprints at the start of the fit() call (`start`, name -> fingerprint), and the frozen
    models whose builder draws random weights (`random`)."""

    def __init__(self):
        self.start: Dict[str, str] = {}
        self.random: List[str] = []
        self._random_said = False
        self._checked_step: Optional[int] = None  # a save and the end of fit() at one step hash once

    def started(self, fingerprints: Dict[str, str]) -> None:
        """The fingerprints at a fit() call's start, after a warm start or resume (callbacks/checkpointing.py)."""
        self.start = dict(fingerprints)
        self._checked_step = None

    def check(self, trainer, step: int) -> None:
        """Raises a ConfigError when a frozen model's weights are no longer those this fit() call started with."""
        if not self.start or self._checked_step == step:
            return
        now = frozen_fingerprints(trainer)
        changed = sorted(name for name, value in self.start.items() if now.get(name, value) != value)
        if changed:
            names = ", ".join(repr(name) for name in changed)
            trained = sorted(name for name in trainer.models if name not in trainer.frozen)
            raise ConfigError(
                f"Trainer(frozen=...): the frozen model{'s' if len(changed) > 1 else ''} {names} changed during this "
                f"fit() call (weights fingerprint "
                f"{', '.join(f'{n}: {self.start[n]} at its start, {now[n]}' for n in changed)}"
                f" at step {step}): your step or a callback assigns to its weights (an EMA target, a momentum "
                "encoder, a callback that loads weights). A frozen model is in no checkpoint: a resumed run would "
                "build it again from its builder (or init_from) and go on against other weights than the run it "
                f"continues. Nothing of step {step} was saved; the checkpoints written before are kept. Fix: do not "
                f"list {names} in frozen=: a model without an optimizer (give optimizers={{name: ...}} for the models "
                f"that train only, here {trained}) is in every checkpoint and is not trained, so your updates to it "
                "are kept and a resume continues exactly; then start the run again (in a new run folder if this one "
                "has checkpoints: they hold no such model).")
        self._checked_step = step

    def after_first_loop(self, trainer, step: int) -> None:
        """After the first loop of a fit() call: the check, then (once per Trainer) the random-weights warning."""
        self.check(trainer, step)
        if not self._random_said:
            self._random_said = True
            components.say_random_frozen(self.random)

    def at_fit_end(self, trainer) -> None:
        """At the end of a fit() call: the check, and the random-weights warning again (the whole run)."""
        self.check(trainer, int(trainer.step.numpy()))
        components.say_random_frozen(self.random, " (the whole run)")
