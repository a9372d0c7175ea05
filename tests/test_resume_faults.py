"""Damage a run folder by hand between two fit() calls (a byte of a checkpoint, best.json, a log's last row, ...):
the next start resumes without losing a step, says what it found, and leaves the checkpoints intact."""
import json
import logging

import pytest

from conftest import blobs, tiny_classifier
from trainer.checkpoint import list_checkpoints


def _fit(run_dir, steps, **options):
    trainer = tiny_classifier(run_dir=run_dir, **options)
    trainer.fit(blobs(), blobs(), steps=steps)
    return trainer


def test_a_damaged_byte_in_the_callbacks_state_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    _fit(tmp_path, 10)  # ckpt-5, ckpt-10
    data = next((tmp_path / "checkpoints").glob("ckpt-10.data-*"))
    raw = bytearray(data.read_bytes())
    at = raw.find(b"Checkpointing")  # inside the callbacks' py_state tensor (their state_dict()s as JSON)
    assert at >= 0
    raw[at] ^= 0xFF
    data.write_bytes(bytes(raw))
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = _fit(tmp_path, 15)
    assert "ckpt-10 is unreadable" in caplog.text and "Checksum" in caplog.text
    assert "Resumed from an older checkpoint (step 5)" in caplog.text
    assert "could not be found in the restored object" not in caplog.text  # no half-read Checkpoint's pages
    assert int(trainer.step.numpy()) == 15
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][0] == 15


@pytest.mark.parametrize("damage", ["", '[\n {\n  "step": 1'])  # emptied, or cut short
def test_a_damaged_best_record_is_rebuilt_from_the_best_copies_and_no_step_is_lost(tmp_path, caplog, damage):
    _fit(tmp_path, 10, best_metric="loss", best_mode="min")
    best = tmp_path / "checkpoints" / "best"
    (step, value), = [(e["step"], e["loss"]) for e in json.loads((best / "best.json").read_text())]
    (best / "best.json").write_text(damage)
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = _fit(tmp_path, 20, best_metric="loss", best_mode="min")
    assert int(trainer.step.numpy()) == 20
    assert f"{best / 'best.json'} is unreadable" in caplog.text and f"steps [{step}], loss={value:g}" in caplog.text
    ranked = json.loads((best / "best.json").read_text())
    assert len(ranked) == 1 and ranked[0]["loss"] <= value  # the copy kept by its recorded value, or a better one
    assert sorted(p.name for p in best.glob("*.index")) == [f"ckpt-{ranked[0]['step']}.index"]
    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")][0] == 20


def _wide(run_dir):
    """A Trainer whose checkpoint (~100 KB) outgrows a small file size limit that its logs stay under."""
    import keras

    from trainer import Trainer

    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(4096),
                                                   keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.01), run_dir=run_dir, log_every=5, eval_every=5,
                   checkpoint_every=5, progress_bar=False, tensorboard=False, verbose=False)


def _write_refused_then_resumed(run_dir, refuse, allow, expected):
    from trainer.checkpoint import CheckpointError

    _wide(run_dir).fit(blobs(), blobs(), steps=5)
    checkpoints = run_dir / "checkpoints"
    before = {p: p.read_bytes() for p in checkpoints.glob("ckpt-5*")}
    refuse()
    try:
        with pytest.raises(CheckpointError) as raised:
            _wide(run_dir).fit(blobs(), blobs(), steps=10)
    finally:
        allow()
    assert expected in str(raised.value) and "the last complete checkpoint is step 5" in str(raised.value)
    assert "Fix: " in str(raised.value) and str(checkpoints) in str(raised.value)
    assert {p: p.read_bytes() for p in checkpoints.glob("ckpt-5*")} == before
    assert not list(checkpoints.rglob("*_temp*")), "the partial save is removed"
    assert int(_wide(run_dir).fit(blobs(), blobs(), steps=10)["step"]) == 10  # the same call resumes


def test_a_file_size_limit_while_saving_is_a_checkpoint_error_and_the_run_resumes(tmp_path):
    import resource

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)  # Python ignores SIGXFSZ: a write over it is EFBIG
    _write_refused_then_resumed(tmp_path, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, limits[1])),
                                lambda: resource.setrlimit(resource.RLIMIT_FSIZE, limits), "file size limit")


def test_a_run_folder_made_immutable_is_a_checkpoint_error_and_the_run_resumes(tmp_path):
    import os
    import subprocess

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("needs root and a file system with chattr +i")
    subprocess.run(["chattr", "-i", str(folder)], check=True)
    _write_refused_then_resumed(tmp_path, lambda: subprocess.run(["chattr", "+i", str(folder)], check=True),
                                lambda: subprocess.run(["chattr", "-i", str(folder)], check=True), "not permitted")


def test_a_refused_deletion_of_an_old_checkpoint_keeps_the_new_complete_one(tmp_path):
    import os
    import subprocess

    from trainer.checkpoint import CheckpointError

    _fit(tmp_path, 5, keep_checkpoints=1)
    old = tmp_path / "checkpoints" / "ckpt-5.index"
    if os.geteuid() != 0 or subprocess.run(["chattr", "+i", str(old)], capture_output=True).returncode:
        pytest.skip("needs root and a file system with chattr +i")
    try:  # the user protects a checkpoint they like: its deletion by the rotation is refused
        with pytest.raises(CheckpointError, match=f"not permitted at {old} while saving step 10; the last complete "
                                                  "checkpoint is step 10"):
            _fit(tmp_path, 10, keep_checkpoints=1)
    finally:
        subprocess.run(["chattr", "-i", str(old)], check=True)
    assert 10 in [step for step, _ in list_checkpoints(tmp_path / "checkpoints")], "the new complete one is kept"


@pytest.mark.parametrize("batch, skip, again", [(32, 5, 0), (48, 3, 16)])
def test_a_resume_with_another_batch_size_skips_the_examples_read(tmp_path, caplog, batch, skip, again):
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=16), steps=10)  # 10 batches of 16: 160 examples
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=batch), steps=15)
    said = f"the run read 10 batches of 16 examples (160); batches are now {batch} examples"
    assert said in caplog.text and f"the resume skips {skip} batches of {batch}" in caplog.text
    if again:
        assert f"the last {again} examples read, not a whole batch of {batch}, are trained on again" in caplog.text
        assert "keep data.batch_size=16" in caplog.text
    assert f"Data: skipping {skip} batches" in caplog.text
    record = json.loads((tmp_path / "checkpoints" / "configured.json").read_text())
    assert (record["step"], record["batches_read"], record["batch_size"]) == (15, skip + 5, batch)


def test_a_batch_size_resume_counts_the_real_passes_over_the_data_not_the_epochs_steps(tmp_path, caplog):
    # 100 examples in batches of 10: a pass is 10 batches; 4 accumulated batches a step and fit(steps_per_epoch=2)
    # call an epoch 8. 3 steps read 12 batches: a pass and 2 batches (20 examples), so batches of 5 skip 20 + 4.
    options = dict(run_dir=tmp_path, grad_accum_steps=4, checkpoint_every=3, eval_every=3, log_every=3)
    tiny_classifier(**options).fit(blobs(n=100, batch=10), steps=3, steps_per_epoch=2)
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(**options).fit(blobs(n=100, batch=5), steps=4, steps_per_epoch=2)
    assert "skips 24 batches of 5 (1 passes over the data, then 20 examples of the next): the same examples" \
        in caplog.text
    record = json.loads((tmp_path / "checkpoints" / "configured.json").read_text())
    assert (record["batch_size"], record["pass_batches"], record["batches_read"]) == (5, 20, 28)


def test_a_batch_size_resume_over_data_of_unknown_length_counts_examples_and_says_so(tmp_path, caplog):
    def unknown_length(batch):
        return blobs(batch=batch).filter(lambda x, y: True)  # cardinality unknown

    tiny_classifier(run_dir=tmp_path).fit(unknown_length(16), steps=6, steps_per_epoch=4)  # 96 examples
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(run_dir=tmp_path).fit(unknown_length(32), steps=8, steps_per_epoch=4)
    assert "skips 3 batches of 32: the same examples unless a pass over the data ended in between" in caplog.text
    assert json.loads((tmp_path / "checkpoints" / "configured.json").read_text())["pass_batches"] is None


def test_a_batch_size_resume_from_a_record_without_the_batch_size_warns_it_cannot_be_compared(tmp_path, caplog):
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=16), steps=5)
    record = tmp_path / "checkpoints" / "configured.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items() if k != "batch_size"}))
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=32), steps=10)
    warned = [r for r in caplog.records if "cannot be compared" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "skips 5 batches of 32" in caplog.text


def _recorded_as_read_by(run_dir, workers):
    """The run's record as a run of `workers` workers wrote it (None: a record from before it held the count)."""
    record = run_dir / "checkpoints" / "configured.json"
    written = json.loads(record.read_text())
    assert written["input_pipelines"] == 1  # this process: one input pipeline
    written.pop("input_pipelines")
    record.write_text(json.dumps(written if workers is None else {**written, "input_pipelines": workers}))


def test_a_resume_with_another_worker_count_warns_it_reads_other_examples(tmp_path, caplog):
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=16), steps=5)
    _recorded_as_read_by(tmp_path, 2)  # as python -m trainer.launch --workers 2 records it
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(run_dir=tmp_path).fit(blobs(batch=16), steps=10)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "2 workers" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    said = warned[0].getMessage()
    assert "read its training data as 2 workers (2 input shards), this one reads it as one process" in said
    assert "other examples, in another order" in said
    assert "To resume exactly: resume with the strategy of the run's start, over 2 workers" in said
    assert "Data: skipping 5 batches, as many examples as the first 5 steps trained on, but not the same" in caplog.text
    assert "in the same order" not in caplog.text
    assert json.loads((tmp_path / "checkpoints" / "configured.json").read_text())["input_pipelines"] == 1


def test_a_deterministic_resume_with_another_worker_count_is_refused_and_the_checkpoints_kept(tmp_path):
    from trainer.config import ConfigError

    tiny_classifier(run_dir=tmp_path, deterministic=True).fit(blobs(batch=16), steps=5)
    _recorded_as_read_by(tmp_path, 3)
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match=r"Trainer\(deterministic=True\) and the run this one resumes read its "
                                          r"training data as 3 workers .* Fix: resume with the strategy of the run's "
                                          r"start, over 3 workers, or Trainer\(deterministic=False\)"):
        tiny_classifier(run_dir=tmp_path, deterministic=True).fit(blobs(batch=16), steps=10)
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir() if p.is_file()} == before


def test_a_record_without_the_worker_count_resumes_as_before(tmp_path, caplog):
    tiny_classifier(run_dir=tmp_path, deterministic=True).fit(blobs(batch=16), steps=5)
    _recorded_as_read_by(tmp_path, None)  # a run from before the record held it
    caplog.set_level(logging.INFO, logger="trainer")
    tiny_classifier(run_dir=tmp_path, deterministic=True).fit(blobs(batch=16), steps=10)
    assert "workers" not in caplog.text and "to resume in the same order" in caplog.text


def test_a_torn_last_row_of_the_metrics_files_is_dropped_on_resume(tmp_path, caplog):
    import csv

    from trainer import CSVLogger, MetricsWriter

    _fit(tmp_path, 10, loggers=[MetricsWriter(), CSVLogger()])
    for name in ("metrics.jsonl", "metrics.csv"):  # cut mid-row, as by a kill while it was written
        path = tmp_path / name
        path.write_bytes(path.read_bytes()[:-25])
    caplog.set_level(logging.INFO, logger="trainer")
    _fit(tmp_path, 15, loggers=[MetricsWriter(), CSVLogger()])
    for name in ("metrics.jsonl", "metrics.csv"):
        assert f"{tmp_path / name} ended in a line cut short" in caplog.text
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 15
    table = list(csv.reader((tmp_path / "metrics.csv").open(newline="")))
    assert len({len(r) for r in table}) == 1 and table[-1][0] == "15"


def test_what_a_kill_mid_save_left_is_removed_at_the_next_start_and_nothing_a_record_names(tmp_path, caplog):
    import shutil

    _fit(tmp_path, 10, best_metric="loss", best_mode="min")
    checkpoints, best = tmp_path / "checkpoints", tmp_path / "checkpoints" / "best"
    (named,) = [e["step"] for e in json.loads((best / "best.json").read_text())]
    (checkpoints / "ckpt-15_temp").mkdir()  # a kill inside TF's save
    (best / "ckpt-15_temp").mkdir()
    for f in checkpoints.glob("ckpt-5.*"):  # a copy best.json dropped, its deletion cut short by a kill
        shutil.copy(f, best / f.name.replace("ckpt-5", "ckpt-2"))
    kept = {p.name for p in checkpoints.rglob("*") if "_temp" not in str(p) and "ckpt-2." not in p.name}
    caplog.set_level(logging.INFO, logger="trainer")
    trainer = tiny_classifier(run_dir=tmp_path, best_metric="loss", best_mode="min")
    trainer.fit(blobs(), blobs(), steps=10)  # finished: nothing to train, but the start cleans
    assert "ckpt-15_temp/, best/ckpt-15_temp/, best/ckpt-2.* (named by no record)" in caplog.text
    assert {p.name for p in checkpoints.rglob("*")} == kept
    assert (best / f"ckpt-{named}.index").exists()


def test_a_second_ctrl_c_during_a_save_exits_130_in_one_line(tmp_path, monkeypatch):
    import os
    import signal

    from conftest import TINY, run_cli
    from trainer.checkpoint import Checkpointer

    def save(self, step):  # a person pressing Ctrl-C twice while step 20 is saved
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("not reached")

    monkeypatch.setattr(Checkpointer, "save", save)
    result = run_cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "stopped at once by Ctrl-C (SIGINT)" in result.stderr


def test_a_resume_with_another_batch_size_from_a_record_without_it_reads_the_run_config(tmp_path):
    from conftest import TINY, run_cli

    run = [*TINY, f"hydra.run.dir={tmp_path}"]  # 40 steps of 64
    assert run_cli(*run).returncode == 0
    record = tmp_path / "checkpoints" / "configured.json"
    older = {k: v for k, v in json.loads(record.read_text()).items() if k not in ("batch_size", "pass_batches")}
    record.write_text(json.dumps(older))  # as a run from before the record held the batch size
    result = run_cli(*run, "data.batch_size=32", "trainer.max_steps=50")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "the run read 40 batches of 64 examples (2560)" in out and "skips 80 batches of 32" in out
