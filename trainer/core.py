"""The old name of `trainer.trainer`, kept so that `from trainer.core import Trainer` still works."""
from trainer.trainer import NumericalError, Trainer, TrainingInterrupted

__all__ = ["NumericalError", "Trainer", "TrainingInterrupted"]
