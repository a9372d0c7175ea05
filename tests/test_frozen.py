"""Frozen models (`Trainer(frozen=...)`: a distillation's teacher) and `trainer.init_from` by model name, through
the public API: what a checkpoint holds, the fingerprint, exact resume, and the errors."""
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, blobs, run_cli
from trainer import CheckpointError, Trainer, warm_start
from trainer.config import ConfigError
from trainer.errors import UserError

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp(width):
    """A 4 -> width -> 2 MLP: the teacher is 7 wide, the student 3, so each one's kernels have shapes of their own."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, activation="relu"), keras.layers.Dense(2)])


class Distillation(Trainer):
    def train_step(self, data):
        x, _ = data
        soft_targets = tf.nn.softmax(self.models["teacher"](x, training=False) / 2.0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(
                soft_targets, self.models["student"](x, training=True) / 2.0, from_logits=True))
        self.update(loss, tape)
        return {"distill_loss": loss}


class TwoModels(Trainer):
    """Two trained models, each fit to the labels: a checkpoint of several models (`models/<name>`)."""

    def train_step(self, data):
        x, y = data
        for name in self.optimizers:
            with tf.GradientTape() as tape:
                logits = self.models[name](x, training=True)
                loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            self.update(loss, tape, name)
        return {"loss": loss}


def train_teacher(run_dir):
    teacher = Trainer(model=lambda: mlp(7), loss=SCCE, optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run_dir,
                      verbose=False, checkpoint_every=20)
    teacher.fit(blobs(), steps=20)
    return teacher


def distillation(run_dir, teacher_run, **options):
    return Distillation(models={"student": lambda: mlp(3), "teacher": lambda: mlp(7)}, frozen={"teacher"},
                        optimizer=lambda: keras.optimizers.Adam(1e-2), init_from={"teacher": str(teacher_run)},
                        run_dir=run_dir, verbose=False, checkpoint_every=10, deterministic=True, **options)


def test_a_frozen_teacher_is_in_no_checkpoint_nor_the_fingerprint_and_the_student_resumes_exactly(tmp_path):
    teacher = train_teacher(tmp_path / "teacher")
    whole = distillation(tmp_path / "whole", tmp_path / "teacher")
    whole.fit(blobs(), steps=20)
    assert not whole.models["teacher"].trainable and set(whole.optimizers) == {"student"}  # no optimizer of its own
    for a, b in zip(whole.models["teacher"].get_weights(), teacher.model.get_weights()):
        np.testing.assert_array_equal(a, b)  # init_from={"teacher": a one-model run} loaded it

    saved = tf.train.list_variables(str(tmp_path / "whole" / "checkpoints" / "ckpt-20"))
    shapes = [shape for _, shape in saved]
    assert [4, 3] in shapes and [3, 2] in shapes  # the student (and its Adam slots)
    assert [4, 7] not in shapes and [7, 2] not in shapes and [7] not in shapes  # nothing of the teacher
    assert not any("teacher" in key for key, _ in saved)
    student = mlp(3)  # the checkpoint has a one-model run's layout: export and evaluate load the student from it
    report = warm_start(student, str(tmp_path / "whole"), purpose="Loading weights")
    assert len(report["restored"]) == 4 and not report["missing"] and not report["mismatched"]
    for a, b in zip(student.get_weights(), whole.models["student"].get_weights()):
        np.testing.assert_array_equal(a, b)

    fingerprint = whole.weights_fingerprint()
    whole.models["teacher"].set_weights([np.zeros_like(w) for w in whole.models["teacher"].get_weights()])
    assert whole.weights_fingerprint() == fingerprint
    whole.models["student"].layers[0].kernel.assign_add(tf.ones([4, 3]))
    assert whole.weights_fingerprint() != fingerprint  # it does read the student

    # Stopped at step 10 and resumed by a new Trainer: the teacher is loaded again (init_from applies to a
    # frozen model on every run), the student restored, and the run ends where the whole run ended.
    distillation(tmp_path / "resumed", tmp_path / "teacher").fit(blobs(), steps=10)
    resumed = distillation(tmp_path / "resumed", tmp_path / "teacher")
    resumed.fit(blobs(), steps=20)
    reference = tf.train.load_checkpoint(str(tmp_path / "whole" / "checkpoints" / "ckpt-20"))
    again = tf.train.load_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "ckpt-20"))
    for key, _ in saved:
        if key.startswith(("model/", "optimizer/", "step/", "rng/")):  # weights, slots, step, RNG (not save counters)
            np.testing.assert_array_equal(again.get_tensor(key), reference.get_tensor(key), err_msg=key)
    for a, b in zip(resumed.models["teacher"].get_weights(), teacher.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_frozen_model_with_an_optimizer_or_an_unknown_name_is_refused():
    models = {"student": lambda: mlp(3), "teacher": lambda: mlp(7)}
    with pytest.raises(ConfigError, match=r"frozen models \['teacher'\] have optimizers.*resumed run would lose"):
        Trainer(models=models, optimizers={"student": keras.optimizers.Adam(), "teacher": keras.optimizers.Adam()},
                frozen={"teacher"})
    with pytest.raises(ConfigError, match=r"\['techer'\] name no model \(models: \['student', 'teacher'\]\)"):
        Trainer(models=models, optimizer=keras.optimizers.Adam, frozen={"techer"})
    with pytest.raises(ConfigError, match="every model is frozen"):
        Trainer(model=lambda: mlp(3), optimizer=keras.optimizers.Adam, frozen="model")
    shared = keras.layers.Dense(2)
    with pytest.raises(ConfigError, match="shares variables with a trained model"):
        Trainer(models={"student": keras.Sequential([keras.Input((4,)), shared]),
                        "teacher": keras.Sequential([keras.Input((4,)), shared])}, optimizer=keras.optimizers.Adam,
                frozen={"teacher"})
    # A ready-made optimizer serves the one model that trains.
    trainer = Trainer(models=models, optimizer=keras.optimizers.Adam(), frozen={"teacher"})
    assert set(trainer.optimizers) == {"student"} and trainer.frozen == {"teacher"}
    # Trainer.model (and predict, which uses it) stays refused with several models, pointing to the one that trains.
    for use in (lambda: trainer.model, lambda: trainer.predict(np.zeros((2, 4), "float32"))):
        with pytest.raises(AttributeError,
                           match=r"several \(\['student', 'teacher'\]\); use trainer.models\['student'\] "
                                 r"\(the one model that trains\)"):
            use()
    with pytest.raises(AttributeError, match=r"use Trainer.models\[name\]"):  # none frozen: no one to point to
        _ = Trainer(models=models, optimizer=keras.optimizers.Adam).model


def test_init_from_by_name_loads_each_named_model_from_a_checkpoint_of_several(tmp_path):
    source = TwoModels(models={"a": lambda: mlp(5), "b": lambda: mlp(6)}, optimizer=keras.optimizers.Adam,
                       run_dir=tmp_path / "source", verbose=False)
    source.fit(blobs(), steps=5)
    target = TwoModels(models={"a": lambda: mlp(5), "b": lambda: mlp(6)}, optimizer=lambda: keras.optimizers.SGD(0.0),
                       verbose=False, init_from={"b": str(tmp_path / "source")})
    target.fit(blobs(), steps=1)  # a rate of 0: the weights stay as the warm start left them
    for loaded, saved in zip(target.models["b"].get_weights(), source.models["b"].get_weights()):
        np.testing.assert_array_equal(loaded, saved)
    assert not np.array_equal(target.models["a"].get_weights()[0], source.models["a"].get_weights()[0])  # not named


def test_init_from_errors_name_the_model_the_path_and_what_the_checkpoint_holds(tmp_path):
    TwoModels(models={"a": lambda: mlp(5), "b": lambda: mlp(6)}, optimizer=keras.optimizers.Adam,
              run_dir=tmp_path / "source", verbose=False).fit(blobs(), steps=2)

    def fit(init_from, models=None):
        models = models or {"a": lambda: mlp(5), "c": lambda: mlp(6)}
        TwoModels(models=models, optimizer=keras.optimizers.Adam, verbose=False,
                  init_from=init_from).fit(blobs(), steps=1)

    with pytest.raises(ConfigError, match=r"^Trainer\(init_from=\.\.\.\) names \['x'\], not models of this Trainer "
                                          r"\(models: \['a', 'c'\]\)"):
        fit({"x": str(tmp_path / "source")})
    with pytest.raises(CheckpointError, match=r"init_from=\{c: '.*nowhere'\} is not a checkpoint"):
        fit({"c": str(tmp_path / "nowhere")})
    with pytest.raises(CheckpointError,
                       match=r"no variable of model 'c' is in .*ckpt-2 \(it holds the models \['a', 'b'\]\)"):
        fit({"c": str(tmp_path / "source")})
    with pytest.raises(ConfigError, match=r"^Trainer\(init_from='.*source'\) is one path, and this Trainer has several "
                                          r"models.*Trainer\(init_from=\{'a': PATH\}\)"):
        fit(str(tmp_path / "source"))
    with pytest.raises(ConfigError, match=r"^Trainer\(init_from=\{'a': 5\}\) is neither a path nor model name -> path"):
        fit({"a": 5})
    assert issubclass(ConfigError, UserError) and issubclass(CheckpointError, UserError)


def test_init_from_by_name_on_the_command_line(tmp_path):
    """Hydra's dict syntax reaches the Trainer; a wrong name is exit 2, named, with no traceback."""
    result = run_cli(*TINY, f"hydra.run.dir={tmp_path / 'run'}", f"trainer.init_from={{teachr:{tmp_path / 'nope'}}}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "trainer.init_from names ['teachr'], not models of this Trainer (models: ['model'])" in output
    assert "Traceback" not in output


def test_a_frozen_model_loads_whole_or_not_at_all(tmp_path, caplog):
    """A frozen model never trains: a variable missing from its checkpoint, or of another shape, would stay at its
    initial value all run, so init_from refuses it, naming the variables (a trained model is only told, in the log),
    with no "restored" line before the error that would read like success."""
    teacher = train_teacher(tmp_path / "teacher")

    def fit(teacher_model, init_from):
        Distillation(models={"student": lambda: mlp(3), "teacher": teacher_model}, frozen={"teacher"},
                     optimizer=keras.optimizers.Adam, init_from={"teacher": init_from},
                     verbose=False).fit(blobs(), steps=1)

    with pytest.raises(CheckpointError, match=r"frozen model 'teacher' is only partly in .*ckpt-20 \(its model\).*"
                                              r"other shapes \['.*kernel.* \[4, 7\] vs \[4, 8\]"):
        with caplog.at_level("INFO", logger="trainer"):
            fit(lambda: mlp(8), str(tmp_path / "teacher"))  # 1 of its 4 variables (the last bias) would load
    assert not any("Warm start of teacher" in r.message or "restored" in r.message for r in caplog.records), caplog.text
    deeper = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(7, activation="relu"),
                                       keras.layers.Dense(2), keras.layers.Dense(2)])
    with pytest.raises(CheckpointError, match=r"only partly in .*\(its model\): missing \['model/.*/3/_kernel'"):
        fit(deeper, str(tmp_path / "teacher"))
    teacher.model.save_weights(tmp_path / "teacher.weights.h5")
    with pytest.raises(CheckpointError, match=r"frozen model 'teacher' does not fit .*teacher.weights.h5"):
        fit(lambda: mlp(8), str(tmp_path / "teacher.weights.h5"))
    fit(lambda: mlp(7), str(tmp_path / "teacher.weights.h5"))  # the same shapes load


def test_the_log_says_which_object_of_the_checkpoint_a_named_model_came_from(tmp_path, caplog):
    """A one-model run holds its weights as `model`: init_from={"teacher": run} falls back to it (a teacher trained
    alone), and the log says so, as it says models/<name> for a run of several models."""
    train_teacher(tmp_path / "teacher")
    TwoModels(models={"a": lambda: mlp(5), "teacher": lambda: mlp(7)}, optimizer=keras.optimizers.Adam,
              run_dir=tmp_path / "two", verbose=False).fit(blobs(), steps=2)
    for source, where in (("teacher", "its model, a one-model run's"), ("two", "its models/teacher")):
        caplog.clear()
        with caplog.at_level("INFO", logger="trainer"):
            distillation(None, tmp_path / source).fit(blobs(), steps=1)
        assert any(f"Warm start of teacher from {tmp_path / source}" in r.message
                   and f"({where}): restored 4" in r.message
                   for r in caplog.records), [r.message for r in caplog.records]


def test_init_from_takes_path_objects(tmp_path):
    """pathlib.Path (any os.PathLike) as a model's path, or as the single path of a one-model Trainer."""
    teacher = train_teacher(tmp_path / "teacher")
    trainer = Distillation(models={"student": lambda: mlp(3), "teacher": lambda: mlp(7)}, frozen={"teacher"},
                           optimizer=keras.optimizers.Adam, init_from={"teacher": tmp_path / "teacher"}, verbose=False)
    trainer.fit(blobs(), steps=1)
    for a, b in zip(trainer.models["teacher"].get_weights(), teacher.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    single = Trainer(model=lambda: mlp(7), loss=SCCE, optimizer=lambda: keras.optimizers.SGD(0.0), verbose=False,
                     init_from=tmp_path / "teacher")
    single.fit(blobs(), steps=1)  # a rate of 0: the weights stay as the warm start left them
    for a, b in zip(single.model.get_weights(), teacher.model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_resume_against_another_frozen_teacher_is_refused(tmp_path):
    """The teacher is in no checkpoint: each save records its weights' fingerprint, and a resume whose teacher loads
    other weights (another init_from, another builder) is a CheckpointError naming it, before any step."""
    train_teacher(tmp_path / "teacher")
    other = Trainer(model=lambda: mlp(7), loss=SCCE, optimizer=keras.optimizers.Adam, run_dir=tmp_path / "other",
                    verbose=False, seed=1)
    other.fit(blobs(), steps=5)
    distillation(tmp_path / "run", tmp_path / "teacher").fit(blobs(), steps=10)
    with pytest.raises(CheckpointError, match=r"frozen models \['teacher'\] have other weights than when this run last "
                                              r"saved .*configured.json.*Fix: give them the "
                                              r"weights the run started with"):
        distillation(tmp_path / "run", tmp_path / "other").fit(blobs(), steps=20)
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("ckpt-10")  # nothing trained
    resumed = distillation(tmp_path / "run", tmp_path / "teacher")  # the same teacher: resumes
    resumed.fit(blobs(), steps=20)
    assert int(resumed.step.numpy()) == 20


def test_adding_or_dropping_frozen_on_a_run_folder_names_frozen_as_the_cause(tmp_path):
    """Two models, both trained, save as models/<name>; with one frozen, the other saves as model/. The switch is
    frozen='s doing, and the error says so (not "the config changed the model")."""
    def trainer(run, **frozen):
        optimizers = {"a": keras.optimizers.Adam()} if frozen else {"a": keras.optimizers.Adam(),
                                                                    "b": keras.optimizers.Adam()}
        return TwoModels(models={"a": lambda: mlp(5), "b": lambda: mlp(6)}, optimizers=optimizers,
                         run_dir=tmp_path / run, verbose=False, **frozen)

    trainer("both").fit(blobs(), steps=2)
    with pytest.raises(CheckpointError, match=r"holds several trained models \(\['a', 'b'\], as models/<name>\), and "
                                              r"this Trainer trains one \(model/\): Trainer\(frozen=...\).*changed.*"
                                              r"Fix: keep frozen= as the run started.*init_from=\{name: PATH\}"):
        trainer("both", frozen={"b"}).fit(blobs(), steps=4)
    trainer("one", frozen={"b"}).fit(blobs(), steps=2)
    with pytest.raises(CheckpointError, match=r"holds one trained model \(model/\), and this Trainer trains several "
                                              r"\(\['a', 'b'\]\): Trainer\(frozen=...\)"):
        trainer("one").fit(blobs(), steps=4)


class NoisyTeacher(Trainer):
    """Distillation whose teacher is called with training=True: its Dropout stays active, its BatchNorm (frozen)
    uses the moving statistics and does not update them."""

    def train_step(self, data):
        x, _ = data
        soft_targets = tf.nn.softmax(self.models["teacher"](x, training=True))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(
                soft_targets, self.models["student"](x, training=True), from_logits=True))
        self.update(loss, tape)
        return {"distill_loss": loss}


def test_a_frozen_teacher_with_batchnorm_and_dropout_called_in_training_mode(tmp_path):
    def trainer(run):
        teacher = lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(7), keras.layers.BatchNormalization(),
                                            keras.layers.Dropout(0.5), keras.layers.Dense(2)])
        return NoisyTeacher(models={"student": lambda: mlp(3), "teacher": teacher}, frozen={"teacher"},
                            optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path / run, verbose=False,
                            checkpoint_every=10, deterministic=True)

    whole = trainer("whole")
    norm = whole.models["teacher"].layers[1]
    norm.moving_mean.assign([0.5] * 7)  # not the initial values: an update would move them towards the batch's
    moving = [v.numpy().copy() for v in (norm.moving_mean, norm.moving_variance)]
    whole.fit(blobs(), steps=20)
    for before, after in zip(moving, (norm.moving_mean, norm.moving_variance)):
        np.testing.assert_array_equal(after.numpy(), before)
    assert whole.models["teacher"].trainable_variables == []

    def resumed_run():
        stopped = trainer("resumed")
        stopped.models["teacher"].layers[1].moving_mean.assign([0.5] * 7)  # the same teacher on every run
        return stopped

    resumed_run().fit(blobs(), steps=10)
    resumed = resumed_run()
    resumed.fit(blobs(), steps=20)  # the dropout masks drawn after step 10 are the whole run's (its RNG state is saved)
    for a, b in zip(resumed.models["student"].get_weights(), whole.models["student"].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_frozen_model_whose_builder_draws_random_weights_is_said_loudly(tmp_path, caplog):
    """frozen={"teacher"} with a builder that only builds, and no init_from for it: the student would train against a
    random teacher. Its builder is called once more (two calls in all) and draws other weights: a warning naming the
    model and the fix, at build and again at the end of fit(). A builder that loads its weights, an init_from entry,
    or a ready-made teacher: no warning (and no extra build)."""
    train_teacher(tmp_path / "teacher")
    fixed = [np.full(w.shape, 0.1, "float32") for w in mlp(7).get_weights()]
    calls = []

    def random_teacher():
        calls.append("random")
        return mlp(7)

    def loaded_teacher():
        calls.append("loaded")
        model = mlp(7)
        model.set_weights(fixed)
        return model

    def fit(teacher, **options):
        caplog.clear()
        with caplog.at_level("WARNING", logger="trainer"):
            Distillation(models={"student": lambda: mlp(3), "teacher": teacher}, frozen={"teacher"},
                         optimizer=keras.optimizers.Adam, verbose=False, **options).fit(blobs(), steps=2)
        return [r for r in caplog.records if "Frozen model 'teacher' has random weights" in r.message]

    said = fit(random_teacher)
    assert calls == ["random", "random"] and len(said) == 2, caplog.text  # at build, and at the end of fit()
    assert all(r.levelname == "WARNING" for r in said)
    assert "init_from={'teacher': PATH}" in said[0].message and "load its weights in its builder" in said[0].message
    assert "(the whole run)" in said[1].message
    for teacher, options, built in ((loaded_teacher, {}, ["loaded", "loaded"]),
                                    (random_teacher, {"init_from": {"teacher": str(tmp_path / "teacher")}}, ["random"]),
                                    (mlp(7), {}, [])):
        calls.clear()
        assert not fit(teacher, **options) and calls == built, caplog.text


class EmaTarget(Trainer):
    """BYOL in small: the target follows the online model by an exponential moving average, assigned in the step from
    step `follow_from` on; the online model learns the labels and to match the target."""

    follow_from = 0

    def train_step(self, data):
        x, y = data
        online, target = self.models["online"], self.models["target"]
        with tf.GradientTape() as tape:
            logits = online(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
            loss += 0.1 * tf.reduce_mean(tf.square(logits - tf.stop_gradient(target(x, training=False))))
        self.update(loss, tape, "online")

        def follow():
            for o, t in zip(online.weights, target.weights):
                t.assign(0.9 * t + 0.1 * o)
            return tf.constant(0)

        tf.cond(self.step >= self.follow_from, follow, lambda: tf.constant(0))
        return {"loss": loss}


def ema_target(run_dir, follow_from=0, **options):
    trainer = EmaTarget(models={"online": lambda: mlp(3), "target": lambda: mlp(3)},
                        optimizers={"online": lambda: keras.optimizers.Adam(1e-2)}, run_dir=run_dir, verbose=False,
                        checkpoint_every=5, deterministic=True, **options)
    trainer.follow_from = follow_from
    return trainer


def test_a_frozen_model_the_step_changes_is_an_error_before_any_save(tmp_path, caplog):
    """A BYOL target listed in frozen= and updated by assign in the step would resume from its builder (no checkpoint
    holds it): after the first loop, and before any checkpoint is written, that is a ConfigError naming the model and
    the fix, not a 'random weights' warning; the checkpoints written before it changed are kept."""
    with caplog.at_level(logging.WARNING, logger="trainer"):
        with pytest.raises(ConfigError, match=r"frozen model 'target' changed during this fit\(\) call \(weights "
                                              r"fingerprint target: \w+ at its start, \w+ at step \d+\).*Nothing "
                                              r"of step \d+ was saved.*Fix: do not list 'target' in frozen=: a "
                                              r"model without an optimizer .*\['online'\]\) is in every "
                                              r"checkpoint and is not trained"):
            ema_target(tmp_path / "frozen", frozen={"target"}).fit(blobs(), steps=20)
    assert not list((tmp_path / "frozen").glob("checkpoints/**/*.index"))  # nothing saved
    assert "random weights" not in caplog.text, caplog.text
    with pytest.raises(ConfigError, match="frozen model 'target' changed during this fit"):  # no run folder alike
        ema_target(None, frozen={"target"}).fit(blobs(), steps=20)

    later = ema_target(tmp_path / "later", follow_from=7, frozen={"target"})  # changes after the save of step 5
    with pytest.raises(ConfigError, match=r"at step 10\).*Nothing of step 10 was saved"):
        later.fit(blobs(), steps=20)
    assert sorted(p.name for p in (tmp_path / "later").glob("checkpoints/**/*.index")) == ["ckpt-5.index"]


def test_the_fix_a_model_without_an_optimizer_is_saved_untrained_and_resumes_exactly(tmp_path):
    """The error's fix: the target not frozen and without an optimizer is in every checkpoint (no optimizer state),
    only the step's assign changes it, and a resumed run ends where the whole run ends, target included."""
    whole = ema_target(tmp_path / "whole")  # the fix: target not frozen, no optimizer of its own
    whole.fit(blobs(), steps=20)
    assert set(whole.optimizers) == {"online"} and not whole.frozen
    saved = [key for key, _ in tf.train.list_variables(str(tmp_path / "whole" / "checkpoints" / "ckpt-20"))]
    assert any(key.startswith("models/target/") for key in saved)
    assert not any(key.startswith("optimizers/target") for key in saved)
    ema_target(tmp_path / "resumed").fit(blobs(), steps=10)
    resumed = ema_target(tmp_path / "resumed")
    resumed.fit(blobs(), steps=20)
    assert resumed.weights_fingerprint() == whole.weights_fingerprint()
    for a, b in zip(resumed.models["target"].get_weights(), whole.models["target"].get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_frozen_model_set_between_fit_calls_on_purpose_is_allowed(tmp_path):
    """Weights loaded into a frozen model between fit() calls (a new teacher) are that call's start: no error, and
    the next call trains against them."""
    trainer = ema_target(tmp_path, follow_from=10**6, frozen={"target"})  # the step never changes it
    trainer.fit(blobs(), steps=5)
    trainer.models["target"].set_weights([w * 1.5 for w in trainer.models["target"].get_weights()])
    trainer.fit(blobs(), steps=10)
    assert int(trainer.step.numpy()) == 10
