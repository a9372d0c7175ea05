"""The W&B logger (trainer/callbacks/wandb_logger.py), offline as without a login: the history is read back
from W&B's own run files (<run>/wandb/offline-run-*/run-<id>.wandb, records of wandb's protobuf `Record`),
across a resume (one run id, the steps continued)."""
from __future__ import annotations

import struct
import sys

import pytest

from conftest import read_metrics, run_cli

SMALL = ["recipe=mnist", "trainer.log_every=5", "trainer.eval_every=5", "trainer.eval_steps=1",
         "trainer.checkpoint_every=5", "trainer.progress_bar=false", "data.batch_size=32", "model.hidden_units=[16]"]


def wandb_records(path):
    """The protobuf records of a .wandb file: W&B's 7-byte header, then LevelDB's log format (32 KiB blocks;
    each chunk: crc32c, length, type FULL=1 | FIRST=2 | MIDDLE=3 | LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, offset, block = [], b"", 7, 32768
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # too little room for a chunk header: the block's zero padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk, offset = data[offset + 7:offset + 7 + length], offset + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(run_dir):
    """(run id, [(step, {key: value})], exit code) of each offline segment of the run folder, oldest first."""
    import json

    segments = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        records = wandb_records(file)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        rows = [(r.history.step.num,
                 {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
                for r in records if r.WhichOneof("record_type") == "history"]
        exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        config = {i.key: i.value_json for r in records if r.WhichOneof("record_type") == "config"
                  for i in r.config.update}
        segments.append((run.run_id, rows, exits, config))
    return segments


@pytest.fixture
def no_login(monkeypatch, tmp_path):
    """As on a machine with no W&B account: no API key, no netrc entry, no WANDB_MODE."""
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_SERVICE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.mark.slow  # the default stage: the Python API's interrupted-then-resumed W&B run below (same run id, offline
# without a login) and logger=[csv,wandb] from the CLI in the missing-wandb test
def test_cli_wandb_offline_without_login_continued_across_a_resume(tmp_path, no_login):
    run = tmp_path / "run"
    first = run_cli(*SMALL, "trainer.max_steps=5", "logger=[jsonl,wandb]", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (run / "wandb_run_id").read_text().strip()
    assert "logged offline" in (run / "trainer.log").read_text()  # no login: offline, and the log says how to sync
    second = run_cli(*SMALL, "trainer.max_steps=10", "logger=[jsonl,wandb]", f"hydra.run.dir={run}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert (run / "wandb_run_id").read_text().strip() == run_id

    segments = history(run)
    assert [s[0] for s in segments] == [run_id, run_id]  # one W&B run, written in two sessions
    steps = [step for _, rows, _, _ in segments for step, _ in rows]
    assert steps == [5, 10]  # continued after the resume; W&B keeps a step's train and eval logs in one row
    jsonl = read_metrics(run)
    logged = [row.get("train/loss") for _, rows, _, _ in segments for _, row in rows if "train/loss" in row]
    assert logged == pytest.approx([r["loss"] for r in jsonl if r["split"] == "train"])
    evals = [row["eval/accuracy"] for _, rows, _, _ in segments for _, row in rows if "eval/accuracy" in row]
    assert evals == pytest.approx([r["accuracy"] for r in jsonl if r["split"] == "eval"])
    assert [s[2] for s in segments] == [[0], [0]]  # both sessions finished
    config = segments[1][3]
    assert config["optimizer.lr"] == "0.001" and config["trainer.max_steps"] == "10"  # the config, as this session ran


def test_python_api_wandb_interrupted_then_resumed(tmp_path, no_login):
    """From Python: a SIGTERM ends the W&B session with exit code 1 and summary end=interrupted; the resumed
    fit() writes to the same run id from the saved step on."""
    import os
    import signal

    import keras

    from conftest import blobs
    from trainer import Callback, Trainer, TrainingInterrupted, WandbLogger

    class TermAt(Callback):
        def on_loop_end(self, trainer, step):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    def make(callbacks=()):
        return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path,
                       loggers=[WandbLogger(project="blobs", params={"note": "api"})], callbacks=callbacks,
                       progress_bar=False, verbose=False, log_every=2, checkpoint_every=2)

    data = blobs(n=128)
    with pytest.raises(TrainingInterrupted):
        make([TermAt()]).fit(data, data.take(2), steps=6)
    make().fit(data, data.take(2), steps=6)
    (first_id, first, first_exit, _), (second_id, second, second_exit, config) = history(tmp_path)
    assert first_id == second_id == (tmp_path / "wandb_run_id").read_text().strip()
    assert [step for step, _ in first] == [2] and first_exit == [1]
    assert [step for step, _ in second] == [4, 6] and second_exit == [0]
    assert {"train/loss", "eval/loss"} <= set(second[1][1])
    assert config["note"] == '"api"'


def test_missing_wandb_exits_2_naming_the_extra(tmp_path):
    """Without the wandb package (hidden: `import wandb` raises ImportError, as when it is not installed),
    logger=[wandb] exits 2 before training, naming the install command."""
    run = tmp_path / "run"
    saved = sys.modules.get("wandb")
    sys.modules["wandb"] = None  # the import system's "not installed"
    try:
        result = run_cli(*SMALL, "trainer.max_steps=20", "logger=[csv,wandb]", f"hydra.run.dir={run}")
    finally:
        if saved is not None:
            sys.modules["wandb"] = saved
        else:
            del sys.modules["wandb"]
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "logger=wandb needs the Weights & Biases client" in output and 'pip install -e ".[wandb]"' in output
    assert "Traceback" not in output and not (run / "checkpoints").exists()


def test_a_netrc_login_for_wandbs_default_host_logs_online(tmp_path, no_login):
    """`wandb login` writes its key under the client's default host (api.forge.coreweave.com in wandb 0.31,
    not api.wandb.ai): that login is found, so the run is online; without it, offline."""
    import wandb

    from trainer import WandbLogger

    host = wandb.Settings().base_url.split("//")[-1]
    (tmp_path / "no-netrc").write_text(f"machine {host}\n  login user\n  password {'a1' * 20}\n")
    assert WandbLogger().chosen_mode() == "online"
    (tmp_path / "no-netrc").write_text(f"machine api.example.org\n  login user\n  password {'a1' * 20}\n")
    assert WandbLogger().chosen_mode() == "offline"


@pytest.mark.slow
def test_an_unreachable_wandb_server_is_a_one_line_error_naming_offline(tmp_path, no_login, monkeypatch):
    """With a login but no network, wandb.init fails (W&B's CommError): exit 2, one line naming the offline
    mode; and no wandb-core process or WANDB_SERVICE is left behind in this process."""
    import os

    monkeypatch.setenv("WANDB_API_KEY", "a1" * 20)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    run = tmp_path / "run"
    result = run_cli(*SMALL, "trainer.max_steps=5", "logger=[jsonl,wandb]", f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "logger.wandb.mode=offline" in output and "WANDB_MODE=offline" in output
    assert "Traceback" not in output
    assert "WANDB_SERVICE" not in os.environ


def test_fit_leaves_no_wandb_service_behind(tmp_path, no_login):
    """After fit(), wandb's service process is stopped, its environment variable gone and sys.exit and
    sys.excepthook are this process's own again."""
    import os
    from pathlib import Path

    import keras

    from conftest import blobs
    from trainer import Trainer, WandbLogger

    def children():
        """{pid: command name} of this process's live children (from /proc: ppid and state)."""
        found = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                name = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
            except OSError:
                continue
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                found[stat.parent.name] = name
        return found

    before, hooks = children(), (sys.exit, sys.excepthook)
    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=tmp_path, loggers=[WandbLogger()],
                      progress_bar=False, verbose=False, log_every=2)
    trainer.fit(blobs(n=64), steps=2)
    assert "WANDB_SERVICE" not in os.environ
    assert (sys.exit, sys.excepthook) == hooks  # wandb's wrappers of them undone
    names = [name for pid, name in children().items() if pid not in before]
    assert not [n for n in names if "wandb" in n], names
