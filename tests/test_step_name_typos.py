"""A monitored name misspelt when the step is overridden (trainer.best_metric, EarlyStopping's monitor): its
results are known only once it runs, yet a name close to one the default step reports (`acuracy`, `val_los`)
is most likely a typo. Said as such before the first step (an error when mode=auto cannot judge the name, not
"set a mode"; else a warning), and at the first evaluation a best_metric the results lack is an error, with
the step saved first."""
from __future__ import annotations

import logging

import keras
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import EarlyStopping, Trainer
from trainer.checkpoint import list_checkpoints
from trainer.config import ConfigError


class OwnTestStep(Trainer):
    """The Keras-guide habit: a test_step that updates the Trainer's metric and returns its own loss."""

    def test_step(self, data):
        x, y = data
        logits = self.model(x, training=False)
        self.metrics["accuracy"].update_state(y, logits)
        return {"loss": tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))}


def make(run_dir, kind=None, **options):
    defaults = dict(log_every=5, eval_every=5, checkpoint_every=100, progress_bar=False, tensorboard=False,
                    verbose=False)
    return (kind or OwnTestStep)(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 optimizer=lambda: keras.optimizers.SGD(0.05),
                                 metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], run_dir=run_dir,
                                 **{**defaults, **options})


@pytest.mark.parametrize("name, meant", [("acuracy", "accuracy"), ("val_los", "val_loss")])
def test_a_misspelt_best_metric_is_not_told_to_set_a_mode(tmp_path, name, meant):
    trainer = make(tmp_path, best_metric=name)
    with pytest.raises(ConfigError) as raised:
        trainer.fit(blobs().repeat(), blobs(), steps=10)
    said = str(raised.value)
    assert f"(did you mean {meant!r}?)" in said and f"Fix: Trainer(best_metric={meant!r})" in said, said
    assert f"if your test_step returns {name!r}, Trainer(best_mode='min')" in said, said
    assert int(trainer.step.numpy()) == 0 and not list_checkpoints(tmp_path / "checkpoints")


def test_a_misspelt_best_metric_with_a_mode_is_warned_then_an_error_at_the_first_evaluation(tmp_path, caplog):
    """val_los with best_mode=min trained to the end without a best checkpoint, warned only at the first evaluation
    (with eval_every=0: the last step). Now: a warning at the start naming the close name, an error at the first
    evaluation after saving that step, and the fixed name resumes from it."""
    trainer = make(tmp_path, best_metric="val_los", best_mode="min")
    with caplog.at_level(logging.INFO, logger="trainer.core"):
        with pytest.raises(ConfigError, match=r"^Trainer\(best_metric='val_los'\) is not among the eval "
                                              r"results \['accuracy', 'loss'\] \(did you mean 'val_loss'\?\).* "
                                              r"Step 5 is saved"):
            trainer.fit(blobs().repeat(), blobs(), steps=20)
    said = [r.getMessage() for r in caplog.records if "val_los" in r.getMessage()]
    assert not any("the one eval set's 'los'" in s for s in said), said  # no longer taken for a name that exists
    assert [r.levelname for r in caplog.records if "val_los" in r.getMessage()] == ["WARNING"], said
    assert said[0].startswith("Trainer(best_metric='val_los') is not among the eval results the Trainer knows"), said
    assert "(did you mean 'val_loss'?)" in said[0] and "checked at the first evaluation" in said[0], said
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [5]

    fixed = make(tmp_path, best_metric="val_loss")
    assert fixed.fit(blobs().repeat(), blobs(), steps=20)["step"] == 20
    assert int(fixed.step.numpy()) == 20 and (tmp_path / "checkpoints" / "best").is_dir()


class OwnResults(OwnTestStep):
    """A test_step that returns results of its own besides the loss: names near the default ones, and no typo."""

    def test_step(self, data):
        logs = super().test_step(data)
        accuracy = self.metrics["accuracy"].result()
        return {**logs, **{name: accuracy for name in ("agreement", "auc", "kl_loss", "lossA", "acc")}}


def test_a_name_far_from_the_known_ones_is_left_to_the_first_evaluation(tmp_path, caplog):
    """A test_step's own result (`agreement`) is close to no default name: not taken for a typo (with a mode,
    no warning; mode=auto cannot judge it: that error, as before)."""
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = make(tmp_path, OwnResults, best_metric="agreement", best_mode="max")
        assert trainer.fit(blobs().repeat(), blobs(), steps=10)["step"] == 10
    assert not [r for r in caplog.records if "agreement" in r.getMessage()], caplog.text
    assert (tmp_path / "checkpoints" / "best").is_dir()
    with pytest.raises(ConfigError, match=r"cannot tell whether a larger 'agreement'"):
        make(tmp_path / "own", best_metric="agreement").fit(blobs().repeat(), blobs(), steps=10)


@pytest.mark.parametrize("name", ["val_auc", "kl_loss", "lossA", "acc"])
def test_a_result_of_the_steps_own_near_a_default_name_is_no_typo(tmp_path, caplog, name):
    """val_auc was told 'val_accuracy', kl_loss and lossA 'loss', acc 'accuracy' (a synonym): names a test_step
    returns of its own, and the run trains on them without a word of a typo."""
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer = make(tmp_path, OwnResults, best_metric=name)
        assert trainer.fit(blobs().repeat(), blobs(), steps=10)["step"] == 10
    assert not [r for r in caplog.records if "did you mean" in r.getMessage()], caplog.text
    assert (tmp_path / "checkpoints" / "best").is_dir()


def test_a_misspelt_monitor_of_an_overridden_test_step_is_not_told_to_set_a_mode(tmp_path):
    trainer = make(tmp_path, best_metric=None, callbacks=[EarlyStopping(monitor="acuracy")])
    with pytest.raises(ConfigError, match=r"^EarlyStopping\(monitor='acuracy'\) is not among the eval results the "
                                          r"Trainer knows .*\(did you mean 'accuracy'\?\).* "
                                          r"Fix: EarlyStopping\(monitor='accuracy'\)"):
        trainer.fit(blobs().repeat(), blobs(), steps=10)
    assert int(trainer.step.numpy()) == 0


def test_a_misspelt_train_monitor_of_an_overridden_train_step(tmp_path):
    class OwnTrainStep(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, self.model(x), from_logits=True))
            self.update(loss, tape)
            return {"loss": loss}

    trainer = OwnTrainStep(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), loss=None,
                           optimizer=lambda: keras.optimizers.SGD(0.05), best_metric=None, progress_bar=False,
                           verbose=False, callbacks=[EarlyStopping(monitor="train/los")])
    with pytest.raises(ConfigError, match=r"\(did you mean 'train/loss'\?\)"):
        trainer.fit(blobs().repeat(), steps=10)
