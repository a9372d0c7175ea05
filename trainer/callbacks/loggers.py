"""Loggers: callbacks that record each train log and evaluation of a run, chosen with `logger=[...]`
(conf/logger/) or `Trainer(loggers=[...])`.

  MetricsWriter      run_dir/metrics.jsonl, one JSON object per event (on by default)
  TensorBoardWriter  run_dir/tensorboard/{train,eval} scalars (on by default; trainer.tensorboard=false: off);
                     several eval sets: tensorboard/eval/<name>, each with the plain names (loss, accuracy)
  CSVLogger          run_dir/metrics.csv, one row per event, columns kept across resume
  MLflowLogger       an MLflow run: params, metrics by step, the final checkpoint; continued on resume

Every logger is a `Logger`: `chief_only = True`, so on a multi-worker run only the chief writes (the
CallbackList leaves chief-only callbacks out on the other workers: the one place that rule lives).
A logger given no path writes into the Trainer's run folder.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from trainer import evalsets
from trainer.callbacks.base import Callback
from trainer.config import ConfigError

log = logging.getLogger("trainer.callbacks")

MLFLOW_INSTALL = 'pip install -e ".[mlflow]"'


def scalars(logs: Dict) -> Dict[str, float]:
    return {k: v for k, v in logs.items() if k not in ("step", "split") and isinstance(v, (int, float))}


class Logger(Callback):
    """A callback that records train logs (`on_log`) and evaluations (`on_eval_end`) somewhere.
    Subclasses write `record(trainer, split, step, logs)`; split is "train" or "eval"."""

    chief_only = True

    def record(self, trainer, split: str, step: int, logs: Dict) -> None:
        raise NotImplementedError

    def on_log(self, trainer, step, logs):
        self.record(trainer, "train", step, logs)

    def on_eval_end(self, trainer, step, logs):
        self.record(trainer, "eval", step, logs)

    def has_eval(self, step: int) -> Optional[bool]:
        """Whether the record holds an evaluation at `step`; None: cannot tell. A finished run started
        again logs its final evaluation only where it is missing (a run stopped during it)."""
        return None

    def logged(self, split: str, step: int) -> Optional[Dict]:
        """The record's `split` log at `step`, as it was logged; None: none, or cannot tell. A finished run
        started again without eval data returns its last train log from it."""
        return None

    @staticmethod
    def drop_torn_last_line(path: Path) -> None:
        """A file that does not end in a newline holds a last line cut short (a kill while it was written):
        dropped, and said, so the next row does not join it into one invalid row."""
        if not path.is_file() or not path.stat().st_size:
            return
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            text = f.read()
            keep = text.rfind(b"\n") + 1
            f.truncate(keep)
        log.info("%s ended in a line cut short (a kill while it was written): dropped it (%d bytes), so every row "
                 "stays whole.", path, len(text) - keep)

    @staticmethod
    def in_run_dir(trainer, path: Optional[Union[str, Path]], default: str) -> Path:
        """`path`, or `default` inside the Trainer's run folder; a logger without either cannot write."""
        if path is not None:
            return Path(path)
        if trainer.run_dir is None:
            raise ConfigError(f"a logger writing {default} needs a run folder: give the Trainer run_dir=..., "
                              "or the logger a path")
        return trainer.run_dir / default


class MetricsWriter(Logger):
    """Appends one JSON object per log/eval event to metrics.jsonl (default: in the run folder)."""

    def __init__(self, path: Optional[Union[str, Path]] = None):
        self.path = Path(path) if path is not None else None

    def on_train_begin(self, trainer):
        self.path = self.in_run_dir(trainer, self.path, "metrics.jsonl")
        self.drop_torn_last_line(self.path)

    def record(self, trainer, split, step, logs):
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in logs.items()}
        record["time"] = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def has_eval(self, step):
        return self.logged("eval", step) is not None

    def logged(self, split, step):
        if self.path is None or not self.path.is_file():
            return None
        found = None
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if isinstance(row, dict) and row.get("split") == split and row.get("step") == step:
                found = row  # the last: a resumed run's rows after a rewind replace the earlier ones
        if found is None:
            return None
        return {k: (math.nan if v is None else v) for k, v in found.items() if k != "time"}  # None: a non-finite


class TensorBoardWriter(Logger):
    """Scalars for everything in metrics.jsonl, under tensorboard/{train,eval} (default: in the run folder)."""

    def __init__(self, logdir: Optional[Union[str, Path]] = None):
        self.logdir = Path(logdir) if logdir is not None else None
        self.writers = {}

    def on_train_begin(self, trainer):
        self.logdir = self.in_run_dir(trainer, self.logdir, "tensorboard")

    def record(self, trainer, split, step, logs):
        sets = getattr(trainer, "eval_set_names", None) if split == "eval" else None
        if sets:  # a run per eval set, eval/<name>: TensorBoard draws the sets' `loss` on one chart
            for name, results in evalsets.split_by_set(logs, sets).items():
                self._write(f"{split}/{name}", step, results)
        else:
            self._write(split, step, logs)

    def _write(self, run: str, step: int, logs: Dict) -> None:
        import tensorflow as tf

        if run not in self.writers:
            self.writers[run] = tf.summary.create_file_writer(str(self.logdir / run))
        with self.writers[run].as_default():
            for name, value in scalars(logs).items():
                tf.summary.scalar(name, value, step=step)
        self.writers[run].flush()

    def on_train_end(self, trainer, summary):
        for w in self.writers.values():
            w.close()
        self.writers = {}


class CSVLogger(Logger):
    """One row per log/eval event in metrics.csv (default: in the run folder), as Keras' CSVLogger with
    append=True: a resumed run appends to the file. Columns: step, split, time, then each log's name in
    the order first seen; eval rows leave train-only columns (lr, examples_per_sec) empty.

    A name that was not a column yet (a callback adding a log in a resumed run, say) does not shift the
    columns under the old rows: the file is rewritten once with the union of columns (the new ones at
    the end, the old rows' cells for them empty), atomically (a temporary file, then os.replace).
    Keras' CSVLogger fixes its columns at the first row instead and cannot take a new key."""

    FIXED = ("step", "split", "time")

    def __init__(self, path: Optional[Union[str, Path]] = None):
        self.path = Path(path) if path is not None else None
        self.columns: List[str] = []

    def on_train_begin(self, trainer):
        self.path = self.in_run_dir(trainer, self.path, "metrics.csv")
        self.columns = []
        self.drop_torn_last_line(self.path)
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                self.columns = next(csv.reader(f), [])

    def record(self, trainer, split, step, logs):
        row = {"step": step, "split": split, "time": f"{time.time():.3f}", **scalars(logs)}
        new = [name for name in row if name not in self.columns]
        if new:
            self._rewrite_header([*self.columns, *new] if self.columns
                                 else [*self.FIXED, *(n for n in new if n not in self.FIXED)])
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)

    def _rewrite_header(self, columns: List[str]) -> None:
        rows = []
        if self.path.exists() and self.path.stat().st_size:
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text.getvalue())
        os.replace(tmp, self.path)
        self.columns = columns


def flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict as dotted keys: {"optimizer": {"lr": 0.001}} -> {"optimizer.lr": 0.001}."""
    if not isinstance(config, dict):
        return {prefix: config}
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class MLflowLogger(Logger):
    """Logs the run to MLflow with its client: params, metrics by step (`train/loss`, `eval/accuracy`),
    the final checkpoint (and best/) as artifacts, and the run's end status (FINISHED, KILLED when
    interrupted, FAILED). A resumed run continues the same MLflow run: its id is kept in the run folder
    (mlflow_run_id).

    Args:
      tracking_uri: where runs are stored; None: an SQLite file in the run folder, mlflow.db (no server);
        a server: "http://host:5000".
      experiment: the MLflow experiment (made when missing); the CLI's default is the recipe.
      run_name: the MLflow run's name; None: the run folder's name.
      params: logged as params beside `trainer.hparams` (the CLI sets those: the composed config, flattened).
      log_checkpoints: upload the final checkpoint (and best/) as artifacts at the end.
      artifact_location: where a new experiment keeps artifacts; None: the run folder's mlartifacts/ with
        the default store, the server's choice otherwise.
    """

    RUN_ID_FILE = "mlflow_run_id"

    def __init__(self, tracking_uri: Optional[str] = None, experiment: str = "trainer", run_name: Optional[str] = None,
                 params: Optional[Dict[str, Any]] = None, log_checkpoints: bool = True,
                 artifact_location: Optional[str] = None):
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError(f"logger=mlflow needs the MLflow client, which is not installed. Fix: {MLFLOW_INSTALL} "
                              "(or drop mlflow from logger=[...])") from None
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.params, self.log_checkpoints, self.artifact_location = (dict(params or {}), log_checkpoints,
                                                                     artifact_location)
        self.client, self.run_id = None, None

    def on_train_begin(self, trainer):
        from mlflow import MlflowClient

        run_dir = trainer.run_dir
        uri, artifacts = self.tracking_uri, self.artifact_location
        # SQLite: MLflow 3.17's file store (file:<dir>) refuses to start unless MLFLOW_ALLOW_FILE_STORE=true
        if uri is None:
            database = self.in_run_dir(trainer, None, "mlflow.db").resolve()
            uri, artifacts = f"sqlite:///{database}", artifacts or (database.parent / "mlartifacts").as_uri()
        self.client = MlflowClient(uri)
        self.run_id = self.run_id or self._kept_run_id(run_dir)
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(self.experiment, artifact_location=artifacts))
            name = self.run_name or (run_dir.name if run_dir is not None else None)
            self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
            if run_dir is not None:
                (run_dir / self.RUN_ID_FILE).write_text(self.run_id + "\n")
            log.info("MLflow run %s in experiment %r at %s", self.run_id, self.experiment, uri)
        else:
            self.client.update_run(self.run_id, status="RUNNING")
            log.info("MLflow run %s continued (at %s)", self.run_id, uri)
        self._log_params({**getattr(trainer, "hparams", {}), **self.params})

    def _kept_run_id(self, run_dir: Optional[Path]) -> Optional[str]:
        """The run id this run folder logged to before, when the store still has that run."""
        from mlflow.exceptions import MlflowException

        kept = run_dir / self.RUN_ID_FILE if run_dir is not None else None
        if kept is None or not kept.exists():
            return None
        run_id = kept.read_text().strip()
        try:
            self.client.get_run(run_id)
        except MlflowException:
            log.warning("MLflow run %s (from %s) is not in the store at %s: starting a new MLflow run",
                        run_id, kept, self.client.tracking_uri)
            return None
        return run_id

    def _log_params(self, params: Dict[str, Any]) -> None:
        """MLflow params cannot change: on resume, new keys are logged and changed values (a raised
        trainer.max_steps) are left as first logged, with a log line naming them."""
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        wanted = {k: str(v)[:6000] for k, v in params.items()}  # MLflow's limit on a param's value
        changed = {k: (logged[k], v) for k, v in wanted.items() if k in logged and logged[k] != v}
        if changed:
            log.info("MLflow params keep their first values (params cannot change): %s",
                     ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items()))
        new = [Param(k, v) for k, v in wanted.items() if k not in logged]
        for i in range(0, len(new), 100):  # MLflow's limit per log_batch call
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def record(self, trainer, split, step, logs):
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(f"{split}/{name}", float(value), stamp, step) for name, value in scalars(logs).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_train_end(self, trainer, summary):
        if self.client is None or self.run_id is None:
            return
        status = "FAILED" if summary.get("failed") else "KILLED" if summary.get("interrupted") else "FINISHED"
        try:
            if self.log_checkpoints and status == "FINISHED":
                self._log_checkpoint(trainer)
        finally:
            self.client.set_terminated(self.run_id, status=status)

    def _log_checkpoint(self, trainer) -> None:
        """The newest checkpoint's files under checkpoints/, and best/ (its index and kept copies)."""
        if trainer.run_dir is None:
            return
        folder = trainer.run_dir / "checkpoints"
        newest = trainer.checkpointing.last_path or _newest_checkpoint(folder)
        if newest is None:
            return
        for file in sorted(Path(newest).parent.glob(Path(newest).name + ".*")):
            self.client.log_artifact(self.run_id, str(file), artifact_path="checkpoints")
        if (folder / "best").is_dir() and any((folder / "best").iterdir()):
            self.client.log_artifacts(self.run_id, str(folder / "best"), artifact_path="checkpoints/best")


def _newest_checkpoint(folder: Path) -> Optional[str]:
    import tensorflow as tf

    return tf.train.latest_checkpoint(str(folder)) if folder.is_dir() else None


def default_loggers(trainer) -> List[Logger]:
    """Without `Trainer(loggers=...)`: metrics.jsonl and TensorBoard in the run folder, when there is one."""
    if trainer.run_dir is None:
        return []
    return [MetricsWriter(), TensorBoardWriter()]
