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
from trainer.checkpoint import list_checkpoints

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

    with pytest.raises(ConfigError, match=r"Trainer\(on_divergence='retry'\) is not one of stop\|rollback\|warn"):
        TrainerConfig(on_divergence="retry")
    with pytest.raises(ConfigError, match=r"Trainer\(divergence_factor=0\.5\) is out of range"):
        TrainerConfig(divergence_factor=0.5)
    with pytest.raises(ConfigError, match=r"Trainer\(max_rollbacks=0\) is out of range"):
        TrainerConfig(max_rollbacks=0)
    with pytest.raises(ConfigError, match=r"^Trainer\(on_divergence='rollback'\) restores .* no run folder .*Fix: "
                                          r"give it Trainer\(run_dir=\.\.\.\) too, or use "
                                          r"Trainer\(on_divergence='stop'\)"):  # from Python: the argument's form
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
    assert "is not below its early level" in said[0], said[0]
    assert ("not clearly above chance (chance is 1/3 classes = 0.333; a run counts as learning above 0.667, twice "
            "chance)") in said[0], said[0]
    assert "check the learning rate (the train log's lr=1e-07)" in said[0], said[0]  # too low: raise it, or ...
    assert "hardly moved from the start, raise it" in said[0] and "trainer.not_learning=divergence" in said[0]


def test_a_learning_rate_of_0_is_named_as_the_cause_and_two_classes_have_a_reachable_bar(caplog):
    """lr=0 was told "lower optimizer.lr"; with 2 classes the bar was said as "at chance (0.5)" for 0.64 (twice
    chance, 1.0, cannot be reached: the bar is halfway from chance to 1, and the text says so)."""
    import keras

    from trainer import Trainer

    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(0.0),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], log_every=20,
                      checkpoint_every=0, progress_bar=False, tensorboard=False, best_metric=None)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer.fit(two_classes(False, 1024, 0).repeat().batch(32), steps=240)
    said = not_learning_warnings(caplog)
    assert len(said) == 2, said
    assert "Fix: the learning rate is 0 (lr=0 in the train log): the weights do not move" in said[0], said[0]
    assert "lower optimizer.lr" not in said[0] and "Set optimizer.lr above 0" in said[1], said
    assert "a run counts as learning above 0.75, halfway from chance to 1" in said[0], said[0]


def memoriser(**options):
    """An MLP big enough to memorise 128 examples, with an accuracy metric."""
    import keras

    from trainer import Trainer

    defaults = dict(log_every=20, eval_every=0, checkpoint_every=0, progress_bar=False, tensorboard=False,
                    best_metric=None, seed=0)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(64, activation="relu"),
                                                   keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-2),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], **{**defaults, **options})


def two_classes(shuffled: bool, n: int, seed: int):
    """2 classes decided by the inputs' sum, or (`shuffled`) the same labels in random order."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, rng.permutation(y) if shuffled else y))


def test_shuffled_labels_are_flagged_by_the_final_evaluation(caplog, tmp_path):
    """Shuffled labels: the train loss falls (memorised) while the eval accuracy stays at chance and the eval loss
    above ln 2. Said at the end (warn), or exit 3 with not_learning=divergence, once the last step is saved; a
    run that learns is not flagged."""
    from trainer.callbacks.numerics import NumericalError

    train = two_classes(True, 128, 0).repeat().batch(32)
    evaluated = two_classes(True, 1024, 1).batch(256)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        memoriser().fit(train, evaluated, steps=240)
    said = not_learning_warnings(caplog)
    assert len(said) == 1 and said[0].startswith("This run did not learn: the train loss fell to"), said
    assert "is at chance (1/2 classes = 0.5; on 1024 examples, chance reaches 0.5312" in said[0], said[0]
    assert "labels unrelated to the inputs" in said[0] and "check that each example's label" in said[0], said[0]

    stopped = memoriser(not_learning="divergence", run_dir=tmp_path)
    with pytest.raises(NumericalError, match=r"The run ended at step 240 \(its checkpoint is saved\) without "
                                             r"learning: the train loss fell"):
        stopped.fit(train, evaluated, steps=240)
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [240]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        memoriser().fit(two_classes(False, 128, 0).repeat().batch(32), two_classes(False, 1024, 1).batch(256),
                        steps=240)
    assert not_learning_warnings(caplog) == []


def test_several_eval_sets_are_flagged_when_every_set_is_at_chance(caplog):
    """Named eval sets were not judged at all: shuffled labels evaluated on {"val", "test"} ended without a word.
    Each set is judged on its own counts; at chance on every set is said naming each; one set above chance (an
    out-of-distribution set beside one that learned) is not."""
    shuffled = two_classes(True, 128, 0).repeat().batch(32)
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        memoriser().fit(shuffled, {"val": two_classes(True, 1024, 1).batch(256),
                                   "test": two_classes(True, 512, 2).batch(256)}, steps=240)
    said = not_learning_warnings(caplog)
    assert len(said) == 1 and "at chance (1/2 classes = 0.5, within 2 standard deviations) on every eval set" in said[0]
    assert "val/accuracy" in said[0] and "on 1024 examples (chance reaches 0.5312)" in said[0], said[0]
    assert "test/accuracy" in said[0] and "on 512 examples (chance reaches 0.5442)" in said[0], said[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        memoriser().fit(two_classes(False, 128, 0).repeat().batch(32),
                        {"val": two_classes(False, 1024, 1).batch(256), "noise": two_classes(True, 1024, 2).batch(256)},
                        steps=240)
    assert not_learning_warnings(caplog) == []


def noisy_two_classes(n: int, seed: int, flipped: float, weight: float = 1.0):
    """two_classes's rule with a share `flipped` of the labels flipped; each example weighted `weight`."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x.sum(axis=1) > 0).astype("int32")
    y = np.where(rng.random(n) < flipped, 1 - y, y).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y, np.full(n, weight, "float32")))


@pytest.mark.parametrize("weight, said", [
    (1.0, "its 20 examples cannot tell chance (1/2 classes) from a model that learned (it takes 256)"),
    (100.0, "its accuracy weighs its 20 examples (weights summing to 2000)")], ids=["small", "weighted"])
def test_a_small_or_weighted_eval_set_does_not_flag_a_model_that_learned(caplog, weight, said):
    """20 noisy eval examples: a model at 0.85 on 2000 clean ones scored 0.45 there (eval loss 0.83), within
    chance's noise for 20 (up to 0.72), and was flagged. Too few examples to tell chance from learning are not
    judged (said at INFO); nor are weighted ones (the accuracy's count is the weights' sum, not the examples)."""
    trainer = memoriser(seed=0)
    with caplog.at_level(logging.INFO, logger="trainer.core"):
        trainer.fit(noisy_two_classes(256, 100, 0.3).repeat().batch(32),
                    noisy_two_classes(20, 200, 0.3, weight).batch(20), steps=240)
    assert not_learning_warnings(caplog) == []
    assert any(said in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert trainer.evaluate(noisy_two_classes(2000, 7, 0.0).batch(500))["accuracy"] > 0.75  # it did learn


def test_a_run_stopped_after_its_last_evaluation_is_judged_once(caplog):
    """A callback that stops the run after an evaluation's callbacks ran (at its save point): that evaluation is
    the final one, and judged (the guard judged only when the stop was set before its own on_eval_end)."""
    from trainer import Callback

    class StopAt(Callback):
        def on_save_point(self, trainer, step, reason):
            if step == 280:
                trainer.stop_training = True

    trainer = memoriser(eval_every=40, callbacks=[StopAt()])
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        summary = trainer.fit(two_classes(True, 128, 0).repeat().batch(32), two_classes(True, 1024, 1).batch(256),
                              steps=400)
    assert summary["step"] == 280
    said = not_learning_warnings(caplog)
    assert len(said) == 1 and "the final eval accuracy" in said[0] and "on 1024 examples" in said[0], said


def test_one_optimizer_at_lr_0_is_named_beside_the_general_fix(caplog):
    """lr=0 was named as the cause when any optimizer's rate was ~0: with another one training, it is named
    beside the fix for a rate that is wrong."""
    import keras
    import tensorflow as tf

    from trainer import Trainer

    class Two(Trainer):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape(persistent=True) as tape:
                logits = self.models["a"](x, training=True) + self.models["b"](x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            self.update(loss, tape, "a")
            self.update(loss, tape, "b")
            return {"loss": loss}

    dense = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])  # noqa: E731
    trainer = Two(models={"a": dense, "b": dense}, best_metric=None, log_every=20, checkpoint_every=0,
                  progress_bar=False, tensorboard=False,
                  optimizers={"a": keras.optimizers.SGD(0.0), "b": keras.optimizers.SGD(1e-7)})
    with caplog.at_level(logging.WARNING, logger="trainer.core"):
        trainer.fit(classes(learnable=True, batch=256), steps=240)  # 4 batches: each log the same mean
    said = not_learning_warnings(caplog)
    assert said and "check the learning rate (the train log's a/lr=0, b/lr=1e-07)" in said[0], said
    assert "a/lr=0 trains nothing" in said[0] and "the learning rate is 0" not in said[0], said[0]


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
