"""The learning check: a run that does not learn, said loudly.

A learning rate far too high does not always diverge: `optimizer.lr=0.3` on the MNIST MLP blows up for a
few dozen steps, then settles at the loss of a model that predicts every class alike (2.32 against its
first 2.35) and ends at chance accuracy (0.10), with exit 0. The divergence guard (100x the first loss)
never sees it. So once, at `trainer.not_learning_at` of the run (and not before MIN_STEPS), a logged
train loss still above LEARNED x the run's first train loss (the divergence guard's reference) is judged:
unless the run logs an accuracy clearly above chance (a warm-started model whose loss starts low and
stays flat), the run is not learning. A run whose train loss falls can still learn nothing that carries
over: labels unrelated to the inputs are memorised. So at the run's end the final evaluation is judged
too (eval_at_chance). `trainer.not_learning` says what then: warn (the default), treat it as a divergence
(trainer.on_divergence), or off. The divergence guard calls these functions and acts.
"""
from __future__ import annotations

import logging
import math
from typing import Dict, Optional

log = logging.getLogger("trainer.core")

MIN_STEPS = 200  # runs shorter than this are not judged (tests, smoke runs: their loss has barely moved)
LEARNED = 0.95  # a train loss below 95% of the run's first has moved: the run learns
ZERO_LR = 1e-8  # a logged learning rate at or below this updates nothing (lr=0, a schedule at its floor)
NOISE = 2.0  # an eval accuracy within this many binomial standard deviations of chance is at chance

CAUSES = ("Likely causes: a learning rate so high that the model collapsed to predicting every class alike "
          "(optimizer.lr, or a schedule's peak), a learning rate far too low, labels that do not match the "
          "inputs, or a model that starts already trained (trainer.init_from, pretrained weights).")
SWITCHES = ("trainer.not_learning=divergence treats this as a divergence (trainer.on_divergence=stop: exit 3), "
            "trainer.not_learning=off turns the check off.")
EVAL_CAUSES = ("Likely causes: labels unrelated to the inputs (shuffled, or misaligned with the examples), an eval "
               "set prepared unlike the train set (other labels, preprocessing), or a model that memorises the "
               "train set.")
EVAL_FIX = ("Fix: check that each example's label belongs to it, and that the eval set is prepared as the train set "
            "is; if they are right, the model memorises: more data, augmentation, regularisation (dropout, weight "
            "decay) or a smaller model. " + SWITCHES)


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


def above_chance(chance: float) -> float:
    """The accuracy above which a run has learned something: twice chance, or halfway from chance to 1 when
    that is lower (2 classes: 0.75, as twice chance, 1.0, is out of reach)."""
    return min(2 * chance, (1 + chance) / 2)


def _rule(chance: float) -> str:
    bar = above_chance(chance)
    how = "twice chance" if bar == 2 * chance else "halfway from chance to 1"
    return f"chance is 1/{round(1 / chance)} classes = {chance:.3g}; a run counts as learning above {bar:.3g}, {how}"


def not_learning(trainer, step: int, logs: Dict, reference: Optional[float],
                 reference_step: Optional[int]) -> Optional[str]:
    """Why the run is not learning at this log (a sentence naming the numbers), or None when it is (or
    cannot be judged: no loss, no positive finite reference)."""
    loss = logs.get("loss")
    if loss is None or reference is None or not math.isfinite(loss) or reference <= 0 or loss < LEARNED * reference:
        return None
    accuracy = next((float(v) for k, v in logs.items() if k.endswith("accuracy") and isinstance(v, (int, float))), None)
    chance = chance_accuracy(trainer)
    if accuracy is not None and chance is not None and accuracy > above_chance(chance):
        return None
    at_chance = (f", and the train accuracy {accuracy:.4f} is not clearly above chance ({_rule(chance)})"
                 if accuracy is not None and chance is not None else "")
    return (f"the train loss {loss:.4g} at step {step} ({step / trainer.total:.0%} of the run) is not below its "
            f"early level, the run's first train loss {reference:.4g} (step {reference_step}){at_chance}: "
            "training is not learning")


def learning_rates(logs: Dict) -> Dict[str, float]:
    """The logged learning rates: `lr`, or `<optimizer>/lr` with several optimizers."""
    return {k: float(v) for k, v in logs.items() if (k == "lr" or k.endswith("/lr")) and isinstance(v, (int, float))}


def fix(logs: Dict) -> str:
    """The fix for a run that is not learning, from the learning rates this log shows: every rate 0 (or ~0) is
    said as the cause; else both ways a rate can be wrong, with the rates logged (and those at ~0 named: an
    optimizer whose rate is 0 trains nothing, yet the others' rates may be the cause)."""
    rates = learning_rates(logs)
    zero = {k: v for k, v in rates.items() if abs(v) <= ZERO_LR}
    named = ", ".join(f"{k}={v:g}" for k, v in zero.items())
    if zero and len(zero) == len(rates):
        return (f"Fix: the learning rate is {'0' if not any(zero.values()) else '~0'} ({named} in the train log): "
                "the weights do not move. Set optimizer.lr above 0, or, with a schedule, check its value at this "
                "step (a warmup that has not started, a decay to 0). " + SWITCHES)
    logged = f" (the train log's {', '.join(f'{k}={v:.3g}' for k, v in rates.items())})" if rates else ""
    idle = (f" {named} trains nothing: if that optimizer's models should learn, set its rate above 0 (or check its "
            "schedule at this step)." if zero else "")
    return (f"Fix: check the learning rate{logged}: if the loss rose first and then settled (a collapse), lower "
            f"optimizer.lr (e.g. 10x); if it hardly moved from the start, raise it; check the data and labels.{idle} "
            + SWITCHES)


def eval_examples(counts: Dict[str, float], name: str, where: str) -> Optional[float]:
    """The examples an eval set's last evaluation counted (`counts`: Window.counts of it), or None: unknown (a
    step's own loss), or weighted (said). The eval loss's count is the examples (the default test_step weighs each
    batch's mean loss by its size); the accuracy's `count` is the sum of its sample weights: when the two differ,
    the binomial noise of a count does not apply."""
    examples, weights = counts.get("loss"), counts.get(name)
    if not examples or weights is None:
        return None
    if abs(weights - examples) > 1e-6 * examples:
        log.info("The final evaluation%s is not judged for learning: its %s weighs its %d examples (weights summing "
                 "to %.4g), and chance's binomial noise is that of unweighted ones.", where, name, examples, weights)
        return None
    return examples


def judged_examples(chance: float) -> int:
    """The fewest eval examples on which chance's noise (NOISE standard deviations) stays within a quarter of the
    way from chance to the learning bar (above_chance): a model halfway to that bar is then told from chance
    (NOISE of its own standard deviations apart). 256 for 2 classes, 576 for 10."""
    return math.ceil(chance * (1 - chance) * (4 * NOISE / (above_chance(chance) - chance)) ** 2 - 1e-9)


def eval_at_chance(trainer, eval_logs: Dict, train_loss: Optional[float], reference: Optional[float]) -> Optional[str]:
    """Called after the final evaluation: why a run whose train loss fell (below LEARNED x its first) learned
    nothing that evaluation sees, or None. Judged so when on every eval set that can tell (with an accuracy
    metric, of unweighted examples enough to tell chance from learning: judged_examples; at least one such set)
    the eval accuracy is at chance, within NOISE binomial standard deviations for its examples, and the eval
    loss is not below LEARNED x the loss of predicting every class alike (ln of the classes). Several sets: one
    above chance (an in-distribution set beside an out-of-distribution one) says the model learned."""
    chance = chance_accuracy(trainer)
    if (chance is None or train_loss is None or reference is None or reference <= 0
            or not math.isfinite(train_loss) or train_loss >= LEARNED * reference):
        return None
    sets = trainer.eval_set_names or [None]
    judged = [_set_at_chance(trainer, eval_logs, chance, name) for name in sets]
    if not any(judged) or any(verdict is False for verdict in judged):
        return None
    at_chance = [verdict for verdict in judged if verdict]
    classes, chance_loss = round(1 / chance), math.log(round(1 / chance))
    if sets == [None]:
        accuracy, examples, bound, loss, name = at_chance[0]
        return (f"the train loss fell to {train_loss:.4g} (from {reference:.4g}), yet the final eval {name} "
                f"{accuracy:.4f} is at chance (1/{classes} classes = {chance:.3g}; on {examples:.0f} examples, "
                f"chance reaches {bound:.4f}, {NOISE:g} standard deviations above it) and the eval loss {loss:.4g} "
                f"is not below that of predicting every class alike (ln {classes} = {chance_loss:.4g}): the model "
                "fits the train set but learned nothing that carries over to the eval set")
    each = "; ".join(f"{name} {accuracy:.4f} on {examples:.0f} examples (chance reaches {bound:.4f}), loss {loss:.4g}"
                     for accuracy, examples, bound, loss, name in at_chance)
    return (f"the train loss fell to {train_loss:.4g} (from {reference:.4g}), yet the final evaluation is at chance "
            f"(1/{classes} classes = {chance:.3g}, within {NOISE:g} standard deviations) on every eval set it could "
            f"judge: {each}; no eval loss is below that of predicting every class alike (ln {classes} = "
            f"{chance_loss:.4g}): the model fits the train set but learned nothing that carries over to the eval sets")


def _set_at_chance(trainer, eval_logs: Dict, chance: float, set_name: Optional[str]):
    """One eval set's final evaluation: (accuracy, examples, chance's bound, loss, accuracy's key) when at chance,
    False when it learned, None when it cannot tell (no accuracy, an unknown or weighted count, too few examples)."""
    prefix, where = (f"{set_name}/", f" of {set_name}") if set_name else ("", "")
    name = next((k for k, v in eval_logs.items() if k.startswith(prefix) and k.endswith("accuracy")
                 and (set_name or "/" not in k) and isinstance(v, (int, float))), None)
    loss = eval_logs.get(f"{prefix}loss")
    if name is None or not isinstance(loss, (int, float)) or not math.isfinite(loss):
        return None
    examples = eval_examples(trainer.eval_counts.get(set_name, {}), name[len(prefix):], where)
    if not examples:
        return None
    accuracy, classes, needed = float(eval_logs[name]), round(1 / chance), judged_examples(chance)
    if examples < needed:
        log.info("The final evaluation%s is not judged for learning: its %d examples cannot tell chance (1/%d "
                 "classes) from a model that learned (it takes %d).", where, examples, classes, needed)
        return None
    bound = chance + NOISE * math.sqrt(chance * (1 - chance) / examples)
    if accuracy > bound or loss < LEARNED * math.log(classes):
        return False
    return accuracy, examples, bound, loss, name
