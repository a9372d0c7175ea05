"""Loggers (trainer/callbacks/loggers.py): `logger=[...]` from the CLI and `Trainer(loggers=...)` from
Python; metrics.csv across a resume; a real MLflow store read back with the MLflow client."""
from __future__ import annotations

import csv
import os
import signal
import sys

import pytest

from conftest import blobs, read_metrics, run_cli

# A tiny MNIST run: eval every 10 steps, 2 eval batches, a 16-unit MLP.
SMALL = ["recipe=mnist", "trainer.log_every=10", "trainer.eval_every=10", "trainer.eval_steps=2",
         "trainer.checkpoint_every=20", "trainer.progress_bar=false", "data.batch_size=32", "model.hidden_units=[16]"]


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


# the default stage: the Python API's CSV and MLflow test below, docs/loggers.md's logger=[jsonl,csv,mlflow] block
@pytest.mark.slow
def test_cli_csv_and_mlflow_across_a_resume(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    run = tmp_path / "run"
    first = run_cli(*SMALL, "trainer.max_steps=20", "logger=[jsonl,csv,mlflow]", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run / "mlflow_run_id").read_text().strip()
    header_before, _ = read_csv(run / "metrics.csv")
    second = run_cli(*SMALL, "trainer.max_steps=40", "logger=[jsonl,csv,mlflow]", f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stderr[-3000:]

    # metrics.csv: one row per event, train and eval, appended by the resumed run under the same columns
    header, rows = read_csv(run / "metrics.csv")
    assert header == header_before and header[:3] == ["step", "split", "time"]
    assert {"loss", "accuracy", "lr", "examples_per_sec"} <= set(header)
    assert [(r["step"], r["split"]) for r in rows] == [(str(s), split) for s in (10, 20, 30, 40)
                                                       for split in ("train", "eval")]
    assert all(r["lr"] == "" for r in rows if r["split"] == "eval")  # a train-only column stays empty
    jsonl = read_metrics(run)
    assert [float(r["loss"]) for r in rows] == pytest.approx([r["loss"] for r in jsonl])
    assert not (run / "tensorboard").exists()  # not selected

    # the MLflow store under the run folder, read back with the client
    client = mlflow.MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    assert (run / "mlflow_run_id").read_text().strip() == run_id  # the resumed run continued the same MLflow run
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    experiment = client.get_experiment(got.info.experiment_id)
    assert experiment.name == "mnist" and len(client.search_runs([experiment.experiment_id])) == 1
    assert got.data.params["optimizer.lr"] == "0.001" and got.data.params["model.hidden_units"] == "[16]"
    assert got.data.params["trainer.max_steps"] == "20"  # params cannot change: the first value stays
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == [10, 20, 30, 40]
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in jsonl if r["split"] == "train"])
    assert [m.step for m in client.get_metric_history(run_id, "eval/accuracy")] == [10, 20, 30, 40]
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
    assert {"checkpoints/ckpt-40.index", "checkpoints/best"} <= artifacts


def test_python_api_csv_logger_new_columns_and_mlflow_status(tmp_path, monkeypatch):
    """CSVLogger from Python; a resumed Trainer with one more metric rewrites the header with the union of
    columns. An MLflowLogger from Python: a SIGTERM ends its run KILLED, an error FAILED, and each resumed
    fit() continues the same MLflow run, FINISHED at the end."""
    mlflow = pytest.importorskip("mlflow")
    import keras

    from trainer import Callback, CSVLogger, MLflowLogger, Trainer, TrainingInterrupted

    class TermAt(Callback):
        def on_loop_end(self, trainer, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    class FailAt(Callback):
        def on_save_point(self, trainer, step, reason):  # after step 4 was logged and saved
            if step == 4:
                raise RuntimeError("a bug in a callback")

    def make(metrics, callbacks=()):
        return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.Adam(1e-2), metrics=metrics, run_dir=tmp_path,
                       loggers=[CSVLogger(), MLflowLogger(experiment="blobs")], callbacks=callbacks,
                       progress_bar=False, verbose=False, log_every=2, checkpoint_every=2)

    data = blobs(n=128)
    with pytest.raises(TrainingInterrupted):
        make({"accuracy": keras.metrics.SparseCategoricalAccuracy()}, [TermAt()]).fit(data, data.take(2), steps=6)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    with pytest.raises(RuntimeError, match="a bug"):
        make({"accuracy": keras.metrics.SparseCategoricalAccuracy()}, [FailAt()]).fit(data, data.take(2), steps=6)
    assert client.get_run(run_id).info.status == "FAILED"
    make({"accuracy": keras.metrics.SparseCategoricalAccuracy(),
          "top1": keras.metrics.SparseTopKCategoricalAccuracy(k=1)}).fit(data, data.take(2), steps=6)

    header, rows = read_csv(tmp_path / "metrics.csv")
    assert header[-1] == "top1" and header.index("top1") > header.index("accuracy")  # the new column at the end
    assert [(r["step"], r["split"]) for r in rows] == [("2", "train"), ("4", "train"), ("6", "train"), ("6", "eval")]
    assert rows[0]["top1"] == "" and float(rows[2]["top1"]) == pytest.approx(float(rows[2]["accuracy"]))
    # loggers= replaces the defaults
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "tensorboard").exists()

    (run,) = client.search_runs([client.get_experiment_by_name("blobs").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"  # the same run, continued
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [2, 4, 6]
    assert [m.step for m in client.get_metric_history(run_id, "eval/top1")] == [6]


def test_python_api_logger_without_a_folder_says_what_to_give():
    from trainer import CSVLogger, Trainer
    from trainer.config import ConfigError

    import keras

    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), loggers=[CSVLogger()], verbose=False)
    with pytest.raises(ConfigError, match="needs a run folder: give the Trainer run_dir"):
        trainer.fit(blobs(n=32), steps=1)


def test_missing_mlflow_exits_2_naming_the_extra(tmp_path, monkeypatch):
    """Without the mlflow package (hidden: `import mlflow` then raises ImportError, as when it is not
    installed), logger=[mlflow] exits 2 before training, naming the install command."""
    monkeypatch.setitem(sys.modules, "mlflow", None)
    run = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.max_steps=20", "logger=[csv,mlflow]", f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert 'logger=mlflow needs the MLflow client' in output and 'pip install -e ".[mlflow]"' in output
    assert "Traceback" not in output
    assert not (run / "checkpoints").exists() and not (run / "metrics.csv").exists()
