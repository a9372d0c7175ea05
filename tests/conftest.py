"""Shared helpers: run the real CLI on tiny settings, read what a run wrote."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cli_runner import run_module

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow's usage reports: none from tests or their processes

# Shrinking overrides for the real config: a few steps, small batches, no progress bar.
TINY = [
    "trainer.max_steps=40",
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.eval_steps=10",
    "trainer.checkpoint_every=20",
    "trainer.progress_bar=false",
    "data.batch_size=64",
]


def run_cli(*args: str, module: str = "trainer", cwd: Path | None = None, timeout: int = 900, env=None,
            process: bool = False):
    """`python -m trainer ARGS` (or another module): its CompletedProcess. It runs in this process unless
    the command needs its own or `process=True` asks for one (tests/cli_runner.py says when)."""
    return run_module(module, args, cwd=cwd, timeout=timeout, env=env, process=process)


# Appended to a test's script that trained under MirroredStrategy, after it printed what the test reads: the exit
# frees the script's tf.data iterators (trainer/iterator_release.py's exit hook), each waiting for its autotuner's next
# wake-up, up to the iterator's age, one after another. The own-apply script of test_distribute.py
# (11 s of CPU) idled 10-40 s there in trials, and the test took 160 s in a CI run. That exit path is tested where
# it is the point:
# test_api.py::test_process_exits_when_a_freed_trainer_is_collected_at_shutdown,
# test_distribute.py::test_a_trainer_alive_at_exit_has_its_iterator_freed_by_the_exit_hook_and_the_wait_said, and
# test_distribute.py::test_a_finished_script_exits_0_with_iterators_still_being_freed (slow stage).
SKIP_TEARDOWN = "\nimport os as _os, sys as _sys\n_sys.stdout.flush(); _sys.stderr.flush()\n_os._exit(0)\n"


# A process waited on: an event (a file, a log line) ends the wait, not a clock. The limit is far above any
# expected time (a loaded 2-core machine takes several times an idle one's); it only stops a hung test.
WAIT_LIMIT_S = 1200


def wait_until(condition, proc, what: str, poll: float = 0.05) -> None:
    """Polls `condition()` until it holds; fails at once, with the process's output, if `proc` ended first."""
    import time

    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        if proc.poll() is not None:
            out = proc.stderr.read()[-3000:] if getattr(proc, "stderr", None) else ""
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}\n{out}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {WAIT_LIMIT_S} s")
        time.sleep(poll)


def blobs(n: int = 256, features: int = 4, batch: int = 16, shuffle: bool = False):
    """Two Gaussian blobs as a batched tf.data.Dataset: a tiny, learnable, seeded classification set."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n).astype("int32")
    x = rng.normal(size=(n, features)).astype("float32") + y[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(n, seed=0)
    return ds.batch(batch, drop_remainder=True)


def tiny_classifier(callbacks=(), optimizer=None, **options):
    """A Trainer of a 4-feature, 2-class Dense model on `blobs()`, evaluating, logging and saving every 5 steps, quiet;
    `options` override those (run_dir, eval_every, best_metric, ...)."""
    import keras

    from trainer import Trainer

    defaults = dict(log_every=5, eval_every=5, checkpoint_every=5, progress_bar=False, tensorboard=False, verbose=False)
    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=optimizer or (lambda: keras.optimizers.SGD(0.05)),
                   metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                   callbacks=list(callbacks), **{**defaults, **options})


def read_metrics(run_dir: Path):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny():
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A Hugging Face-format BERT folder with the packaged MiniLM's vocabulary and a tiny architecture (2
    layers of 32 units, no weights: pretrained=False); read only, so one per worker serves every test."""
    import shutil

    pytest.importorskip("keras_hub")
    from trainer.recipes import transformer

    minilm = transformer.packaged_preset_dir(transformer.DEFAULT_PRESET)
    folder = tmp_path_factory.mktemp("tiny_bert")
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(minilm / name, folder / name)
    config = json.loads((minilm / "config.json").read_text())
    config.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=64)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(autouse=True)
def _slow_tests_keep_real_processes(request):
    import cli_runner

    cli_runner.ALWAYS_PROCESS["on"] = request.node.get_closest_marker("slow") is not None
    yield
    cli_runner.ALWAYS_PROCESS["on"] = False


@pytest.fixture(autouse=True)
def _trainer_logger_as_in_a_fresh_process():
    """The `trainer` logger as a new process has it after each test: the level and handler a verbose Trainer set
    (console.show_logs_unless_configured) would otherwise outlive it, and a later quiet Trainer undoing that level
    undid caplog.at_level(logger="trainer")'s too: its INFO lines were lost, depending on the test order."""
    yield
    import logging

    package = logging.getLogger("trainer")
    for handler in [h for h in package.handlers if type(h).__name__ == "_StderrHandler"]:
        package.removeHandler(handler)
    package.setLevel(logging.NOTSET)
    package._trainer_set_level = False


_frozen_in = {"module": None}  # the test module whose tests' survivors gc.freeze() last set aside


@pytest.fixture(autouse=True)
def _fresh_keras_session(request):
    """Each test starts from a fresh Keras/TF graph state, the float32 policy and TensorFlow's process-wide
    switches off: without this, graphs and names pile up over the suite (a model conversion took 37 s after
    20 tests instead of 4 s alone), and a deterministic=True test made later tests' numbers differ."""
    yield
    import gc

    # here, not at the top: TF_CPP_MIN_LOG_LEVEL must be set before TensorFlow loads
    from cli_runner import reset_process_state

    # What survives the full collection below (TensorFlow's and the other libraries' half a million module
    # objects, caches, fixtures) is set aside (gc.freeze): the next test's collections scan only the objects
    # made since, milliseconds instead of 0.2-0.7 s a test. A frozen object is still freed when its last
    # reference goes, but a cycle of frozen objects is never collected: so the first test of each module
    # unfreezes first, and the previous module's fixtures (Keras models are cycles) are collected then.
    # A test's own objects are never frozen during it: gc.collect() in a test collects them as before.
    if _frozen_in["module"] is not request.module:
        gc.unfreeze()
        _frozen_in["module"] = request.module
    reset_process_state(free_memory=True)
    gc.freeze()


# The default stage's guard: a test outside the `slow` stage that takes longer than this (its fixtures'
# set-up included) is named at the end of the run, so the stage stays within ten minutes on two cores.
DEFAULT_STAGE_LIMIT_S = 30.0
_overlong: dict = {}


def pytest_runtest_logreport(report):
    if "slow" not in report.keywords:
        _overlong[report.nodeid] = _overlong.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = sorted(((t, n) for n, t in _overlong.items() if t > DEFAULT_STAGE_LIMIT_S), reverse=True)
    if over:
        terminalreporter.section(f"tests outside the slow stage over {DEFAULT_STAGE_LIMIT_S:.0f} s "
                                 "(mark them @pytest.mark.slow or make them cheaper)")
        for seconds, nodeid in over:
            terminalreporter.write_line(f"{seconds:7.1f}s {nodeid}")
