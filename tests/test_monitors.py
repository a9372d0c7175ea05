"""What the monitors watch (trainer.best_metric, early stopping, ReduceLROnPlateau): a wrong name is one error with
the name meant, no log line first that takes it for a good one; a monitor that cannot act in the run (too few
evaluations before its last step) says so at the start. Tiny models through the public API."""
from __future__ import annotations

import logging

import pytest

from conftest import TINY, blobs, run_cli
from conftest import tiny_classifier as classifier


def said(caplog, text: str):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("where", ["best_metric", "early_stopping"])
def test_a_misspelt_val_name_is_only_an_error_not_first_read_as_the_sets_metric(tmp_path, caplog, where):
    """`val_acuracy` was logged as "the one eval set's 'acuracy'" (INFO) just before the error saying no such
    result exists: only the error is said now; a good `val_accuracy` is still explained in the log."""
    from trainer import EarlyStopping
    from trainer.config import ConfigError

    def make(name):
        if where == "best_metric":
            return classifier(run_dir=tmp_path / name, best_metric=name)
        return classifier([EarlyStopping(monitor=name)])

    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(ConfigError, match="did you mean"):
        make("val_acuracy").fit(blobs(), blobs(64), steps=5)
    assert not said(caplog, "the one eval set's"), caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        make("val_accuracy").fit(blobs(), blobs(64), steps=5)
    assert said(caplog, "='val_accuracy': the one eval set's 'accuracy'")


def test_a_misspelt_bare_name_with_several_sets_is_not_first_said_to_be_judged_on_the_first(caplog):
    from trainer import EarlyStopping
    from trainer.errors import UserError

    sets = {"val": blobs(64), "ood": blobs(64, shuffle=True)}
    with caplog.at_level(logging.INFO, logger="trainer"), pytest.raises(UserError, match="did you mean 'val/accuracy'"):
        classifier([EarlyStopping(monitor="acuracy")]).fit(blobs(), sets, steps=5)
    assert not said(caplog, "judged on the first"), caplog.text


def test_cli_a_misspelt_val_monitor_is_one_error_line(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, "callbacks=[early_stopping]", "callbacks.early_stopping.monitor=val_acuracy",
                     f"hydra.run.dir={run_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "did you mean" in output and "the one eval set's" not in output and "Traceback" not in output


@pytest.mark.parametrize("where, name, meant", [
    ("early_stopping", "acc", "accuracy"),  # Keras 2's names
    ("early_stopping", "val_acc", "val_accuracy"),
    ("best_metric", "val_acc", "val_accuracy"),
    ("best_metric", "sparse_categorical_accuracy", "accuracy"),  # Keras' name for a metric made without name=
    ("early_stopping", "acuracy", "accuracy"),  # a close spelling, as before
    ("plateau", "train/learning_rate", "train/lr"),
    ("sets", "acc", "val/accuracy"),
    ("sets", "ood/acc", "ood/accuracy"),
])
def test_a_wrong_name_is_told_the_result_it_means_by_another_tools_name_too(tmp_path, where, name, meant):
    from trainer import EarlyStopping, ReduceLROnPlateau
    from trainer.errors import UserError

    eval_data = {"val": blobs(64), "ood": blobs(64, shuffle=True)} if where == "sets" else blobs(64)
    if where == "best_metric":
        trainer = classifier(run_dir=tmp_path, best_metric=name)
    else:
        callback = ReduceLROnPlateau(monitor=name, mode="min") if where == "plateau" else EarlyStopping(monitor=name)
        trainer = classifier([callback])
    with pytest.raises(UserError) as raised:
        trainer.fit(blobs(), eval_data, steps=5)
    assert f"did you mean {meant!r}?" in str(raised.value), str(raised.value)
    assert int(trainer.step.numpy()) == 0


def test_a_sweep_metric_by_keras_2s_name_is_told_the_name_meant():
    from omegaconf import OmegaConf

    from trainer.config import ConfigError
    from trainer.sweep import check_sweep_metric

    with pytest.raises(ConfigError, match="did you mean 'val_accuracy'"):
        check_sweep_metric(OmegaConf.create({"trainer": {"sweep_metric": "val_acc"}, "metrics": {"accuracy": {}}}))


def idle_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "cannot" in r.getMessage()]


def test_the_eval_every_early_stopping_suggests_is_an_epoch_or_a_round_number(caplog):
    """Keras-style fit(x, y, epochs=10, validation_split=...): the bound was 149 steps, suggested as such (449 in a
    trial); an epoch (here 24 steps) is what a Keras user means by it. Without an epoch that fits: one
    significant digit."""
    import numpy as np

    from trainer import EarlyStopping
    from trainer.config_ranges import round_interval

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(960, 4)).astype("float32"), rng.integers(0, 2, 960).astype("int32")
    with caplog.at_level(logging.WARNING, logger="trainer"):
        classifier([EarlyStopping(patience=1)], eval_every=None).fit(x, y, epochs=10, validation_split=0.2)
    warned = idle_warnings(caplog)
    assert len(warned) == 1 and "Fix: Trainer(eval_every=24) (an epoch) (or less)" in warned[0], warned
    assert round_interval(449, None) == (400, "") and round_interval(4, None) == (4, "")
    assert round_interval(1873, 5000) == (1000, "") and round_interval(449, 30) == (30, " (an epoch)")


def test_nothing_to_train_names_the_epoch_to_two_decimals():
    from trainer.config import TrainerConfig
    from trainer.inputs import nothing_to_train

    said = nothing_to_train(200, 200, None, None, TrainerConfig(max_steps=200), 468, cli=True)
    assert "nothing to train (epoch 0.43). Fix: trainer.max_steps=400 (a total)" in said, said


def test_early_stopping_that_no_evaluation_before_the_end_can_trigger_warns_at_the_start_naming_the_fix(caplog):
    """eval_every above the steps to train: the only evaluation is the final one, after the last step, so early
    stopping silently never acted. Warned before the first step, once per Trainer, with an eval_every that works."""
    import re

    from trainer import EarlyStopping

    stopper = EarlyStopping(patience=3)
    trainer = classifier([stopper], eval_every=500)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs(), blobs(64), steps=20)
    warned = idle_warnings(caplog)
    assert len(warned) == 1, warned
    assert ("EarlyStopping(monitor='loss', patience=3) cannot stop training early in this fit() call: it needs 4 "
            "evaluations before the last step (step 20)") in warned[0] and "only the final evaluation" in warned[0]
    assert "(Trainer(eval_every=500))" in warned[0] and "trainer.eval_every" not in warned[0]  # the user's form
    assert caplog.text.index("cannot stop training early") < caplog.text.index("First loop")  # at the start
    assert int(trainer.step.numpy()) == 20 and stopper.events == 1  # the final evaluation alone was judged
    assert "judged nothing" not in caplog.text  # not said twice

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit(blobs(), blobs(64), steps=40)  # a later fit() call of the same Trainer: said once
    assert not idle_warnings(caplog)

    every = int(re.search(r"Trainer\(eval_every=(\d+)\) \(or less\)", warned[0]).group(1))  # its fix works
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        classifier([EarlyStopping(patience=3)], eval_every=every).fit(blobs(), blobs(64), steps=20)
    assert not idle_warnings(caplog)


def test_a_plateau_on_a_train_log_and_a_monitor_without_eval_data_warn_too(caplog):
    from trainer import EarlyStopping, ReduceLROnPlateau

    with caplog.at_level(logging.WARNING, logger="trainer"):
        classifier([ReduceLROnPlateau(monitor="train/loss", patience=2)], log_every=100).fit(blobs(), steps=20)
    warned = idle_warnings(caplog)
    assert len(warned) == 1 and "cannot lower the learning rate" in warned[0], warned
    assert "(Trainer(log_every=100))" in warned[0] and "trainer.log_every" not in warned[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):
        classifier([EarlyStopping()]).fit(blobs(), steps=20)
    warned = idle_warnings(caplog)
    assert len(warned) == 1 and "has no eval data" in warned[0], warned
    assert "Fix: give fit() eval data" in warned[0] and "EarlyStopping(monitor='train/loss')" in warned[0], warned

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # a dry run is not warned at the start: at its end
        classifier([EarlyStopping()], fast_dev_run=True).fit(blobs())
    assert said(caplog, "EarlyStopping judged nothing in this fit() call: no evaluation reached it. Fix: give fit() "
                        "eval data, with Trainer(eval_every=<steps>), or EarlyStopping(monitor='train/loss')."), \
        caplog.text


def test_cli_early_stopping_with_eval_every_above_max_steps_warns(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, "trainer.eval_every=500", "callbacks=[early_stopping]", f"hydra.run.dir={run_dir}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "EarlyStopping(monitor='loss', patience=3) cannot stop training early" in output
    assert "trainer.eval_every=500" in output


def test_early_stopping_in_a_loop_of_fit_calls_warns_only_of_the_call_and_a_pending_stop_not_at_all(tmp_path, caplog):
    """The verdict of a call's final evaluation carries over to the next call (here: the stop at step 20's final
    evaluation ends the next call at once). The warning speaks of the call it is given in, and says that; a later
    Trainer resumed from that stop, which acts at once, is not told it cannot act."""
    from trainer import EarlyStopping

    stop = EarlyStopping(monitor="accuracy", patience=1, min_delta=0.5)
    trainer = classifier([stop], eval_every=10, run_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="trainer"):
        for i in range(1, 4):
            trainer.fit(blobs().repeat(), blobs(64), steps=10 * i)
    warned = idle_warnings(caplog)
    assert len(warned) == 1, warned  # once per Trainer, at its first call
    assert "cannot stop training early in this fit() call" in warned[0], warned
    assert "a verdict at its final evaluation acts only in a later fit() call" in warned[0], warned
    assert int(trainer.step.numpy()) == 20 and stop.stopped_step == 20
    assert said(caplog, "Early stopping at step 20") and said(caplog, "Early stopping ended this run at step 20")
    assert said(caplog, "for 1 event (patience=1)"), caplog.text  # not "1 events"

    caplog.clear()
    again = EarlyStopping(monitor="accuracy", patience=1, min_delta=0.5)
    resumed = classifier([again], eval_every=100, run_dir=tmp_path)  # one evaluation, the final, before step 50
    with caplog.at_level(logging.INFO, logger="trainer"):
        resumed.fit(blobs().repeat(), blobs(64), steps=50)
    assert not idle_warnings(caplog), caplog.text
    assert said(caplog, "Early stopping ended this run at step 20") and int(resumed.step.numpy()) == 20


def test_early_stopping_with_a_baseline_counts_the_first_evaluation_and_names_the_baseline_at_the_stop(caplog):
    """With a baseline never beaten, the first evaluation counts too: patience=3 stops after 3 evaluations (not
    4), so eval_every=10 over 40 steps is enough (it was warned of as "needs 4"); the stop names the baseline."""
    from trainer import EarlyStopping

    trainer = classifier([EarlyStopping(monitor="accuracy", patience=3, baseline=0.999)], eval_every=10)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs().repeat(), blobs(64), steps=40)
    assert not idle_warnings(caplog), caplog.text
    assert int(trainer.step.numpy()) == 30
    stopped = said(caplog, "Early stopping at step 30")
    assert len(stopped) == 1 and "has not beaten baseline=0.999" in stopped[0], stopped
    assert "has not improved on" not in stopped[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer"):  # two evaluations before the last step: too few
        classifier([EarlyStopping(monitor="accuracy", patience=3, baseline=0.999)], eval_every=10).fit(
            blobs().repeat(), blobs(64), steps=30)
    warned = idle_warnings(caplog)
    assert len(warned) == 1 and "it needs 3 evaluations before the last step (step 30)" in warned[0], warned


def test_an_epochs_run_warns_too_and_its_fix_works(caplog):
    """The last step comes from fit(epochs=...) (16 batches an epoch): the warning names it, and its eval_every."""
    import re

    from trainer import EarlyStopping

    with caplog.at_level(logging.WARNING, logger="trainer"):
        classifier([EarlyStopping(patience=0)], eval_every=100).fit(blobs(), blobs(64), epochs=2)
    warned = idle_warnings(caplog)
    assert len(warned) == 1 and "it needs 2 evaluations before the last step (step 32)" in warned[0], warned
    assert "smaller patience" not in warned[0]  # patience is 0 already
    every = int(re.search(r"Fix: Trainer\(eval_every=(\d+)\) \(or less\)\.", warned[0]).group(1))

    caplog.clear()
    stop = EarlyStopping(patience=0, min_delta=10.0)  # no evaluation improves by 10: it stops at the second
    trainer = classifier([stop], eval_every=every)
    with caplog.at_level(logging.WARNING, logger="trainer"):
        trainer.fit(blobs(), blobs(64), epochs=2)
    assert not idle_warnings(caplog)
    assert stop.stopped_step == 2 * every < 32 and int(trainer.step.numpy()) == 2 * every


def test_a_plateau_whose_min_lr_is_not_below_the_learning_rate_warns_that_it_cannot_act(caplog):
    """ReduceLROnPlateau(min_lr=1e-2) with a rate of 1e-3: a reduction stops at min_lr, so it never acted, silently."""
    from trainer import ReduceLROnPlateau

    plateau = ReduceLROnPlateau(monitor="train/loss", patience=1, min_lr=1e-2, min_delta=10.0)
    trainer = classifier([plateau], log_every=2)  # SGD(0.05): raised to 1e-3 below
    trainer.optimizer.learning_rate = 1e-3
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs(), steps=10)
    warned = idle_warnings(caplog)
    assert len(warned) == 1, warned
    assert "ReduceLROnPlateau(min_lr=0.01) cannot lower the learning rate: it is 0.001, not above min_lr" in warned[0]
    assert "Fix: ReduceLROnPlateau(min_lr=<below 0.001>) (0: no floor)" in warned[0], warned
    assert not said(caplog, "learning rate lowered") and trainer.optimizer.learning_rate.numpy() == pytest.approx(1e-3)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):  # a floor below the rate: no warning, and it acts
        classifier([ReduceLROnPlateau(monitor="train/loss", patience=1, min_lr=1e-4, min_delta=10.0)],
                   log_every=2).fit(blobs(), steps=10)
    assert not idle_warnings(caplog) and said(caplog, "learning rate lowered"), caplog.text


MISNAMED = {"best_metric": ["trainer.best_metric=acc"],
            "early_stopping": ["callbacks=[early_stopping]", "callbacks.early_stopping.monitor=acc"],
            "plateau": ["callbacks=[reduce_lr_on_plateau]", "callbacks.reduce_lr_on_plateau.monitor=acc"]}


def files_of(folder):
    """Every file of a run folder and its bytes, but its lock (the pid of the run holding it) and trainer.log (each
    run started there adds its lines)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (".trainer.lock", "trainer.log")}


@pytest.mark.parametrize("where", list(MISNAMED))
def test_cli_a_misnamed_monitor_leaves_no_run_folder_as_a_misnamed_best_metric(tmp_path, where):
    """An early stopping or plateau monitor no eval result has left the run folder behind (its lock, trainer.log and
    model_summary.txt, written before the monitors were checked) where a wrong best_metric removed it."""
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, *MISNAMED[where], f"hydra.run.dir={run_dir}")
    out = result.stdout + result.stderr
    assert result.returncode == 2 and "(did you mean 'accuracy'?)" in out and "Traceback" not in out, out[-3000:]
    assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())


def test_cli_a_misnamed_monitor_leaves_an_existing_run_folder_as_it_was(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = files_of(run_dir)
    assert "checkpoints/ckpt-2.index" in before and "model_summary.txt" in before
    for where in ("best_metric", "early_stopping"):
        result = run_cli(*TINY, "trainer.max_steps=4", "model.hidden_units=[16]", *MISNAMED[where],
                         f"hydra.run.dir={run_dir}")
        out = result.stdout + result.stderr
        assert result.returncode == 2 and "(did you mean 'accuracy'?)" in out, out[-3000:]
        assert files_of(run_dir) == before, where  # model_summary.txt of another model was written over it


@pytest.mark.parametrize("where", ["best_metric", "early_stopping"])
def test_from_python_a_misnamed_monitor_leaves_no_run_folder_and_an_existing_one_as_it_was(tmp_path, where):
    from trainer import EarlyStopping
    from trainer.config import ConfigError

    def fit(run_dir, name):
        options = {"best_metric": name} if where == "best_metric" else {"callbacks": [EarlyStopping(monitor=name)]}
        return classifier(run_dir=run_dir, **options).fit(blobs(), blobs(64), steps=5)

    with pytest.raises(ConfigError, match=r"\(did you mean 'accuracy'\?\)"):
        fit(tmp_path / "new", "acc")
    assert not (tmp_path / "new").exists()
    fit(tmp_path / "old", "accuracy")
    before = files_of(tmp_path / "old")
    with pytest.raises(ConfigError, match=r"\(did you mean 'accuracy'\?\)"):
        fit(tmp_path / "old", "acc")
    assert files_of(tmp_path / "old") == before and "checkpoints/ckpt-5.index" in before


def test_from_python_a_new_run_folder_holding_the_users_own_trainer_log_is_kept_on_bad_input(tmp_path):
    """fit() removes a run folder it made and stopped in on bad input only when it holds nothing but the lock: a
    Python run writes no trainer.log, so one there is the user's (here their log file of trainer.core, opened in
    the folder once fit() made it) and the folder stays, with it."""
    from trainer import EarlyStopping, ReduceLROnPlateau
    from trainer.config import ConfigError

    run_dir = tmp_path / "new"
    users_log = logging.FileHandler(run_dir / "trainer.log", delay=True)  # opened at its first line
    core = logging.getLogger("trainer.core")
    level = core.level
    core.addHandler(users_log)
    core.setLevel(logging.INFO)
    try:  # the first monitor's name is said in trainer.core's log (in the folder), the second one is misspelt
        with pytest.raises(ConfigError, match=r"ReduceLROnPlateau\(monitor='acc'\) is not among"):
            classifier([EarlyStopping(monitor="accuracy"), ReduceLROnPlateau(monitor="acc")], run_dir=run_dir).fit(
                blobs(), {"a": blobs(64), "b": blobs(32)}, steps=5)
    finally:
        core.removeHandler(users_log)
        core.setLevel(level)
        users_log.close()
    assert sorted(p.name for p in run_dir.iterdir()) == [".trainer.lock", "trainer.log"]
    assert "judged on the first, 'a/accuracy'" in (run_dir / "trainer.log").read_text()


def test_nothing_to_train_suggests_an_epoch_total_that_trains_as_much_again(caplog):
    """fit(epochs=0.43) twice on 7 steps an epoch: 4 steps, then nothing. The total to ask for is rounded up:
    1.01 (8 steps, 4 more); rounded, 1.0 was 7 steps, a step short of as much again."""
    import keras
    import numpy as np

    from trainer import Trainer

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(56, 4)).astype("float32"), rng.integers(0, 2, 56).astype("int32")
    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False, verbose=False)
    trainer.fit(x, y, epochs=0.43, batch_size=8)
    caplog.set_level(logging.WARNING)
    trainer.fit(x, y, epochs=0.43, batch_size=8)
    said = [r.getMessage() for r in caplog.records if "nothing to train" in r.getMessage()]
    assert len(said) == 1 and "Fix: fit(epochs=1.01) to train as much again" in said[0], said
    trainer.fit(x, y, epochs=1.01, batch_size=8)
    assert int(trainer.step) == 8
