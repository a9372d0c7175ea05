"""trainer: a TensorFlow custom-training-loop framework.

    from trainer import Trainer
    trainer = Trainer(model=build_model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-3),
                      metrics=[keras.metrics.SparseCategoricalAccuracy()])
    trainer.fit(train_ds, eval_ds, steps=1000)

The names below load when first used (PEP 562), so `import trainer.config` or `trainer.errors` does not load
TensorFlow; TensorFlow's C++ start-up lines are kept off the terminal whoever loads it (trainer/quiet.py).
"""
from importlib import import_module as _import_module
from typing import TYPE_CHECKING

from trainer.quiet import quiet_when_loaded as _quiet_when_loaded, register_when_keras_loaded as _register_later

_quiet_when_loaded()

_HOME = {  # public name -> the module that defines it
    "CSVLogger": "trainer.callbacks",
    "Callback": "trainer.callbacks",
    "CheckpointError": "trainer.checkpoint",
    "DataBundle": "trainer.data",
    "EarlyStopping": "trainer.callbacks",
    "LossScale": "trainer.loss_scale",
    "MLflowLogger": "trainer.callbacks",
    "MetricsWriter": "trainer.callbacks",
    "NumericalError": "trainer.trainer",
    "PrecisionConfig": "trainer.config",
    "ReduceLROnPlateau": "trainer.callbacks",
    "StrategyConfig": "trainer.config",
    "TensorBoardWriter": "trainer.callbacks",
    "Trainer": "trainer.trainer",
    "TrainerConfig": "trainer.config",
    "TrainingInterrupted": "trainer.trainer",
    "WandbLogger": "trainer.callbacks",
    "warm_start": "trainer.load_weights",
}
__all__ = [
    "CSVLogger", "Callback", "CheckpointError", "DataBundle", "EarlyStopping", "LossScale", "MLflowLogger",
    "MetricsWriter", "NumericalError", "PrecisionConfig", "ReduceLROnPlateau", "StrategyConfig",
    "TensorBoardWriter", "Trainer", "TrainerConfig", "TrainingInterrupted", "WandbLogger", "warm_start",
]
__version__ = "0.1.0"

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time these load on first use
    from trainer.callbacks import (CSVLogger, Callback, EarlyStopping, MetricsWriter, MLflowLogger, ReduceLROnPlateau,
                                   TensorBoardWriter, WandbLogger)
    from trainer.checkpoint import CheckpointError, warm_start
    from trainer.config import PrecisionConfig, StrategyConfig, TrainerConfig
    from trainer.trainer import NumericalError, Trainer, TrainingInterrupted
    from trainer.data import DataBundle
    from trainer.loss_scale import LossScale


def __getattr__(name: str):
    """A public name from its module; else a submodule (`trainer.callbacks` after a plain `import trainer`)."""
    if name in _HOME:
        value = getattr(_import_module(_HOME[name]), name)
        globals()[name] = value  # the next lookup is a plain attribute
        return value
    if not name.startswith("_"):
        try:
            return _import_module(f"{__name__}.{name}")  # the import sets it as an attribute too
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports does not
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_HOME))


_register_later()  # last: it may import trainer.precision and trainer.optim (when Keras is already loaded)
