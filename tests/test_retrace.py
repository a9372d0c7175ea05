"""The run summary's "traced more than once" warning (callbacks/progress.py, step_functions.py): it names
TensorFlow tracing the same step function again (batches of another shape), and stays quiet when a step
function is made anew on purpose (reset_step_functions after unfreezing layers, as fine-tuning does), which
would otherwise teach users to ignore it."""
import keras
import pytest

from conftest import blobs
from trainer import Callback, Trainer

WARNING = "Step functions were traced more than once"


class Summaries(Callback):
    """The summary each fit() call ends with."""

    def __init__(self):
        self.seen = []

    def on_train_end(self, trainer, summary):
        self.seen.append(summary)


class Unfreeze(Callback):
    """A user's fine-tuning: the first layer frozen until `step`, then trainable; the step is traced again."""

    def __init__(self, step):
        self.step = step

    def on_train_begin(self, trainer):
        trainer.model.layers[0].trainable = False
        trainer.reset_step_functions()

    def on_loop_end(self, trainer, step):
        if step == self.step:
            trainer.model.layers[0].trainable = True
            trainer.reset_step_functions()


def make(callbacks=(), **options):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                   keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.1), callbacks=callbacks, progress_bar=False,
                   log_every=2, jit_compile=False, **options)


@pytest.fixture
def warnings_seen(caplog):
    caplog.set_level("INFO", logger="trainer")
    return lambda: [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_a_step_traced_anew_after_unfreezing_layers_does_not_warn(warnings_seen):
    summaries = Summaries()
    trainer = make([Unfreeze(step=2), summaries], eval_every=1)
    trainer.fit(blobs(), blobs(n=64), steps=4)
    # evaluated at step 1 frozen, then from step 2 on unfrozen: both functions were traced again
    assert trainer.model.layers[0].trainable and trainer.traces == {"train": 2, "eval": 2}
    assert warnings_seen() == []
    assert summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}


def test_the_same_step_traced_again_for_batches_of_another_shape_still_warns(warnings_seen):
    summaries = Summaries()
    trainer = make([summaries])
    trainer.fit(blobs(batch=16), steps=2)
    assert warnings_seen() == [] and summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}
    trainer.fit(blobs(batch=8), steps=4)  # the kept train function, given batches of 8: TensorFlow traces it again
    assert trainer.traces["train"] == 2 and summaries.seen[-1]["retraces"] == {"train": 1, "eval": 0}
    said = warnings_seen()
    assert len(said) == 1 and "the same function again {'train': 1}" in said[0] and "pad or bucket" in said[0]
    trainer.fit(blobs(batch=8), steps=6)  # no new retrace in this call: no warning again
    assert len(warnings_seen()) == 1 and summaries.seen[-1]["retraces"] == {"train": 0, "eval": 0}
