"""A Keras model's own train_step, test_step, compute_loss or predict_step (Keras' custom-step guide), which the
Trainer never calls: its steps call the model's forward pass (`model(x, training=...)`) and nothing else of it.
Trained as given, such a model's step was silently left out (its loss terms, its updates, its logs: the guide's
`mae` vanished and 0 calls were made), so it is a ConfigError at Trainer() naming the fix, the same method in a
Trainer subclass. Where the Trainer subclass has that method of its own, the model's is only unused: a WARNING. A
model's compute_loss (keras_hub's detectors and segmenters have one) is refused only under the default step with
the default compute_loss: a Trainer subclass's train_step, compute_loss or compute_gradients may call it
(`self.model.compute_loss(x, y, y_pred, sample_weight)`, the fix named), so there nothing is said.
"""
from __future__ import annotations

import logging
from typing import Iterable, List, Mapping

import keras

from trainer.config import ConfigError
from trainer.step import Step

log = logging.getLogger("trainer.core")

DOC = "docs/keras.md, A model with its own train_step"

# What each of the model's methods becomes in a Trainer subclass: the method's lines as a user writes them there.
TRAINER_FORM = {
    "train_step": ("def train_step(self, data):",
                   "    ...  # x, y = data; with tf.GradientTape() as tape: loss = self.compute_loss(x, y, "
                   "self.model(x, training=True)) + ...",
                   "    self.update(loss, tape)  # in place of self.optimizer.apply(...)",
                   "    return {\"loss\": loss, ...}"),
    "test_step": ("def test_step(self, data):",
                  "    ...  # x, y = data; y_pred = self.model(x, training=False)",
                  "    return {\"loss\": ..., ...}"),
    "compute_loss": ("def compute_loss(self, x, y, y_pred, sample_weight=None):",
                     "    return self.model.compute_loss(x, y, y_pred, sample_weight)  # the model's own loss"),
}
# The Trainer's methods that may call a model's compute_loss: overriding any of them hands the loss to the user.
LOSS_CALLERS = ("train_step", "compute_loss", "compute_gradients")


def _own(model_class: type, name: str) -> bool:
    """`model_class` (or a class it inherits from, outside Keras) defines `name` over keras.Model's."""
    return getattr(model_class, name, None) is not getattr(keras.Model, name)


def _trainer_own(trainer_class: type, name: str) -> bool:
    """`trainer_class` (a Trainer subclass, or a mixin of it) overrides the Step's `name`."""
    return getattr(trainer_class, name) is not getattr(Step, name)


def _where(model_class: type) -> str:
    return f"{model_class.__module__}.{model_class.__qualname__}"


def check_model_steps(trainer_class: type, models: Mapping[str, keras.Model], frozen: Iterable[str],
                      given: str) -> None:
    """Each trained model's own train_step, test_step (an error, or a warning where `trainer_class` overrides the
    same method), compute_loss (an error under the default step and compute_loss, else nothing: LOSS_CALLERS) and
    predict_step (a warning: trainer.predict gives the model's outputs).
    `given`: "model" or "models", as Trainer() was given them."""
    for name, model in models.items():
        model_class = type(model)
        if name in frozen or not isinstance(model, keras.Model):
            continue  # a frozen model is only called; a bare Layer has no steps
        which = "" if given == "model" else f"[{name!r}]"
        for method in TRAINER_FORM:
            if not _own(model_class, method):
                continue
            if method == "compute_loss" and any(_trainer_own(trainer_class, m) for m in LOSS_CALLERS):
                continue  # it may call self.model.compute_loss: the fix this error names
            if not _trainer_own(trainer_class, method):
                raise ConfigError(_unused_step_error(model_class, method, f"Trainer({given}=...){which}"))
            log.warning("The model's %s.%s is not called: the Trainer runs %s.%s, which calls the model's forward "
                        "pass only (model(x, training=...)). Fix: nothing if %s.%s does all the work of "
                        "the model's (else move what is missing into it; %s).", model_class.__name__, method,
                        trainer_class.__name__, method, trainer_class.__name__, method, DOC)
        if _own(model_class, "predict_step"):
            log.warning("The model's %s.predict_step is not called by trainer.predict(), exports or python -m "
                        "trainer.predict: they give the model's outputs, model(x, training=False). Keras' "
                        "trainer.model.predict(x) runs predict_step; or apply what it does to trainer.predict's "
                        "outputs.", model_class.__name__)


def _unused_step_error(model_class: type, method: str, where: str) -> str:
    lines: List[str] = ["class MyTrainer(Trainer):", *("    " + line for line in TRAINER_FORM[method])]
    what = {"train_step": "its loss, updates and returned logs", "test_step": "its evaluation and returned logs",
            "compute_loss": "its loss"}[method]
    shape = "\n".join("    " + line for line in lines)
    if method == "compute_loss":  # the model's loss is reused as it is: its class computes it, with its compile()'s
        fix = ("reuse it: a Trainer subclass whose compute_loss calls the model's (with the loss the model was "
               "compiled with, as Keras' fit uses it; in a train_step of your own, the same call)")
    else:
        fix = (f"move {method} into a Trainer subclass, where self.model is the model, self.update(loss, tape) "
               "applies the gradients and self.compute_loss(x, y, y_pred) is the Trainer's loss")
    return (f"{where}: the model's class {model_class.__name__} ({_where(model_class)}) overrides Keras' "
            f"{method}, which the Trainer's default step does not call: it calls the model's forward pass only "
            f"(model(x, training=...)), so {what} would be silently left out. Fix: {fix}:\n{shape}\nthen "
            f"MyTrainer(model=..., ...) ({DOC}).")
