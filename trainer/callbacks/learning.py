"""The learning check: a run that does not learn, said loudly.

A learning rate far too high does not always diverge: `optimizer.lr=0.3` on the MNIST MLP blows up for a
few dozen steps, then settles at the loss of a model that predicts every class alike (2.32 against its
first 2.35) and ends at chance accuracy (0.10), with exit 0. The divergence guard (100x the first loss)
never sees it. So once, at `trainer.not_learning_at` of the run (and not before MIN_STEPS), a logged
train loss still above LEARNED x the run's first train loss (the divergence guard's reference) is judged:
unless the run logs an accuracy clearly above chance (a warm-started model whose loss starts low and
stays flat), the run is not learning. `trainer.not_learning` says what then: warn (the default), treat it
as a divergence (trainer.on_divergence), or off. The divergence guard calls these functions and acts.
"""
from __future__ import annotations

import math
from typing import Dict, Optional

MIN_STEPS = 200  # runs shorter than this are not judged (tests, smoke runs: their loss has barely moved)
LEARNED = 0.95  # a train loss below 95% of the run's first has moved: the run learns
ABOVE_CHANCE = 2.0  # an accuracy above twice chance (1 / classes) has learned something

CAUSES = ("Likely causes: a learning rate so high that the model collapsed to predicting every class alike "
          "(optimizer.lr, or a schedule's peak), a learning rate far too low, labels that do not match the "
          "inputs, or a model that starts already trained (trainer.init_from, pretrained weights).")
FIX = ("Fix: lower optimizer.lr (e.g. 10x), check the data and labels; trainer.not_learning=divergence treats "
       "this as a divergence (trainer.on_divergence=stop: exit 3), trainer.not_learning=off turns the check off.")


def check_step(trainer) -> Optional[int]:
    """The step from which the run is judged (the first log at or after it), or None: not judged (off, or a
    run shorter than MIN_STEPS)."""
    cfg = trainer.config
    if cfg.not_learning == "off":
        return None
    at = max(MIN_STEPS, math.ceil(cfg.not_learning_at * trainer.total))
    return at if at <= trainer.total else None


def chance_accuracy(trainer) -> Optional[float]:
    """1 / the number of classes the model outputs (its last output dimension, when it has one >= 2)."""
    try:
        classes = int(trainer.model.outputs[0].shape[-1])
    except Exception:  # noqa: BLE001 - a subclassed model (no symbolic outputs), several models: unknown
        return None
    return 1.0 / classes if classes >= 2 else None


def not_learning(trainer, step: int, logs: Dict, reference: Optional[float],
                 reference_step: Optional[int]) -> Optional[str]:
    """Why the run is not learning at this log (a sentence naming the numbers), or None when it is (or
    cannot be judged: no loss, no positive finite reference)."""
    loss = logs.get("loss")
    if loss is None or reference is None or not math.isfinite(loss) or reference <= 0 or loss < LEARNED * reference:
        return None
    accuracy = next((float(v) for k, v in logs.items() if k.endswith("accuracy") and isinstance(v, (int, float))), None)
    chance = chance_accuracy(trainer)
    # 2 classes: 0.75, not 1.0
    if accuracy is not None and chance is not None and accuracy > min(ABOVE_CHANCE * chance, (1 + chance) / 2):
        return None
    at_chance = (f", and the train accuracy {accuracy:.4f} is at chance level "
                 f"(1/{round(1 / chance)} classes = {chance:.3g})"
                 if accuracy is not None and chance is not None else "")
    return (f"the train loss {loss:.4g} at step {step} ({step / trainer.total:.0%} of the run) is not below its "
            f"early level, the run's first train loss {reference:.4g} (step {reference_step}){at_chance}: "
            "training is not learning")
