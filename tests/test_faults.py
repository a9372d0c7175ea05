"""Faults a user can cause (issue #18): a clear message naming the problem and the fix, exit 2, no
traceback, and nothing existing damaged."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, run_cli, wait_until


def assert_user_error(result, *expected: str) -> None:
    out = result.stderr + result.stdout
    assert result.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    for text in expected:
        assert text in out, out[-3000:]


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted on `folder` (tests run as root); skips the test where that is not possible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# -- 1. every numeric option has a range -------------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lr=-1", "optimizer.lr=-1.0 is out of range: must be > 0"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5 is out of range: must be in [1, 9223372036854775807]"),
        ("trainer.keep_checkpoints=-1", "trainer.keep_checkpoints=-1 is out of range: must be >= 1"),
        ("model.dropout=1.5", "model.dropout=1.5 is out of range: must be in [0, 1)"),
        # issue 29: each was accepted (or a traceback) before
        ("optimizer.lr=inf", "optimizer.lr=inf is not a finite number: must be finite and > 0"),
        ("trainer.max_steps=99999999999999999999",
         "trainer.max_steps=99999999999999999999 is out of range: must be in [1, 9223372036854775807]"),
        ("+trainer.foo=1", "trainer.foo is not a key of trainer (its schema TrainerConfig has: max_steps, epochs,"),
        # `max_steps=5` is refused before Hydra runs (test_config.py); `+max_steps=5` composes, and nothing reads it
        ("+max_steps=5", "max_steps is not a key of the run's config, so nothing would read it"),
        ("+max_steps=5", "Fix: did you mean trainer.max_steps?"),
        ("+optimizer.learning_rate=1e-3", "Fix: did you mean optimizer.lr? Else drop optimizer.learning_rate."),
        ("model=mnist_cnn model.filters=[]", "model.filters=[] leaves the cnn without a convolution"),
        ("model.kind=foo", "model.kind='foo' is not one of mlp|cnn"),
        ("data.name=foo", "data.name='foo' is not one of mnist|fashion_mnist"),
        ("trainer.max_steps=null", "no run length: trainer.max_steps and trainer.epochs are both null"),
    ],
)
def test_out_of_range_option_is_a_config_error_before_any_work(tmp_path, override, expected):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, *override.split(), f"hydra.run.dir={run_dir}")
    assert_user_error(result, expected)
    assert not run_dir.exists(), "a config error must leave no run folder"


def test_every_numeric_field_of_every_schema_has_a_range():
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from trainer import config
    from trainer.assemble import register_configs

    register_configs()
    schemas = {config.Config, config.FinetuneConfig, config.TrainerConfig, config.PrecisionConfig,
               config.StrategyConfig}
    for group in ConfigStore.instance().repo.values():
        for item in group.values() if isinstance(group, dict) else ():
            if hasattr(item, "node"):
                schemas.add(OmegaConf.get_type(item.node))
    assert len(schemas) > 15, schemas
    exempt = {"label_offset"}  # any integer: stored labels are checked against num_classes when read
    missing = [
        f"{schema.__name__}.{f.name}"
        for schema in schemas
        for f in dataclasses.fields(schema)
        if re.search(r"\b(int|float)\b", str(f.type)) and "range" not in f.metadata and f.name not in exempt
    ]
    assert not missing, missing


def test_python_api_checks_ranges_too():
    import keras

    from trainer import PrecisionConfig, StrategyConfig, Trainer, TrainerConfig
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"Trainer\(epochs=-1\) is out of range"):
        TrainerConfig(epochs=-1)
    with pytest.raises(ConfigError, match=r"PrecisionConfig\(max_consecutive_skips=0\) is out of range"):
        PrecisionConfig(max_consecutive_skips=0)
    with pytest.raises(ConfigError, match=r"StrategyConfig\(logical_cpus=0\) is out of range: must be >= 1"):
        StrategyConfig(name="mirrored", logical_cpus=0)  # 0 meant "no split" silently; unset (None) says that
    with pytest.raises(ConfigError, match=r"Trainer\(checkpoint_every=-5\) is out of range"):
        Trainer(model=lambda: keras.Sequential([keras.layers.Dense(1)]), loss="mse",
                optimizer=lambda: keras.optimizers.SGD(0.1), checkpoint_every=-5)


# -- 2. a model option of another recipe -------------------------------------------------------


def test_model_of_another_recipe_lists_the_recipes_models(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("recipe=mnist", "model=resnet50", f"hydra.run.dir={run_dir}")
    assert_user_error(result, "model=resnet50 is not a model of recipe=mnist", "['mnist_cnn', 'mnist_mlp']")
    assert not run_dir.exists()


# -- 3. a read-only run folder -----------------------------------------------------------------


def test_read_only_run_folder_is_named(tmp_path):
    with tmpfs(tmp_path / "ro", "size=4m,ro") as folder:
        result = run_cli(*TINY, f"hydra.run.dir={folder / 'run'}")
        assert_user_error(result, f"run folder {folder / 'run'} is on a read-only file system")


# -- 7. one run per run folder -----------------------------------------------------------------


@pytest.mark.slow
def test_second_run_on_a_locked_folder_changes_nothing(tmp_path):
    from trainer.runlock import LOCK_FILE, acquire, release

    run_dir = tmp_path / "run"
    fd = acquire(run_dir)  # this process stands in for a running first run
    try:
        result = run_cli(*TINY, f"hydra.run.dir={run_dir}", process=True)  # a lock is per process
    finally:
        release(fd)
    import socket

    assert_user_error(result, f"run folder {run_dir} is in use by another run (process {os.getpid()} on host "
                      f"{socket.gethostname()}: ", f"Fix: wait for that run to end (or stop it: kill {os.getpid()})")
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE], "no .hydra/, no trainer.log"


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    from trainer.runlock import RunFolderError, acquire, release

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from trainer.runlock import acquire; acquire(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=f"process {holder.pid}"):
            acquire(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    release(acquire(tmp_path))  # the OS dropped the dead process's lock


@pytest.mark.parametrize("through_symlink", [False, True])
def test_a_lock_inherited_by_a_child_of_an_ended_run_names_the_holder(tmp_path, through_symlink):
    """The lock file names the run that took the lock; when that run ended and a process it forked still
    holds the lock, the message named the dead process. It now says so and names the holder, also when
    the folder is reached through a symlink (the processes' open files are matched by inode, not path)."""
    import socket

    from trainer.runlock import RunFolderError, acquire

    asked = tmp_path
    if through_symlink:
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        tmp_path, asked = tmp_path / "real", tmp_path / "link"

    script = ("import os, sys, time; from trainer.runlock import acquire; acquire(sys.argv[1]); pid = os.fork()\n"
              "if pid == 0: time.sleep(120); os._exit(0)\n"
              "print(os.getpid(), pid, flush=True); os._exit(0)")
    run = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    parent, child = map(int, run.stdout.readline().split())  # the child keeps the pipe open: no wait for its end
    run.wait()
    try:
        with pytest.raises(RunFolderError) as refused:
            acquire(asked)
    finally:
        os.kill(child, signal.SIGKILL)
        run.stdout.close()
    message = str(refused.value)
    assert (f"the lock file names process {parent} on host {socket.gethostname()}, which no longer runs; "
            f"the lock is held by process {child}: ") in message, message
    assert f"Fix: end that process (kill {child}), or pick another folder with hydra.run.dir=PATH." in message


def test_a_reused_process_id_in_the_lock_file_gets_no_kill_advice(tmp_path):
    """The lock file's process id, now a process that started after the file was written (the system
    reused the id), is not the run: the message says it no longer runs and names the real holder."""
    import socket

    from trainer.runlock import LOCK_FILE, RunFolderError, acquire

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.runlock import acquire; "
                               "acquire(sys.argv[1]); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    lock = tmp_path / LOCK_FILE
    try:
        assert holder.stdout.readline().strip() == "locked"
        written = lock.stat().st_mtime
        reused = subprocess.Popen(["sleep", "60"])  # the id the file will name, started after it was written
        lock.write_text(f"{reused.pid} {socket.gethostname()}\n")
        os.utime(lock, (written - 60, written - 60))
        try:
            with pytest.raises(RunFolderError) as refused:
                acquire(tmp_path)
        finally:
            reused.kill()
            reused.wait()
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert f"which no longer runs; the lock is held by process {holder.pid}" in message, message
    assert f"kill {reused.pid}" not in message and f"Fix: end that process (kill {holder.pid})" in message


# -- 4. a full disk during a save --------------------------------------------------------------


def _fill(folder: Path, leave: int) -> Path:
    """Fills `folder`'s file system up to `leave` free bytes (small writes fit, a checkpoint does not)."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_last_checkpoint_and_resumes(tmp_path):
    small = ["trainer.keep_best=0", "trainer.tensorboard=false", "model.hidden_units=[32]"]  # ~0.3 MB a checkpoint
    with tmpfs(tmp_path / "disk", "size=16m") as disk:
        run = [*TINY, *small, f"hydra.run.dir={disk / 'run'}"]
        first = run_cli(*run, "trainer.max_steps=20")
        assert first.returncode == 0, first.stderr[-3000:]
        checkpoints = disk / "run" / "checkpoints"
        before = _files(checkpoints)

        filler = _fill(disk, leave=150 * 1024)
        full = run_cli(*run, "trainer.max_steps=40")
        assert_user_error(full, "while saving step 40; the last complete checkpoint is step 20")
        assert f"no space left on device at {checkpoints}/" in full.stdout + full.stderr, "the file it names"
        assert _files(checkpoints) == before, "the last checkpoint and the state file are as they were"
        assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [], "no ckpt-40_temp/ left"

        filler.unlink()
        again = run_cli(*run, "trainer.max_steps=40")
        assert again.returncode == 0, again.stderr[-3000:]
        assert "Resuming from" in again.stderr + again.stdout and (checkpoints / "ckpt-40.index").exists()


def test_resuming_on_a_full_disk_says_the_log_file_fails_once(tmp_path):
    """A resume on an already-full disk printed a `--- Logging error ---` traceback for every log line
    before the exit-2 message: now one line names the log file, and the lines go on to the terminal."""
    small = ["trainer.keep_best=0", "trainer.tensorboard=false", "model.hidden_units=[32]"]
    with tmpfs(tmp_path / "disk", "size=16m") as disk:
        run = [*TINY, *small, f"hydra.run.dir={disk / 'run'}"]
        assert run_cli(*run, "trainer.max_steps=20").returncode == 0
        log_file = disk / "run" / "trainer.log"
        with log_file.open("a") as f:  # to a page boundary: the next line needs a page the full disk lacks
            f.write("\n" * (-log_file.stat().st_size % 4096))
        _fill(disk, leave=0)
        full = run_cli(*run, "trainer.max_steps=40")
        assert_user_error(full, "no space left on device")
        assert "Logging error" not in full.stderr and "Traceback" not in full.stderr, full.stderr[-3000:]
        said = [line for line in full.stderr.splitlines() if "cannot be written" in line]
        assert len(said) == 1 and f"the log file {log_file} cannot be written" in said[0], full.stderr[-3000:]
        assert "Resuming from" in full.stdout + full.stderr  # the lines after it still reach the terminal
        assert (disk / "run" / ".hydra" / "config.yaml").exists()  # the run's record of its config stays


def test_a_bad_log_call_keeps_the_log_file(tmp_path, capsys):
    """Only a log file that cannot be written (OSError) is taken away in one line; a callback's bad format
    call is Python's usual report, and the file goes on taking the lines after it."""
    import logging

    from trainer.console import say_once_when_log_files_fail

    root, handler = logging.getLogger(), logging.FileHandler(tmp_path / "trainer.log")
    kept, root.handlers = root.handlers, [handler]  # pytest's own handlers raise on a bad call
    try:
        say_once_when_log_files_fail()
        logging.getLogger("callback").warning("%d examples", "many")  # a TypeError while formatting
        logging.getLogger("callback").warning("the next line")
        assert handler in root.handlers
    finally:
        root.handlers = kept
        handler.close()
    err = capsys.readouterr().err
    assert "--- Logging error ---" in err and "cannot be written" not in err
    assert "the next line" in (tmp_path / "trainer.log").read_text()


# -- 5. a garbled state file, a deleted index --------------------------------------------------


def test_garbled_state_file_and_deleted_index_are_repaired_and_named(tmp_path):
    run_dir = tmp_path / "run"
    run = [*TINY, "trainer.keep_checkpoints=3", "trainer.keep_best=0", "model.hidden_units=[32]",
           f"hydra.run.dir={run_dir}"]
    first = run_cli(*run, "trainer.max_steps=60")
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "checkpoint").write_text("garbage {{{\n")
    (checkpoints / "ckpt-60.index").unlink()

    second = run_cli(*run, "trainer.max_steps=100")
    out = second.stderr + second.stdout
    assert second.returncode == 0, out[-3000:]
    assert f"Checkpoint {checkpoints / 'ckpt-60'} is unreadable (its .index file is missing)" in out
    assert "was unreadable; rebuilt it from the checkpoint files (steps [20, 40])" in out
    assert "Resuming from" in out and "(step 40)" in out
    kept = sorted(int(p.name[5:-6]) for p in checkpoints.glob("ckpt-*.index"))
    assert kept == [60, 80, 100], "keep_checkpoints=3 holds again"


# -- 6. NaN in an in-memory data set -----------------------------------------------------------


def test_nan_pixels_in_an_npz_are_a_data_error_naming_the_file(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.random((128, 28, 28)).astype("float32") * 255
    x[3, 4, :7] = np.nan
    x[5, 0, 0] = np.inf
    y = rng.integers(0, 10, 128).astype("uint8")
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32])
    result = run_cli(*TINY, "data.name=mnist", f"data.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(result, f"{path} (x_train) has 8 NaN or infinite values (of {x.size})")


# -- 8. a batch that does not fit in memory ----------------------------------------------------


@pytest.mark.parametrize(
    "override, expected",
    [  # Each allocation fails at once (31 GB for the batch, 314 GB for the layer): nothing is really allocated.
        pytest.param("data.batch_size=10000000",
                     "out of memory: the batch does not fit in memory (data.batch_size=10000000",
                     marks=pytest.mark.slow),
        ("model.hidden_units=[100000000]", "out of memory: the model or a training step does not fit in memory"),
    ],
)
def test_out_of_memory_names_data_batch_size(tmp_path, override, expected):
    result = run_cli(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(result, expected)


def test_run_folder_lock_nests_in_one_process_and_only_the_chief_holds_it(tmp_path):
    import json

    from trainer.runlock import is_chief_process, run_folder_lock

    with run_folder_lock(tmp_path):  # the CLI's lock, then Trainer.fit's, in one process
        with run_folder_lock(tmp_path):
            pass
        probe = subprocess.run([sys.executable, "-c",
                                "import sys; from trainer.runlock import acquire; acquire(sys.argv[1])", str(tmp_path)],
                               capture_output=True, text=True)
        assert "is in use by another run" in probe.stderr, "the outer lock still holds after the inner one ended"
    cluster = {"worker": ["a:1", "b:2"]}
    assert is_chief_process("multi_worker", json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 0}}))
    assert not is_chief_process("multi_worker",
                                json.dumps({"cluster": cluster, "task": {"type": "worker", "index": 1}}))
    assert not is_chief_process("multi_worker",
                                json.dumps({"cluster": {**cluster, "chief": ["c:3"]},
                                            "task": {"type": "worker", "index": 0}}))
    assert is_chief_process("mirrored", "{}")


@pytest.mark.slow  # a real process signalled twice; the default stage: test_cli.py's SIGTERM to a real process (exit
# 143, saved, resumed) and, in process, test_signals.py's second SIGTERM during the save ("SIGTERM again")
@pytest.mark.parametrize("gap", [0.0, 0.05, 0.3])
def test_repeated_sigterms_during_training_still_save(tmp_path, gap):
    """A supervisor and a process group both signalling (timeout, Kubernetes, Slurm): the second SIGTERM,
    before or during the first one's save, waits for it; the run exits 143 with the step saved."""
    import signal
    import subprocess
    import sys
    import time

    from trainer.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    args = ["trainer.max_steps=100000", "trainer.checkpoint_every=100000", "trainer.log_every=1",
            "trainer.progress_bar=false", "data.batch_size=32", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "trainer", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 20, proc,
               "20 steps trained, none saved")
    proc.send_signal(signal.SIGTERM)
    time.sleep(gap)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    # Before or during the save, the second SIGTERM waits for it (exit 143). Once the save is done and the
    # catcher let go, it ends the process as its default does (-15, which a shell and Kubernetes also report
    # as 143), with nothing left to lose. Which one happens depends on how fast the save was, not on `gap`:
    # what must hold either way is the saved step checked below.
    assert proc.returncode in (143, -signal.SIGTERM), err[-2000:]
    assert "Received SIGTERM at step" in (run_dir / "trainer.log").read_text()
    found = list_checkpoints(run_dir / "checkpoints")
    assert found and found[0][0] >= 20
    resumed = run_cli(*[a if not a.startswith("trainer.max_steps") else f"trainer.max_steps={found[0][0] + 2}"
                        for a in args])
    assert resumed.returncode == 0 and f"step {found[0][0]})" in resumed.stdout + resumed.stderr, resumed.stderr[-2000:]


def test_a_run_folder_named_with_dot_dot_is_locked_once(tmp_path):
    """The CLI's lock and Trainer.fit's are the same folder however it is spelled (hydra.run.dir=a/../b)."""
    (tmp_path / "a").mkdir()
    result = run_cli(*TINY, "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'a' / '..' / 'b'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "b" / "checkpoints").is_dir()


@pytest.mark.parametrize("override", ["trainer.best_mode=foo", "precision.policy=float16", "optimizer.schedule=bogus"])
def test_an_unknown_choice_is_refused_before_any_work(tmp_path, override):
    result = run_cli(*TINY, override, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "is not one of" in result.stdout + result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


# -- tools on damaged run folders (issue #29) ----------------------------------------------------


def _truncate(prefix: Path) -> None:
    for data in prefix.parent.glob(prefix.name + ".data-*"):
        data.write_bytes(data.read_bytes()[:100])


def test_tools_fall_back_from_a_corrupt_newest_checkpoint_and_name_when_none_is_readable(tmp_path, caplog):
    run = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0  # ckpt-20 and ckpt-40
    from trainer.runs import load_trained_model

    # The checkpoint a tool picked as the newest, deleted by a run still training (keep_checkpoints rotation)
    # before it loaded it: the newest left. One the user named is never replaced by another.
    model, _ = load_trained_model(str(run / "checkpoints" / "ckpt-10"), newest_if_gone=True)
    assert "ckpt-10 was deleted while it was being loaded" in caplog.text and "using ckpt-40" in caplog.text
    assert "trainer.init_from" not in caplog.text
    from trainer.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"ckpt-10 does not exist .* Fix: one of \['ckpt-40', 'ckpt-20'\]"):
        load_trained_model(str(run / "checkpoints" / "ckpt-10"))
    _truncate(run / "checkpoints" / "ckpt-40")
    result = run_cli(str(run), "trainer.eval_steps=2", module="trainer.evaluate")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    said = result.stderr + caplog.text  # in this process, the log line goes to pytest's capture
    assert "Using ckpt-20, the newest readable checkpoint: ckpt-40 is unreadable" in said
    assert result.stdout.startswith("ckpt-20 (step 20)")
    _truncate(run / "checkpoints" / "ckpt-20")
    for module, args in [("trainer.evaluate", [str(run)]),
                         ("trainer.export", [str(run), "--out", str(tmp_path / "out")]),
                         ("trainer.predict", [str(run), "--input", str(run), "--out", str(tmp_path / "p.csv")]),
                         ("trainer.doctor", ["--run", str(run)])]:
        assert_user_error(run_cli(*args, module=module), "none of the checkpoints in", "is readable")


def test_a_checkpoint_is_checked_from_its_index_without_reading_its_tensors(tmp_path, caplog):
    """trainer.runs.unreadable read every tensor (a whole large checkpoint, before loading it again); it
    now compares the data files with the extents the index gives, which finds a file short by one byte."""
    import shutil

    import keras
    import tensorflow as tf

    from trainer.checkpoint_index import data_extents
    from trainer.runs import unreadable

    prefix = tf.train.Checkpoint(w=tf.Variable(tf.ones((64, 32))), b=tf.Variable(tf.zeros(32)),
                                 opt=keras.optimizers.Adam()).write(str(tmp_path / "ok" / "ckpt-1"))
    ((data, end),) = data_extents(prefix).items()
    assert end == Path(data).stat().st_size and unreadable(prefix) is None
    cases = {"short": lambda d: Path(d).write_bytes(Path(d).read_bytes()[:-1]),
             "no_data": lambda d: Path(d).unlink(),
             "no_index": lambda d: Path(d.split(".data-")[0] + ".index").unlink(),
             "bad_index": lambda d: Path(d.split(".data-")[0] + ".index").write_bytes(b"not an index" * 10)}
    for name, damage in cases.items():
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        damaged = str(tmp_path / name / "ckpt-1")
        damage(damaged + Path(data).name[len("ckpt-1"):])
        why = unreadable(damaged)
        assert why is not None, name
        if name == "short":
            assert why == f"its data file {Path(data).name} holds {end - 1} bytes, its index needs {end} (cut short)"
    zeroed = tmp_path / "zeroed"  # intact sizes, damaged bytes: found by the checksums when the weights load
    shutil.copytree(tmp_path / "ok", zeroed)
    (zeroed / Path(data).name).write_bytes(bytes(end))
    assert unreadable(str(zeroed / "ckpt-1")) is None
    run = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0  # ckpt-20 and ckpt-40
    newest = next((run / "checkpoints").glob("ckpt-40.data-*"))
    newest.write_bytes(bytes(newest.stat().st_size))
    # Picked as the newest (--checkpoint latest): the newest readable older one, said, as before the cheap check.
    result = run_cli(str(run), "trainer.eval_steps=2", module="trainer.evaluate")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert result.stdout.startswith("ckpt-20 (step 20)")
    said = result.stderr + caplog.text  # in this process, the log line goes to pytest's capture
    assert "ckpt-40 is damaged (" in said and "using ckpt-20, the newest readable one" in said
    # Named by the user: never replaced; the fix names the older readable ones only.
    result = run_cli(str(run), "--checkpoint", "ckpt-40", "trainer.eval_steps=2", module="trainer.evaluate")
    assert_user_error(result, f"{run / 'checkpoints' / 'ckpt-40'} is damaged (",
                      "Fix: --checkpoint with an older one (['ckpt-20'])")


def test_evaluate_and_export_name_the_checkpoint_rotation_made_them_use(tmp_path, monkeypatch, capsys):
    """The newest checkpoint a tool picked, rotated away by a run still training before it was loaded: the
    newest left is used, and the JSON (its name, "checkpoint", "step") and export's line name that one."""
    import json

    import trainer.evaluate as evaluate
    import trainer.export as export
    from trainer.runs import RunCheckpoint, load_run

    run = tmp_path / "run"
    assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0  # ckpt-20 and ckpt-40
    gone = str(run / "checkpoints" / "ckpt-10")

    def picked_then_rotated(*args, **kwargs):
        real = load_run(str(run))
        return RunCheckpoint(real.run, real.cfg, gone, "ckpt-10", latest=True)

    monkeypatch.setattr(evaluate, "load_run", picked_then_rotated)
    assert evaluate.main([str(run), "trainer.eval_steps=2"]) == 0
    record = json.loads((run / "eval" / "ckpt-40.json").read_text())
    assert record["checkpoint"] == str(run / "checkpoints" / "ckpt-40") and record["step"] == 40
    assert not (run / "eval" / "ckpt-10.json").exists()
    monkeypatch.setattr(export, "checkpoint_of", picked_then_rotated)
    assert export.main([str(run), "--out", str(tmp_path / "exported")]) == 0
    assert "(ckpt-40, step 40)" in capsys.readouterr().out


def test_evaluate_on_a_read_only_run_folder_prints_the_figures(tmp_path):
    with tmpfs(tmp_path / "ro", "size=64m") as folder:
        run = folder / "run"
        assert run_cli(*TINY, f"hydra.run.dir={run}").returncode == 0
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)]).returncode == 0
        result = run_cli(str(run), "trainer.eval_steps=2", module="trainer.evaluate")
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert result.stdout.startswith("ckpt-40 (step 40): loss=")
        written = run / "eval" / "ckpt-40.json"
        assert f"not written: {written} cannot be written (Read-only file system)" in result.stdout
        assert "Traceback" not in result.stderr


# -- issue 29: values accepted silently before -------------------------------------------------


def test_a_float32_layer_the_model_lacks_names_its_layers(tmp_path):
    result = run_cli(*TINY, "precision.float32_layers=[LayerNorm]", f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(result, "precision.float32_layers: no layer of class ['LayerNorm'] in model 'mnist_mlp'; "
                              "its layer classes are ['Dense', 'Dropout', 'Flatten', 'InputLayer']")


def test_an_epoch_fraction_under_one_step_is_an_error(tmp_path):
    result = run_cli(*TINY, "trainer.max_steps=null", "trainer.epochs=0.0001", f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(result, "trainer.epochs=0.0001 is 0.0937 of a step (an epoch is 937 steps). "
                              "Fix: at least trainer.epochs=0.00107 (one step)")


def test_a_warmup_longer_than_the_run_is_named(tmp_path):
    result = run_cli(*TINY, "trainer.max_steps=4", "optimizer.warmup_steps=10", f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert ("optimizer.warmup_steps=10 is not shorter than the run (4 steps): the whole run is warmup, and the "
            "learning rate never reaches optimizer.lr=0.001: its last step trains at 0.0004 (40% of it). Fix: fewer "
            "warmup steps (optimizer.warmup_steps=0: none), or a longer run." in out)


def test_a_warmup_as_long_as_the_run_says_it_reaches_the_lr_only_at_the_last_step(caplog):
    """warmup_steps == the run: its last step trains at optimizer.lr exactly (was: "never reaches optimizer.lr=0.0002
    (it ends at 0.0002)"); the decay after it never starts."""
    from omegaconf import OmegaConf

    from trainer.optim import make_schedule

    with caplog.at_level(logging.WARNING, logger="trainer.optim"):
        schedule = make_schedule(OmegaConf.create({"lr": 2e-4, "warmup_steps": 10, "schedule": "cosine"}), 10)
    assert float(schedule(9)) == pytest.approx(2e-4)
    assert ("the whole run is warmup, and the learning rate reaches optimizer.lr=0.0002 only at the run's last step, "
            "and the cosine schedule after the warmup never starts. Fix: fewer warmup steps "
            "(optimizer.warmup_steps=1: a tenth of the run)") in caplog.text


@pytest.mark.parametrize("override", ["trainer.init_from=/nonexistent/ckpt-5", "data.path=/nonexistent/mnist.npz"])
def test_bad_input_found_after_the_data_is_built_leaves_no_run_folder(tmp_path, override):
    run_dir = tmp_path / "run"
    result = run_cli(*TINY, override, f"hydra.run.dir={run_dir}")
    assert_user_error(result, override.split("=")[0])
    assert not run_dir.exists(), "a run folder made by a run that failed on bad input before training"


def test_bad_input_keeps_a_run_folder_that_existed(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(*TINY, "trainer.max_steps=2", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = sorted(p.name for p in run_dir.iterdir())
    result = run_cli(*TINY, "trainer.max_steps=4", "data.path=/nonexistent/mnist.npz", f"hydra.run.dir={run_dir}")
    assert_user_error(result, "data.path=")
    assert sorted(p.name for p in run_dir.iterdir()) == before and (run_dir / "checkpoints" / "ckpt-2.index").exists()


def test_labels_beyond_num_classes_are_named_when_loaded(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (128, 28, 28)).astype("uint8")
    y = rng.integers(0, 10, 128).astype("uint8")
    y[7] = 200
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:32], y_test=y[:32] % 10)
    result = run_cli(*TINY, f"data.path={path}", "data.name=mnist", f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(result, f"{path} (y_train) has labels 0..200 (1 of 128 outside 0..9), but model.num_classes=10. "
                              "Fix: set model.num_classes=201")
    fashion = run_cli(*TINY, "model.num_classes=5", f"hydra.run.dir={tmp_path / 'run'}")
    assert_user_error(fashion, "(y_train) has labels 0..9 (", "but model.num_classes=5")
    assert not (tmp_path / "run").exists()


def test_a_label_the_step_meets_is_named():
    from trainer.cli import _label_out_of_range

    tf_text = "Received a label value of 9 which is outside the valid range of [0, 5).  Label values: 9 0 6"
    assert _label_out_of_range(ValueError(tf_text)).startswith(
        "a training batch holds label 9, but the model has 5 outputs (classes 0..4)")
    assert _label_out_of_range(ValueError("something else")) is None


def test_a_resume_past_an_unparseable_config_record_keeps_it_and_goes_on(tmp_path):
    """An old .hydra/config.yaml that YAML cannot parse crashed the resume (ParserError): it is now said,
    kept as history/config.unreadable-until-step-N.yaml, and the resume goes on with a new record."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    assert run_cli(*TINY, "trainer.max_steps=20", f"hydra.run.dir={run_dir}").returncode == 0
    (run_dir / ".hydra" / "config.yaml").write_text("trainer: {max_steps: [20\n")
    resumed = run_cli(*TINY, "trainer.max_steps=40", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = run_dir / ".hydra" / "history" / "config.unreadable-until-step-20.yaml"
    assert kept.read_text() == "trainer: {max_steps: [20\n"
    assert "cannot be read" in resumed.stdout + resumed.stderr and str(kept) in resumed.stdout + resumed.stderr
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").trainer.max_steps == 40
    assert not (run_dir / ".hydra" / "config.yaml.new").exists()


@pytest.mark.slow
def test_a_resume_that_changes_the_precision_says_so_and_keeps_the_earlier_config(tmp_path):
    """Resuming a float32 run with precision=mixed_bfloat16 changed its precision silently and overwrote
    .hydra/config.yaml: the change is now a warning, and the config of the steps before it is kept. Every way
    between float32 and a mixed policy resumes."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    assert run_cli(*TINY, "trainer.max_steps=20", f"hydra.run.dir={run_dir}").returncode == 0
    # The run is complete at 20: another precision trains nothing, so the record stays the run's (no history file).
    complete = run_cli(*TINY, "trainer.max_steps=20", "precision=mixed_bfloat16", f"hydra.run.dir={run_dir}")
    assert complete.returncode == 0 and not (run_dir / ".hydra" / "history").exists()
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").precision.policy == "float32"
    resumed = run_cli(*TINY, "trainer.max_steps=40", "precision=mixed_bfloat16", f"hydra.run.dir={run_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = [line for line in (resumed.stdout + resumed.stderr).splitlines() if "with a changed config" in line]
    assert len(said) == 1 and "WARNING" in said[0], said
    assert ("precision.policy: 'float32' -> 'mixed_bfloat16'" in said[0]
            and "steps 21- compute in mixed_bfloat16" in said[0])
    kept = run_dir / ".hydra" / "history" / "config.until-step-20.yaml"
    assert str(kept) in said[0]
    assert OmegaConf.load(kept).precision.policy == "float32"
    assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").precision.policy == "mixed_bfloat16"
    longer = run_cli(*TINY, "trainer.max_steps=50", "precision=mixed_bfloat16", f"hydra.run.dir={run_dir}")
    said = [line for line in (longer.stdout + longer.stderr).splitlines() if "with a changed config" in line]
    # a longer run: said, not warned
    assert len(said) == 1 and "INFO" in said[0] and "trainer.max_steps: 40 -> 50" in said[0]
    # and back: the mixed run resumed under float32 (and under float16's loss scaling)
    for steps, precision in ((60, "float32"), (70, "mixed_float16"), (80, "float32")):
        again = run_cli(*TINY, f"trainer.max_steps={steps}", f"precision={precision}", f"hydra.run.dir={run_dir}")
        assert again.returncode == 0, again.stderr[-3000:]
        said = [line for line in (again.stdout + again.stderr).splitlines() if "with a changed config" in line]
        assert len(said) == 1 and f"-> '{precision}'" in said[0], said
        assert f"steps {steps - 9}- compute in {precision}" in said[0]
