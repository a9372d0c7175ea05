"""trainer.resume_from: continue from a chosen checkpoint (ckpt-N, best, a path), what came after set aside."""
import csv
import json
import logging
import re

import pytest

from conftest import TINY, blobs, read_metrics, run_cli


def make(run_dir, **options):
    import keras

    from trainer import Trainer
    from trainer.callbacks.loggers import CSVLogger, MetricsWriter

    defaults = dict(deterministic=True, log_every=5, eval_every=5, checkpoint_every=5, keep_checkpoints=5, keep_best=3,
                    best_metric="loss", best_mode="min", progress_bar=False, tensorboard=False, seed=0)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                   keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   run_dir=run_dir, loggers=[MetricsWriter(), CSVLogger()],
                   **{**defaults, "optimizer": lambda: keras.optimizers.Adam(1e-2), **options})


def steps_of(rows):
    return [(r["split"], int(r["step"])) for r in rows]


def test_resume_from_ckpt_n_equals_a_run_stopped_there_and_keeps_the_rest_aside(tmp_path, caplog):
    """Back to ckpt-10 of a 20-step run, then on to 20: the weights equal the run's own (deterministic), the
    checkpoints and log rows after 10 are in checkpoints/set-aside-after-10/ (none lost), and the log says so.
    The same command again resumes from the newest; a bad name is one line listing the checkpoints."""
    from trainer.checkpoint import CheckpointError, list_checkpoints

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    first = make(run)
    first.fit(data, data.take(2), steps=20)
    whole = first.weights_fingerprint()
    rows_before = read_metrics(run)
    with open(run / "metrics.csv", newline="") as f:
        csv_before = list(csv.DictReader(f))

    with pytest.raises(CheckpointError, match=r"^trainer.resume_from=ckpt-12 is not a checkpoint of .*Fix: one of "
                                              r"ckpt-20, ckpt-15, ckpt-10, ckpt-5, best \(step \d+\)"):
        make(run, resume_from="ckpt-12").fit(data, data.take(2), steps=20)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [20, 15, 10, 5]  # nothing moved

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        again = make(run, resume_from="ckpt-10")
        again.fit(data, data.take(2), steps=20)
    assert again.weights_fingerprint() == whole
    aside = run / "checkpoints" / "set-aside-after-10"
    assert (f"Resuming from {run / 'checkpoints' / 'ckpt-10'} (step 10), as "
            "trainer.resume_from=ckpt-10 asks" in caplog.text)
    assert re.search(rf"after step 10 is set aside, not deleted, in {re.escape(str(aside))}: ckpt-20, ckpt-15, .*rows "
                     r"of metrics.jsonl", caplog.text)
    assert sorted(p.name for p in aside.glob("ckpt-*.index")) == ["ckpt-15.index", "ckpt-20.index"]
    moved = [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()]
    assert moved == [r for r in rows_before if r["step"] > 10]  # the old rows after 10, kept
    rows = read_metrics(run)
    assert steps_of(rows) == steps_of(rows_before)  # each step once: the rewound part logged anew
    with open(aside / "metrics.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [r for r in csv_before if int(r["step"]) > 10]
    with open(run / "metrics.csv", newline="") as f:
        assert steps_of(csv.DictReader(f)) == steps_of(csv_before)
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert all((run / "checkpoints" / "best" / f"ckpt-{e['step']}.index").exists() for e in best)

    caplog.clear()
    # the same checkpoint again, however spelled: no second rewind
    with caplog.at_level(logging.INFO, logger="trainer"):
        make(run, resume_from="10").fit(data, data.take(2), steps=20)
    assert ("Resumed from the newest checkpoint (step 20), not from step 10 that trainer.resume_from=10 names: this "
            "run went back to that checkpoint before") in caplog.text
    assert [r.levelname for r in caplog.records if "Resumed from the newest" in r.message] == ["WARNING"]
    assert sorted(p.name for p in aside.glob("ckpt-*.index")) == ["ckpt-15.index", "ckpt-20.index"]
    assert not (run / "checkpoints" / "set-aside-after-10-2").exists()


def test_resume_from_best_and_from_a_path(tmp_path, caplog):
    """best: the top of best.json (a copy in best/), later steps set aside there too; a path to a checkpoint
    of another run starts this folder from it; a folder, or no run folder, is one line."""
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    make(run).fit(data, data.take(2), steps=20)
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    top = best[0]["step"]
    resumed = make(run, resume_from="best")
    with caplog.at_level(logging.INFO, logger="trainer"):
        resumed.fit(data, data.take(2), steps=top)  # back to the best step, trains nothing more
    assert int(resumed.step.numpy()) == top
    assert f"Resuming from {run / 'checkpoints' / 'best' / f'ckpt-{top}'} (step {top})" in caplog.text
    kept = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    assert [e["step"] for e in kept] == [e["step"] for e in best if e["step"] <= top]

    fork = make(tmp_path / "fork", resume_from=str(run / "checkpoints" / "ckpt-10.index"))
    fork.fit(data, steps=12)
    assert int(fork.step.numpy()) == 12
    with pytest.raises(CheckpointError, match="is a folder; it takes one checkpoint"):
        make(tmp_path / "other", resume_from=str(run)).fit(data, steps=12)
    with pytest.raises(ConfigError, match=r"^Trainer\(resume_from='ckpt-10'\) needs the run folder .*Fix: give "
                                          r"Trainer\(run_dir=\.\.\.\) too"):
        make(None, resume_from="ckpt-10").fit(data, steps=12)


@pytest.mark.slow
def test_cli_resume_from(tmp_path):
    """From the command line: a bad name exits 2 with one line listing the checkpoints; ckpt-20 then training
    to 40 ends with the weights of the run's own 40 steps (trainer.deterministic=true)."""
    run = tmp_path / "run"
    args = [*TINY, "trainer.deterministic=true", f"hydra.run.dir={run}"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    whole = re.search(r"Weights fingerprint: (\w+)", result.stdout + result.stderr).group(1)
    bad = run_cli(*args, "trainer.resume_from=ckpt-30")
    output = bad.stdout + bad.stderr
    lines = [line for line in output.splitlines() if "trainer.resume_from" in line]
    assert (bad.returncode == 2 and len(lines) == 1
            and "Fix: one of ckpt-40, ckpt-20, best (step " in lines[0]), output[-2000:]
    assert "Traceback" not in output
    again = run_cli(*args, "trainer.resume_from=ckpt-20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"Weights fingerprint: (\w+)", again.stdout + again.stderr).group(1) == whole
    assert (run / "checkpoints" / "set-aside-after-20" / "ckpt-40.index").exists()
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [10, 20, 30, 40]


def test_resume_from_a_best_copy_older_than_every_kept_checkpoint(tmp_path):
    """keep_checkpoints=2 keeps ckpt-20 and ckpt-15; back to a best copy older than both: the restored state
    is saved as checkpoints/ckpt-N at once (a readable state file, no empty one), so the same command run again
    after a crash, or a plain resume, continues from N, to the weights of the run's own 20 steps."""
    import keras

    from trainer.callbacks.base import Callback
    from trainer.checkpoint import list_checkpoints

    class Crash(Callback):
        def on_log(self, trainer, step, logs):
            raise KeyboardInterrupt("preempted")

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    first = make(run, keep_checkpoints=2)
    first.fit(data, data.take(2), steps=20)
    whole, directory = first.weights_fingerprint(), run / "checkpoints"
    assert [s for s, _ in list_checkpoints(directory)] == [20, 15]
    older = [e["step"] for e in json.loads((directory / "best" / "best.json").read_text()) if e["step"] < 15]
    assert older, "the test needs a best copy older than the kept checkpoints"
    n, command = older[0], dict(keep_checkpoints=2, log_every=1, resume_from=f"best/ckpt-{older[0]}")
    with pytest.raises(KeyboardInterrupt):
        make(run, callbacks=[Crash()], **command).fit(data, data.take(2), steps=20)
    assert [s for s, _ in list_checkpoints(directory)] == [n]
    assert (directory / "checkpoint").read_text().startswith(f'model_checkpoint_path: "ckpt-{n}"')
    assert json.loads((directory / "resumed_from.json").read_text())["step"] == n

    again = make(run, **command)
    again.fit(data, data.take(2), steps=n)  # the printed resume command: the same one
    assert int(again.step.numpy()) == n
    plain = make(run, keep_checkpoints=2)
    plain.fit(data, data.take(2), steps=20)
    assert plain.weights_fingerprint() == whole
    best = json.loads((directory / "best" / "best.json").read_text())
    assert all((directory / "best" / f"ckpt-{e['step']}.index").exists() for e in best)
    assert keras.ops.convert_to_numpy(plain.step) == 20


def test_resume_from_own_set_aside_checkpoint_undoes_a_rewind_without_mixing(tmp_path):
    """A path into this run's own set-aside-after-N/ (undo a rewind): the regular checkpoints from its step on
    are set aside in turn and the restored one saved in their place, so the newest checkpoint is it."""
    from trainer.checkpoint import list_checkpoints

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    first = make(run)
    first.fit(data, data.take(2), steps=20)
    whole = first.weights_fingerprint()
    make(run, resume_from="ckpt-5").fit(data, data.take(2), steps=15)  # a second lineage: 10, 15
    undo = make(run, resume_from=str(run / "checkpoints" / "set-aside-after-5" / "ckpt-15"))
    undo.fit(data, data.take(2), steps=15)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [15, 10, 5]
    assert (run / "checkpoints" / "set-aside-after-15" / "ckpt-15.index").exists()  # the second lineage's 15
    plain = make(run)
    plain.fit(data, data.take(2), steps=20)
    assert plain.weights_fingerprint() == whole


def test_resume_from_uses_the_configured_learning_rate(tmp_path, caplog):
    """10 steps at lr 1e-3, on to 20 at 1e-1, back to ckpt-10 at 1e-1: the configuration's 0.1 wins over the
    checkpoint's 0.001 (the record of the newest run said 0.1 already), with a log line."""
    import keras

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    make(run, optimizer=lambda: keras.optimizers.Adam(1e-3)).fit(data, steps=10)
    make(run, optimizer=lambda: keras.optimizers.Adam(1e-1)).fit(data, steps=20)
    with caplog.at_level(logging.INFO, logger="trainer"):
        back = make(run, optimizer=lambda: keras.optimizers.Adam(1e-1), resume_from="ckpt-10")
        back.fit(data, steps=12)
    lr = float(keras.ops.convert_to_numpy(back.updaters[back.default_optimizer].optimizer.learning_rate))
    assert lr == pytest.approx(0.1)
    assert "Learning rate 0.1 from the configuration (the checkpoint had 0.001)" in caplog.text
    later = make(run, optimizer=lambda: keras.optimizers.Adam(1e-1))
    later.fit(data, steps=14)
    rate = later.updaters[later.default_optimizer].optimizer.learning_rate
    assert float(keras.ops.convert_to_numpy(rate)) == pytest.approx(0.1)


@pytest.mark.parametrize("moves", [1, 3, 5])
def test_a_rewind_cut_short_is_finished_by_the_next_start(tmp_path, monkeypatch, moves):
    """A crash after `moves` file moves of a rewind to a best copy (os.replace raising): the next start, plain
    or the same command, finishes it from checkpoints/set-aside.json: one regular checkpoint, ckpt-N, a state
    file naming only it, every later checkpoint and best copy in the one set-aside folder, best.json naming
    only copies there; another resume_from first is refused."""
    import os

    from trainer.checkpoint import list_checkpoints
    from trainer.config import ConfigError

    run, data = tmp_path / "run", blobs(n=320, batch=16)
    make(run, keep_checkpoints=2).fit(data, data.take(2), steps=20)
    directory = run / "checkpoints"
    n = min(e["step"] for e in json.loads((directory / "best" / "best.json").read_text()))
    later_best = sorted(s for s, _ in list_checkpoints(directory / "best") if s > n)
    real, calls = os.replace, []

    def cut(src, dst):
        if "set-aside-after" in str(dst) and len(calls) >= moves:
            raise OSError("killed")
        calls.append(dst)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(OSError, match="killed"):
        make(run, keep_checkpoints=2, resume_from=f"best/ckpt-{n}").fit(data, data.take(2), steps=20)
    monkeypatch.setattr(os, "replace", real)
    assert (directory / "set-aside.json").exists()
    with pytest.raises(ConfigError, match=rf"cut short while taking this run back to step {n}"):
        make(run, keep_checkpoints=2, resume_from="ckpt-20").fit(data, data.take(2), steps=20)
    finished = make(run, keep_checkpoints=2, **({"resume_from": f"best/ckpt-{n}"} if moves == 3 else {}))
    finished.fit(data, data.take(2), steps=n)
    assert int(finished.step.numpy()) == n
    assert [s for s, _ in list_checkpoints(directory)] == [n]
    assert (directory / "checkpoint").read_text().count("all_model_checkpoint_paths") == 1
    aside = directory / f"set-aside-after-{n}"
    assert [s for s, _ in list_checkpoints(aside)] == [20, 15] and not (directory / f"set-aside-after-{n}-2").exists()
    assert sorted(s for s, _ in list_checkpoints(aside / "best")) == later_best
    best = json.loads((directory / "best" / "best.json").read_text())
    assert [s for s, _ in list_checkpoints(directory / "best")] == [n] == [e["step"] for e in best]
    assert not (directory / "set-aside.json").exists()


def test_resume_from_with_a_damaged_best_record_rebuilds_it_and_sets_the_later_copies_aside(tmp_path, caplog):
    from conftest import tiny_classifier

    options = dict(run_dir=tmp_path, best_metric="loss", best_mode="min", keep_best=3)
    tiny_classifier(**options).fit(blobs(), blobs(), steps=10)
    best = tmp_path / "checkpoints" / "best"
    (best / "best.json").write_text("[\n {")  # torn
    caplog.set_level(logging.WARNING, logger="trainer")
    tiny_classifier(resume_from="ckpt-5", **options).fit(blobs(), blobs(), steps=10)
    assert "best.json is unreadable" in caplog.text and "rebuilt from the copies" in caplog.text
    assert (tmp_path / "checkpoints" / "set-aside-after-5" / "best" / "ckpt-10.index").exists()
    assert json.loads((best / "best.json").read_text())[0]["step"] in (5, 10)


def test_a_run_folder_with_brackets_says_why_it_cannot_resume_and_resumes_once_renamed(tmp_path, caplog):
    """TensorFlow reads a checkpoint's path as a glob pattern: a folder named for a list-valued key
    (`2_model.hidden_units=[8]`, a sweep's job) made every checkpoint "unreadable", with "restore the files from a
    backup" as the fix. It says the cause; renamed, the run resumes."""
    from trainer.checkpoint import CheckpointError

    folder = tmp_path / "0_model.hidden_units=[8]"
    make(folder).fit(blobs(), steps=10)
    with pytest.raises(CheckpointError, match=r"brackets.*intact.*hydra.sweep.subdir=\$\{hydra.job.num\}"):
        make(folder).fit(blobs(), steps=15)
    renamed = folder.rename(tmp_path / "0_model.hidden_units=8")
    with caplog.at_level(logging.INFO, logger="trainer"):
        make(renamed).fit(blobs(), steps=15)
    assert "ckpt-10 (step 10)" in caplog.text
    assert [int(r["step"]) for r in read_metrics(renamed) if r["split"] == "train"] == [5, 10, 15]
