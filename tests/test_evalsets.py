"""Several eval sets: fit(train, {"val": ds, "ood": ds2}), logged as <set>/<metric> everywhere, monitored by name."""
import csv
import json
import logging
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_metrics, run_cli
from trainer import CSVLogger, EarlyStopping, MetricsWriter, ReduceLROnPlateau, TensorBoardWriter, Trainer
from trainer.errors import UserError


def blobs(n, seed, shift=3.0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return (rng.normal(size=(n, 4)) + shift * y[:, None]).astype("float32"), y


def batches(x, y, batch=32):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def make(**kwargs):
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(5e-2),
                   metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy()},
                   progress_bar=False, log_every=5, eval_every=5, **kwargs)


TRAIN, VAL, OOD = blobs(256, 0), blobs(64, 1), blobs(64, 2, shift=-3.0)  # ood: the classes swapped


def test_each_set_is_logged_by_name_in_every_logger_and_the_plot(tmp_path):
    import mlflow

    from trainer import MLflowLogger
    from trainer.plot import load_runs, plot_runs

    trainer = make(run_dir=tmp_path, best_metric="ood/loss", best_mode="min", keep_best=1,
                   loggers=[MetricsWriter(), CSVLogger(), TensorBoardWriter(), MLflowLogger(experiment="sets")])
    logs = trainer.fit(batches(*TRAIN).repeat(), {"val": batches(*VAL), "ood": batches(*OOD)}, steps=15)
    assert sorted(k for k in logs if k not in ("step", "split")) == ["ood/accuracy", "ood/loss", "val/accuracy",
                                                                     "val/loss"]
    assert logs["val/accuracy"] > 0.6 > logs["ood/accuracy"]  # the sets really are evaluated apart
    assert logs["val/loss"] == pytest.approx(trainer.evaluate(batches(*VAL))["loss"], rel=1e-5)
    rows = [r for r in read_metrics(tmp_path) if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [5, 10, 15] and rows[-1]["ood/loss"] == pytest.approx(logs["ood/loss"])
    with (tmp_path / "metrics.csv").open() as f:
        assert {"val/loss", "ood/accuracy"} <= set(next(csv.reader(f)))
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "eval/ood/accuracy")] == [5, 10, 15]
    best = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    assert best[0]["ood/loss"] == pytest.approx(min(r["ood/loss"] for r in rows), rel=1e-6)
    assert {p.name for p in (tmp_path / "tensorboard" / "eval").iterdir()} == {"val", "ood"}  # a run per set
    shutil.copytree(tmp_path, tmp_path.parent / "tb_only",
                    ignore=shutil.ignore_patterns("metrics.jsonl", "metrics.csv"))
    from_tensorboard = load_runs([str(tmp_path.parent / "tb_only")])[0]
    assert from_tensorboard.series("eval", "ood/loss")[1] == pytest.approx([r["ood/loss"] for r in rows], rel=1e-6)
    panels = {ax.get_ylabel(): [line.get_label() for line in ax.get_lines()]
              for ax in plot_runs([str(tmp_path)]).get_axes()}
    assert [label.split()[-2:] for label in panels["accuracy"]][1:] == [["eval", "ood"], ["eval", "val"]]


def test_one_set_keeps_the_plain_names(tmp_path):
    logs = make(run_dir=tmp_path).fit(batches(*TRAIN).repeat(), batches(*VAL), steps=5)
    assert "loss" in logs and not any("/" in k for k in logs)
    evals = tmp_path / "tensorboard" / "eval"
    assert evals.is_dir() and not any(p.is_dir() for p in evals.iterdir())


def test_val_names_the_one_set_as_it_does_beside_a_second(tmp_path):
    """The docs call the recipe's split (fit's validation data) `val`, and a second set names it so: with one set,
    `val/accuracy`, `eval/val/loss` and Keras' `val_loss` read its plain `accuracy` and `loss`."""
    stopper, plateau = (EarlyStopping(monitor="val/accuracy", patience=100),
                        ReduceLROnPlateau(monitor="eval/val/loss", patience=100))
    keras_name = EarlyStopping(monitor="val_loss", patience=100)
    x, y = TRAIN
    make(run_dir=tmp_path, best_metric="val/accuracy", callbacks=[stopper, plateau, keras_name]).fit(
        x, y, batch_size=32, steps=10, validation_split=0.25)
    assert (stopper.reads, plateau.reads, keras_name.reads) == ("accuracy", "loss", "loss")
    assert stopper.best_step is not None and keras_name.best_step is not None
    assert "accuracy" in json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())[0]
    beside = EarlyStopping(monitor="val_accuracy", patience=100)
    make(callbacks=[beside]).fit(x, y, batch_size=32, steps=5, validation_split=0.25, validation_data={"ood": OOD})
    assert beside.reads == "val/accuracy"
    with pytest.raises(UserError, match=r"EarlyStopping\(monitor='val/acc'\) is not among the eval "
                                        r"results \['accuracy', 'loss'\]"):
        make(callbacks=[EarlyStopping(monitor="val/acc")]).fit(x, y, batch_size=32, steps=5, validation_split=0.25)


def test_val_names_the_recipes_one_split_from_the_cli_and_in_a_sweep(tmp_path, tiny):
    from omegaconf import OmegaConf

    from trainer.sweep import check_sweep_metric, job_value

    run = tmp_path / "run"
    result = run_cli(*tiny, "trainer.max_steps=20", "trainer.eval_every=10", "trainer.eval_steps=2",
                     "callbacks=[early_stopping]",
                     "callbacks.early_stopping.monitor=val_accuracy", "trainer.best_metric=eval/val/accuracy",
                     f"hydra.run.dir={run}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "accuracy" in json.loads((run / "checkpoints" / "best" / "best.json").read_text())[0]
    for metric in ("val/accuracy", "val_accuracy"):
        config = OmegaConf.create({"trainer": {"sweep_metric": metric}, "metrics": {"accuracy": {}}})
        check_sweep_metric(config)
        assert job_value({"step": 5, "loss": 0.3, "accuracy": 0.7}, config.trainer) == (0.7, None)
    with pytest.raises(UserError, match="the run logs no 'val/acc'"):
        check_sweep_metric(OmegaConf.create({"trainer": {"sweep_metric": "val/acc"}, "metrics": {"accuracy": {}}}))


def test_early_stopping_and_plateau_monitor_a_named_set(caplog):
    stopper, plateau = (EarlyStopping(monitor="val/accuracy", patience=100),
                        ReduceLROnPlateau(monitor="eval/ood/loss", patience=100))
    default = EarlyStopping(monitor="loss", patience=100)  # a bare name: the first set's, said in the log
    with caplog.at_level(logging.INFO, logger="trainer"):
        make(callbacks=[stopper, plateau, default]).fit(batches(*TRAIN).repeat(),
                                                        {"val": batches(*VAL), "ood": batches(*OOD)}, steps=15)
    assert (stopper.reads, plateau.reads, default.reads) == ("val/accuracy", "ood/loss", "val/loss")
    assert "judged on the first, 'val/loss'" in caplog.text
    assert stopper.best_step is not None and plateau.best_step is not None


@pytest.mark.parametrize("callback, message", [
    (lambda: EarlyStopping(monitor="vall/accuracy"),
     "no eval set is named 'vall'; the eval results are ['val/accuracy'"),
    (lambda: EarlyStopping(monitor="val/acc"), "did you mean 'val/accuracy'"),
])
def test_a_monitor_no_set_holds_is_an_error_naming_the_results(callback, message):
    with pytest.raises(UserError) as error:
        make(callbacks=[callback()]).fit(batches(*TRAIN).repeat(), {"val": batches(*VAL), "ood": batches(*OOD)},
                                         steps=5)
    assert message in str(error.value) and "ood/loss" in str(error.value)


def test_best_metric_naming_no_set_is_an_error(tmp_path):
    with pytest.raises(UserError, match=r"Trainer\(best_metric='test/accuracy'\): no eval set is named 'test'"):
        make(run_dir=tmp_path, best_metric="test/accuracy").fit(batches(*TRAIN).repeat(), {"val": batches(*VAL)},
                                                                steps=5)


@pytest.mark.parametrize("name", ["train", "a/b", ""])
def test_set_names_that_cannot_name_logs_are_refused(name):
    with pytest.raises(UserError, match="cannot name logs"):
        make().fit(batches(*TRAIN).repeat(), {name: batches(*VAL)}, steps=5)


def test_numpy_validation_joins_named_sets_as_val():
    x, y = TRAIN
    logs = make().fit(x, y, batch_size=32, steps=5, validation_split=0.25, validation_data={"ood": OOD})
    assert {"val/loss", "ood/loss"} <= set(logs)
    with pytest.raises(UserError, match="already have a 'val'"):
        make().fit(x, y, steps=5, validation_split=0.25, validation_data={"val": OOD})


def test_eval_sets_from_the_cli(tmp_path, tiny):
    """+eval_sets.ood.path=FILE: the recipe's data with that key changed gives a second eval set, monitored by name."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "ood.npz"
    np.savez(npz, x_train=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8),
             y_train=rng.integers(0, 10, 64).astype(np.uint8),
             x_test=rng.integers(0, 255, (64, 28, 28), dtype=np.uint8), y_test=rng.integers(0, 10, 64).astype(np.uint8))
    run = tmp_path / "run"
    result = run_cli(*tiny, "trainer.max_steps=20", "trainer.eval_every=10", "trainer.eval_steps=2",
                     f"+eval_sets.ood.path={npz}",
                     "callbacks=[early_stopping]", "callbacks.early_stopping.monitor=ood/accuracy",
                     "trainer.best_metric=val/accuracy", f"hydra.run.dir={run}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [r for r in read_metrics(run) if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [10, 20] and {"val/accuracy", "ood/accuracy"} <= set(rows[-1])
    assert rows[-1]["val/accuracy"] != rows[-1]["ood/accuracy"]  # random labels: about chance on ood
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert "val/accuracy" in best[0]
    bad = run_cli(*tiny, "trainer.max_steps=2", f"+eval_sets.ood.path={npz}", "trainer.best_metric=ood/acuracy",
                  f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "did you mean 'ood/accuracy'" in bad.stdout + bad.stderr


@pytest.mark.parametrize("override, message", [
    ("+eval_sets.ood.pth=ood.npz", "Key 'pth' not in"),
    ("+eval_sets.ood=foo", "eval_sets.ood=foo: an eval set is the data.* keys"),
    ("+eval_sets.ood.batch_size=abc", "'abc' of type 'str'")])
def test_a_bad_eval_set_exits_2_naming_the_data_keys_before_building(tmp_path, tiny, override, message):
    result = run_cli(*tiny, override, f"hydra.run.dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output and "with a key of data: name, path, batch_size" in output
    assert "Traceback" not in output and "parameters (" not in output  # nothing built


def test_a_sweep_may_rank_a_named_set():
    """trainer.sweep_metric=ood/accuracy is checked against the names the eval sets log, before any job."""
    from omegaconf import OmegaConf

    from trainer.sweep import check_sweep_metric

    def config(metric):
        return OmegaConf.create({"trainer": {"sweep_metric": metric}, "metrics": {"accuracy": {}},
                                 "eval_sets": {"ood": {"path": "ood.npz"}}})

    check_sweep_metric(config("ood/accuracy"))
    check_sweep_metric(config("accuracy"))  # the first set's, as trainer.best_metric reads it
    with pytest.raises(UserError, match="its eval logs hold loss, accuracy, val/loss, "
                                        "val/accuracy, ood/loss, ood/accuracy"):
        check_sweep_metric(config("ood/acc"))


def test_a_bare_sweep_metric_ranks_the_first_set_the_run_logged(caplog):
    """`val` is there only when the recipe has an eval split: the first set is whichever the logs hold first."""
    from omegaconf import OmegaConf

    from trainer.sweep import job_value

    trainer_cfg = OmegaConf.create({"sweep_metric": "accuracy"})
    with caplog.at_level(logging.INFO, logger="trainer.core"):
        assert job_value({"step": 5, "val/accuracy": 0.7, "ood/accuracy": 0.2}, trainer_cfg) == (0.7, None)
        assert job_value({"step": 5, "ood/accuracy": 0.2, "far/accuracy": 0.1}, trainer_cfg) == (0.2, None)
    assert "judged on the first, 'ood/accuracy'" in caplog.text
