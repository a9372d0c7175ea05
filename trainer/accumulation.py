"""What trainer.grad_accum_steps=K > 1 runs: `accumulate_step` on each of the K micro-batches, then
`apply_accumulated` once per update, never `train_step`. So an overridden train_step is refused when training
starts (fit(), and the CLI's train command before the data is loaded), unless the accumulation is overridden as
far down as it is (in the same class, a subclass, or on the instance). Only training is refused: evaluating,
predicting or exporting from a run trained so (before this check, with a warning) trains nothing.
step_functions asks which accumulate_step runs: XLA compiles the Trainer's own only."""
from __future__ import annotations

from typing import Optional, Tuple

from trainer.config import ConfigError, TrainerConfig, as_given, written
from trainer.config_ranges import python_forms
from trainer.step import Step

ACCUMULATION = ("accumulate_step", "apply_accumulated")


def runs_own_accumulate_step(trainer) -> bool:
    """Whether the accumulate_step accumulation calls is the Trainer's: neither a class's override nor one set on
    the instance (`trainer.accumulate_step = f`)."""
    return getattr(trainer.accumulate_step, "__func__", None) is Step.accumulate_step


def _defined_at(owner, name: str) -> Tuple[int, Optional[type]]:
    """Where `owner` (a Trainer class; or a Trainer, whose own attributes come first) finds method `name`: its
    position, smaller for more derived (-1: the instance), and the class that defines it (None: the instance)."""
    if not isinstance(owner, type) and name in vars(owner):
        return -1, None
    mro = (owner if isinstance(owner, type) else type(owner)).__mro__
    at = next(i for i, cls in enumerate(mro) if name in vars(cls))
    return at, mro[at]


def check_accumulation(owner, config, cli: bool = True) -> None:
    """Refuses a train_step that grad_accum_steps > 1 would leave out: one overridden (by `owner`, a Trainer class
    or a Trainer) further down than any override of accumulate_step and apply_accumulated. `cli`: the message
    names the config keys (trainer.grad_accum_steps=2), else the Python arguments (Trainer(grad_accum_steps=2))."""
    k = config.grad_accum_steps
    step_at, step_class = _defined_at(owner, "train_step")
    if k == 1 or step_class is Step:
        return
    accumulation_at, accumulation_class, accumulation_name = min(
        (_defined_at(owner, name) + (name,) for name in ACCUMULATION), key=lambda place: place[0])
    if accumulation_at <= step_at:
        return  # the accumulation is overridden as far down as the step: it accumulates as it says
    above = None if accumulation_class is Step else f"{accumulation_class.__name__}.{accumulation_name}"
    raise ConfigError(_refusal(k, step_class, above, cli))


def _refusal(k: int, step_class: Optional[type], above: Optional[str], cli: bool) -> str:
    """The message: the settings named as their user gave them (as TrainerConfig.check_combined names them)."""
    python = {} if cli else python_forms(TrainerConfig, TrainerConfig.python_call)

    def named(name: str, value: int) -> str:
        return as_given(f"trainer.{name}", value, python.get(name, ""), cli, str(value))

    step = "train_step set on the Trainer object" if step_class is None else f"{step_class.__name__}.train_step"
    runs = (f"{above}, overridden above it" if above else "accumulate_step on each micro-batch, which calls "
            "compute_gradients and so compute_loss, then apply_accumulated")
    return (f"{named('grad_accum_steps', k)} and an overridden train_step ({step}): accumulation never calls "
            f"train_step (it runs {runs}), so its loss would not be trained nor its logs logged. Fix: with one "
            "model, put the loss in an override of compute_loss (or compute_gradients), which accumulation calls "
            "(the loss, the train metrics, grad_norm and lr are logged; the step's own extra logs are not); or "
            f"accumulate in your own step, which keeps them: {named('batches_per_step', k)} in place of "
            f"{named('grad_accum_steps', k)} hands it the {k} batches when its class sets `takes_several_batches = "
            "True` (docs/research.md, 'Several updates per step'); or "
            f"{written('trainer.grad_accum_steps', 1, python.get('grad_accum_steps', ''), cli=cli)} (the default).")
