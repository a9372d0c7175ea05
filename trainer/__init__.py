"""trainer: a TensorFlow custom-training-loop framework.

    from trainer import Trainer
    trainer = Trainer(model=build_model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-3), metrics=[keras.metrics.SparseCategoricalAccuracy()])
    trainer.fit(train_ds, eval_ds, steps=1000)
"""
from trainer.quiet import quiet_tensorflow_import

quiet_tensorflow_import()

from trainer.callbacks import Callback, CSVLogger, EarlyStopping, MetricsWriter, MLflowLogger, ReduceLROnPlateau, TensorBoardWriter  # noqa: E402
from trainer.checkpoint import CheckpointError  # noqa: E402
from trainer.config import PrecisionConfig, StrategyConfig, TrainerConfig  # noqa: E402
from trainer.core import NumericalError, Trainer, TrainingInterrupted  # noqa: E402
from trainer.data import DataBundle  # noqa: E402
from trainer.load_weights import warm_start  # noqa: E402
from trainer.loss_scale import LossScale  # noqa: E402

__all__ = [
    "CSVLogger",
    "Callback",
    "CheckpointError",
    "DataBundle",
    "EarlyStopping",
    "LossScale",
    "MLflowLogger",
    "MetricsWriter",
    "NumericalError",
    "PrecisionConfig",
    "ReduceLROnPlateau",
    "StrategyConfig",
    "TensorBoardWriter",
    "Trainer",
    "TrainerConfig",
    "TrainingInterrupted",
    "warm_start",
]
__version__ = "0.1.0"
