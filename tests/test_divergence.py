"""Divergence: a train loss far above the run's first (trainer.divergence_factor) stops, warns or rolls back
(trainer.on_divergence); with rollback, so do non-finite steps beyond precision.max_consecutive_skips.

A linear regression with plain SGD is the real thing on a tiny scale: its loss grows geometrically once the
learning rate passes 2 / (the largest curvature), and converges with half that rate."""
from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from conftest import TINY, run_cli

STABLE, UNSTABLE = 0.3, 1.5  # for regression(): SGD on it converges up to a rate of ~0.8, and diverges above


def regression(n: int = 2048, batch: int = 16, nan_batches=()):
    """y = x . w + noise (4 features, each batch of 16); `nan_batches`: batch indices whose inputs are NaN."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ np.array([1.0, -2.0, 0.5, 1.5], "float32") + 0.1 * rng.normal(size=n)).astype("float32")[:, None]
    for b in nan_batches:
        x[b * batch:(b + 1) * batch] = np.nan
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch, drop_remainder=True)


def make(lr, run_dir=None, **options):
    """A linear regression trained by SGD at `lr` (a number, or a function of the peak rate -> a schedule)."""
    import keras

    from trainer import Trainer

    defaults = dict(log_every=5, checkpoint_every=10, progress_bar=False, tensorboard=False, best_metric=None)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
                   loss=keras.losses.MeanSquaredError(), optimizer=lambda: keras.optimizers.SGD(lr),
                   run_dir=run_dir, **{**defaults, **options})


def lr_of(trainer) -> float:
    return float(np.asarray(trainer.optimizer.learning_rate))


def test_the_options_are_checked():
    from trainer import TrainerConfig
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"trainer\.on_divergence='retry' is not one of stop\|rollback\|warn"):
        TrainerConfig(on_divergence="retry")
    with pytest.raises(ConfigError, match=r"trainer\.divergence_factor=0\.5 is out of range"):
        TrainerConfig(divergence_factor=0.5)
    with pytest.raises(ConfigError, match=r"trainer\.max_rollbacks=0 is out of range"):
        TrainerConfig(max_rollbacks=0)
    with pytest.raises(ConfigError, match="no run folder"):
        make(STABLE, on_divergence="rollback").fit(regression(), steps=5)


def test_stop_names_the_loss_the_reference_and_the_causes():
    from trainer import NumericalError

    trainer = make(UNSTABLE)  # the default: on_divergence=stop, divergence_factor=100
    with pytest.raises(NumericalError) as raised:
        trainer.fit(regression(), steps=200)
    message = str(raised.value)
    for part in ("trainer.divergence_factor=100", "first train loss", "optimizer.lr", "input data",
                 "trainer.on_divergence=rollback"):
        assert part in message, message
    assert int(trainer.step.numpy()) < 200


def test_warn_warns_once_per_episode_and_trains_on(caplog):
    trainer = make(UNSTABLE, on_divergence="warn", log_every=2)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        logs = trainer.fit(regression(), steps=40)
    warnings = [r.getMessage() for r in caplog.records if "diverging" in r.getMessage()]
    assert len(warnings) == 1, warnings  # many logs above the threshold, one episode
    assert "trainer.divergence_factor=100" in warnings[0] and f"{trainer.divergence.reference:.4g}" in warnings[0]
    assert logs["loss"] > 100 * trainer.divergence.reference and int(trainer.step.numpy()) == 40


def test_rollback_restores_halves_the_lr_and_trains_on(tmp_path, caplog):
    make(STABLE, tmp_path).fit(regression(), steps=20)  # checkpoints at 10 and 20
    trainer = make(UNSTABLE, tmp_path, on_divergence="rollback")  # resumed with a rate that diverges
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        logs = trainer.fit(regression(), steps=80)
    rolled = [r.getMessage() for r in caplog.records if "Rolled back" in r.getMessage()]
    assert len(rolled) == 1 and "checkpoint of step 20" in rolled[0], rolled
    assert lr_of(trainer) == pytest.approx(UNSTABLE / 2)
    assert trainer.divergence.rollbacks == 1 and int(trainer.step.numpy()) == 80
    assert math.isfinite(logs["loss"]) and logs["loss"] < trainer.divergence.reference


def test_rollback_halves_a_scheduled_learning_rate(tmp_path):
    import keras

    def cosine(peak):  # nearly flat over these steps
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=100_000)

    make(cosine(STABLE), tmp_path).fit(regression(), steps=20)
    trainer = make(cosine(UNSTABLE), tmp_path, on_divergence="rollback")
    logs = trainer.fit(regression(), steps=80)
    assert trainer.divergence.rollbacks == 1
    assert (lr_of(trainer) == pytest.approx(UNSTABLE / 2, rel=1e-3)
            and logs["lr"] == pytest.approx(UNSTABLE / 2, rel=1e-3))
    assert math.isfinite(logs["loss"]) and logs["loss"] < trainer.divergence.reference


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    from trainer import NumericalError

    make(STABLE, tmp_path).fit(regression(), steps=20)
    trainer = make(UNSTABLE * 16, tmp_path, on_divergence="rollback", max_rollbacks=2)  # diverges at 1/2 and 1/4 too
    with pytest.raises(NumericalError, match=r"again after 2 rollbacks .*trainer\.max_rollbacks=2"):
        trainer.fit(regression(), steps=80)
    assert lr_of(trainer) == pytest.approx(UNSTABLE * 4)


def test_the_reference_loss_survives_a_resume(tmp_path):
    first = make(STABLE, tmp_path)
    first.fit(regression(), steps=20)
    reference = first.divergence.reference
    resumed = make(STABLE, tmp_path)
    resumed.fit(regression(), steps=30)
    # the run's first loss (step 1, ~5), not the resumed process's first (~0.01, the model has learned)
    assert resumed.divergence.reference == reference and resumed.divergence.reference_step == 1


def test_nonfinite_steps_roll_back_instead_of_stopping(tmp_path, caplog):
    from trainer import PrecisionConfig

    data = regression(nan_batches=range(24, 27))  # steps 25-27 see NaN inputs: each is skipped
    trainer = make(STABLE, tmp_path, on_divergence="rollback", divergence_factor=None,
                   precision=PrecisionConfig(max_consecutive_skips=3))
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        logs = trainer.fit(data, steps=50)
    rolled = [r.getMessage() for r in caplog.records if "Rolled back" in r.getMessage()]
    assert len(rolled) == 1 and "3 consecutive steps had non-finite" in rolled[0], rolled
    assert lr_of(trainer) == pytest.approx(STABLE / 2) and int(trainer.step.numpy()) == 50
    assert math.isfinite(logs["loss"])
    record = json.loads((tmp_path / "checkpoints" / "configured.json").read_text())  # the data went on after
    assert (record["step"], record["batches_read"]) == (50, 27 + 30)  # the rollback: a resume skips all 57 read


def test_cli_unknown_choice_is_a_config_error(tmp_path):
    result = run_cli(*TINY, "trainer.on_divergence=retry", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "trainer.on_divergence='retry' is not one of stop|rollback|warn" in result.stderr
    assert not (tmp_path / "run").exists()


def test_cli_lr_1e6_stops_with_exit_3(tmp_path):
    result = run_cli(*TINY, "optimizer.lr=1e6", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 3, result.stderr[-2000:]
    assert "trainer.divergence_factor=100" in result.stderr + result.stdout


# -- a run that does not learn (trainer.not_learning) ----------------------------------------------------


def classifier(lr, **options):
    """A linear 3-class classifier trained by SGD at `lr`, with an accuracy metric."""
    import keras

    from trainer import Trainer

    defaults = dict(log_every=20, checkpoint_every=0, progress_bar=False, tensorboard=False, best_metric=None)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(lr),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], **{**defaults, **options})


def classes(learnable: bool, n: int = 1024, batch: int = 32):
    """3 classes of 4 features: separable blobs (`learnable`), or the same inputs with random labels."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n).astype("int32")
    x = rng.normal(size=(n, 4)).astype("float32") + 3 * np.eye(3, 4, dtype="float32")[y]
    labels = y if learnable else rng.integers(0, 3, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, labels)).repeat().batch(batch, drop_remainder=True)


def not_learning_warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if "not learning" in r.getMessage() or "did not learn" in r.getMessage()]


def test_a_run_that_does_not_learn_is_said_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        classifier(1e-7).fit(classes(learnable=True), steps=240)  # a rate so low nothing moves
    said = not_learning_warnings(caplog)
    assert len(said) == 2, said  # at a quarter of the run, and again at its end
    assert "is not below its early level" in said[0] and "at chance level (1/3 classes" in said[0], said[0]
    assert "lower optimizer.lr" in said[0] and "trainer.not_learning=divergence" in said[0]


@pytest.mark.parametrize("lr, steps, data", [(0.1, 240, True), (1e-7, 40, True)], ids=["learns", "short-run"])
def test_a_run_that_learns_or_is_short_is_not_judged(caplog, lr, steps, data):
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        classifier(lr).fit(classes(learnable=data), steps=steps)
    assert not_learning_warnings(caplog) == []


def test_not_learning_as_divergence_stops_under_on_divergence_stop():
    from trainer.callbacks.numerics import NumericalError

    trainer = classifier(1e-7, not_learning="divergence")
    with pytest.raises(NumericalError,
                       match=r"Stopping at step 200: the train loss .* \(83% of the run\) is "
                             r"not below its early level"):
        trainer.fit(classes(learnable=False), steps=240)
    warned = classifier(1e-7, not_learning="divergence", on_divergence="warn")  # warn: a warning, and on
    assert warned.fit(classes(learnable=False), steps=240)["step"] == 240


def test_the_window_the_reference_came_from_is_not_judged(caplog):
    """With one log window per loop as long as a quarter of the run, the first log is both the reference
    and the judging point: it is judged at the next window, not against itself."""
    import keras

    from trainer import Trainer

    # no accuracy to go by
    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), log_every=200, steps_per_loop=200,
                      checkpoint_every=0, progress_bar=False, tensorboard=False, best_metric=None)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer.fit(classes(learnable=True), steps=800)
    assert not_learning_warnings(caplog) == []


def test_sweeps_of_typed_keys_are_left_to_hydra():
    from trainer.argv_check import problem_in

    assert problem_in(["trainer.max_steps=range(100,300,100)", "trainer.divergence_factor=interval(10,100)"]) is None
    assert "takes an integer" in problem_in(["trainer.max_steps=1.5"])


def test_a_train_step_that_returns_no_logs_is_said_to_turn_the_checks_off(caplog):
    """The checks read the logged train loss: a step of one's own returning None leaves them nothing to judge."""
    import keras
    import tensorflow as tf

    from trainer import Trainer

    class Silent(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.square(self.model(x, training=True) - y))
            self.update(loss, tape)

    class Empty(Silent):
        def train_step(self, data):
            super().train_step(data)
            return {}

    def silent(kind=Silent, **options):
        return kind(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)]),
                      optimizer=lambda: keras.optimizers.SGD(UNSTABLE), log_every=5, progress_bar=False,
                      tensorboard=False, best_metric=None, **options)

    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer = silent()
        trainer.fit(regression(), steps=10)
        trainer.fit(regression(), steps=20)  # said once per Trainer
        silent(Empty).fit(regression(), steps=5)  # an empty dict: the same words
    said = [r.getMessage() for r in caplog.records if "The train logs have no loss" in r.getMessage()]
    assert len(said) == 2 and said[0] == said[1], said
    assert "returned no logs (None or an empty dict)" in said[0] and 'return {"loss": loss}' in said[0]
    assert "the divergence check (trainer.divergence_factor) and the not-learning check (trainer.not_learning) are " \
           "off" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        silent(divergence_factor=None, not_learning="off").fit(regression(), steps=10)  # both off already: nothing
        make(STABLE).fit(regression(), steps=10)  # the default step logs its loss
    assert "The train logs have no loss" not in caplog.text
