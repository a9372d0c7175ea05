"""trainer: a TensorFlow custom-training-loop framework.

    from trainer import Trainer
    trainer = Trainer(model=build_model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-3), metrics=[keras.metrics.SparseCategoricalAccuracy()])
    trainer.fit(train_ds, eval_ds, steps=1000)

The names below load when first used (PEP 562), so `import trainer.config` or `trainer.errors` does not load
TensorFlow; TensorFlow's C++ start-up lines are kept off the terminal whoever loads it (trainer/quiet.py).
"""
import importlib

from trainer.quiet import quiet_when_loaded

quiet_when_loaded()

_HOME = {  # public name -> the module that defines it
    "CSVLogger": "trainer.callbacks",
    "Callback": "trainer.callbacks",
    "CheckpointError": "trainer.checkpoint",
    "DataBundle": "trainer.data",
    "EarlyStopping": "trainer.callbacks",
    "LossScale": "trainer.loss_scale",
    "MLflowLogger": "trainer.callbacks",
    "MetricsWriter": "trainer.callbacks",
    "NumericalError": "trainer.core",
    "PrecisionConfig": "trainer.config",
    "ReduceLROnPlateau": "trainer.callbacks",
    "StrategyConfig": "trainer.config",
    "TensorBoardWriter": "trainer.callbacks",
    "Trainer": "trainer.core",
    "TrainerConfig": "trainer.config",
    "TrainingInterrupted": "trainer.core",
    "warm_start": "trainer.load_weights",
}
__all__ = list(_HOME)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_HOME))
