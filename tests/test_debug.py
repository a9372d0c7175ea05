"""Seeing where time and memory go (trainer.profile_steps, memory in the logs) and the debug modes
(fast_dev_run, overfit_batches, limit_eval_batches): docs/debugging.md."""
import hashlib
import logging
import re
from pathlib import Path

import pytest

from conftest import TINY, blobs, read_metrics, run_cli


def _model():
    import keras

    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)])


def _examples_seen():
    """A metric that counts the examples it was given: how much an evaluation read."""
    import keras

    class ExamplesSeen(keras.metrics.Metric):
        def __init__(self, name="seen", **kwargs):
            super().__init__(name=name, **kwargs)
            self.total = self.add_variable(shape=(), initializer="zeros", name="total")

        def update_state(self, y_true, y_pred, sample_weight=None):
            self.total.assign_add(keras.ops.cast(keras.ops.shape(y_true)[0], "float32"))

        def result(self):
            return self.total

    return ExamplesSeen()


def _trainer(**options):
    import keras

    from trainer import Trainer

    options = {"log_every": 20, "progress_bar": False, "best_metric": None, **options}
    return Trainer(_model, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   lambda: keras.optimizers.Adam(1e-2),
                   metrics={"accuracy": keras.metrics.SparseCategoricalAccuracy(), "seen": _examples_seen}, **options)


def _folder_state(folder: Path):
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _tensorboard_tags(folder: Path) -> set:
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    events = (event_pb2.Event.FromString(r.numpy()) for f in folder.glob("events.out.tfevents.*")
              for r in tf.data.TFRecordDataset(str(f)))
    return {value.tag for event in events for value in event.summary.value}


def test_overfit_batches_drives_the_train_loss_near_zero_where_normal_training_does_not():
    """The same 2 batches (of a set that reshuffles every pass) for 60 steps: the tiny MLP memorizes them;
    on the whole (overlapping) blobs set in the same 60 steps it does not. Evaluation reads those 2 batches."""
    from trainer.callbacks import Callback

    class LastTrainLogs(Callback):
        def on_log(self, trainer, step, logs):
            self.logs = logs

    normal, overfit = LastTrainLogs(), LastTrainLogs()
    _trainer(max_steps=60, callbacks=[normal]).fit(blobs(shuffle=True))
    eval_logs = _trainer(max_steps=60, overfit_batches=2, callbacks=[overfit]).fit(blobs(shuffle=True), blobs())
    assert overfit.logs["loss"] < 0.05 < normal.logs["loss"], (overfit.logs, normal.logs)
    assert eval_logs["loss"] < 0.05 and eval_logs["seen"] == 2 * 16, eval_logs  # the 2 training batches, once


def test_limit_eval_batches_counts_and_fraction():
    """limit_eval_batches=3 evaluates 3 batches (48 examples); 0.25 a quarter of the 16 batches; eval_steps
    set to another value as well is an error naming both keys."""
    import dataclasses

    from trainer.config import ConfigError, TrainerConfig

    t = _trainer(max_steps=2, limit_eval_batches=3)
    assert t.fit(blobs(), blobs())["seen"] == 3 * 16
    t.config = dataclasses.replace(t.config, limit_eval_batches=0.25)
    assert t.evaluate(blobs())["seen"] == 4 * 16
    assert t.evaluate(blobs(), steps=5)["seen"] == 5 * 16  # an explicit count wins
    with pytest.raises(ConfigError, match=r"limit_eval_batches=3\) and Trainer\(eval_steps=5\)"):
        TrainerConfig(limit_eval_batches=3, eval_steps=5)
    with pytest.raises(ConfigError, match="limit_eval_batches=2.5"):
        TrainerConfig(limit_eval_batches=2.5)
    assert TrainerConfig(limit_eval_batches=5, eval_steps=5).eval_steps == 5  # the same value twice is fine


def test_a_limited_evaluation_says_how_many_batches_it_read(caplog):
    """The eval line names the batches read when a limit applies (and when the set ended first); a whole
    eval set keeps the plain line."""
    for limit, said in ((3, "eval @ step 2 (3 batches): loss="),
                        (40, "eval @ step 2 (16 batches of the 40 asked: the eval set ended): loss="),
                        (None, "eval @ step 2: loss=")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="trainer"):
            _trainer(max_steps=2, limit_eval_batches=limit).fit(blobs(), blobs())
        assert said in caplog.text, caplog.text[-2000:]


def test_on_eval_end_sees_this_evaluations_eval_batches():
    """trainer.eval_batches is set before on_eval_end: a callback reads this evaluation's count, not the
    previous evaluation's (5 batches here) nor None."""
    from trainer.callbacks import Callback

    class Seen(Callback):
        seen = []

        def on_eval_end(self, trainer, step, logs):
            self.seen.append(trainer.eval_batches)

    t = _trainer(max_steps=2, limit_eval_batches=3, callbacks=[Seen()])
    t.evaluate(blobs(), steps=5)
    assert t.eval_batches == 5
    t.fit(blobs(), blobs())
    assert Seen.seen == [3] and t.eval_batches == 3


def test_fast_dev_run_trains_two_steps_from_scratch_and_writes_nothing(tmp_path, caplog):
    """Pointed at an existing run: it neither resumes from its checkpoints nor changes a byte of its folder;
    a new run folder is not even created. 2 train steps, 2 eval batches."""
    existing = tmp_path / "existing"
    first = _trainer(max_steps=6, run_dir=existing, checkpoint_every=3)
    first.fit(blobs(), blobs())
    before = _folder_state(existing)
    assert any(name.endswith(".index") for name in before)

    with caplog.at_level(logging.INFO, logger="trainer"):
        dry = _trainer(max_steps=100, run_dir=existing, fast_dev_run=True)
        logs = dry.fit(blobs(), blobs())
    assert int(dry.step.numpy()) == 2 and logs["seen"] == 2 * 16  # from step 0, not the run's step 6
    assert _folder_state(existing) == before
    assert "fast_dev_run: 2 train steps and 2 eval batches from freshly initialized weights" in caplog.text

    fresh = tmp_path / "fresh"
    _trainer(max_steps=100, run_dir=fresh, fast_dev_run=True).fit(blobs())
    assert not fresh.exists()


def test_profile_steps_trace_steps_n_to_m_with_loops_cut_around_them(tmp_path, caplog):
    """steps_per_loop=4: the loops end at 2 (N-1) and 5 (M) as well, so the trace holds steps 3..5; TF writes
    an .xplane.pb under tensorboard/plugins/profile/<time>/, and the log names that folder."""
    from trainer.callbacks import Callback

    class LoopEnds(Callback):
        ends = []

        def on_loop_end(self, trainer, step):
            self.ends.append(step)

    with caplog.at_level(logging.INFO, logger="trainer"):
        t = _trainer(max_steps=8, steps_per_loop=4, log_every=4, run_dir=tmp_path / "run", profile_steps=(3, 5),
                     callbacks=[LoopEnds()])
        t.fit(blobs())
    assert LoopEnds.ends == [2, 4, 5, 8]
    traces = list((tmp_path / "run" / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1, traces
    assert f"Profile of train steps 3..5 written to {traces[0].parent}" in caplog.text

    with caplog.at_level(logging.INFO, logger="trainer"):  # steps the run never reaches: a warning, no trace
        _trainer(max_steps=2, run_dir=tmp_path / "short", profile_steps=(5, 6)).fit(blobs())
    assert "this run ends at step 2, before step 5: no trace" in caplog.text
    assert not (tmp_path / "short" / "tensorboard" / "plugins").exists()


def test_memory_fields_in_train_logs_and_summary(caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        logs = _trainer(max_steps=4, log_every=2).fit(blobs())
    assert 0 < logs["host_rss_mb"] <= logs["host_peak_rss_mb"], logs
    assert re.search(r"step 4/4: loss=\d+\.\d{4}.* \| mem \d+ MiB", caplog.text), caplog.text
    assert re.search(r"Peak memory: host RSS \d+ MiB \(now \d+ MiB\)", caplog.text), caplog.text


@pytest.mark.parametrize("value, expected", [
    ("[5,3]", "profile_steps=[5, 3] must be two steps [N, M] with 1 <= N <= M"),
    ("[0,3]", "profile_steps=[0, 3] is out of range: each element must be >= 1"),
    ("[3]", "profile_steps=[3] must be two steps"),
])
def test_bad_profile_steps_is_a_config_error(value, expected):
    """What the CLI checks before a run folder exists (exit 2): the composed config, as check_config sees it."""
    from hydra import compose, initialize_config_module

    from trainer.assemble import register_configs
    from trainer.config import ConfigError
    from trainer.config_check import check_config

    register_configs()
    with initialize_config_module("trainer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"trainer.profile_steps={value}"])
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    assert expected in str(raised.value)


def test_cli_profile_then_fast_dev_run_over_the_same_run_folder(tmp_path):
    """The CLI: a run with profile_steps=[3,5] (a trace, memory in every log line and metrics.jsonl row);
    then fast_dev_run pointed at that run's folder leaves it exactly as it was, and exits 0."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not o.startswith("trainer.max_steps")]
    profiled = run_cli(*tiny, "trainer.max_steps=10", "trainer.steps_per_loop=4", "trainer.profile_steps=[3,5]",
                       f"hydra.run.dir={run_dir}")
    assert profiled.returncode == 0, profiled.stderr[-3000:]
    log_text = (run_dir / "trainer.log").read_text()
    traces = list((run_dir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and f"written to {traces[0].parent}" in log_text, log_text[-3000:]
    assert re.search(r"step 10/10: loss=\d+\.\d{4}.* \| mem \d+ MiB", log_text), log_text[-3000:]
    train_rows = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert train_rows and all(r["host_peak_rss_mb"] >= r["host_rss_mb"] > 0 for r in train_rows)
    assert {"host_rss_mb", "host_peak_rss_mb"} <= _tensorboard_tags(run_dir / "tensorboard" / "train")
    before = _folder_state(run_dir)

    dry = run_cli(*TINY, "trainer.fast_dev_run=true", f"hydra.run.dir={run_dir}")
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    assert "fast_dev_run: 2 train steps and 2 eval batches" in out and "step 2/2" in out, out[-3000:]
    scratch = re.search(r"run folder: (\S+)", out).group(1)
    assert scratch != str(run_dir) and not Path(scratch).exists()  # a temporary folder, deleted
    assert _folder_state(run_dir) == before


def test_limit_eval_fraction_is_resolved_once_before_training(tmp_path):
    """A fraction of an eval set tf.data cannot count (a filter) is an error before the first step (not at
    the final evaluation, after training, losing the final checkpoint); of a set given as a function of an
    InputContext, it is counted once per fit, not again at each evaluation."""
    import tensorflow as tf

    from trainer.callbacks import Callback
    from trainer.config import ConfigError

    t = _trainer(max_steps=30, run_dir=tmp_path / "run", limit_eval_batches=0.5, checkpoint_every=10)
    with pytest.raises(ConfigError, match=r"limit_eval_batches=0.5: a fraction needs an eval set of known size"):
        t.fit(blobs().repeat(), blobs().filter(lambda x, y: True))
    assert int(t.step.numpy()) == 0 and not list((tmp_path / "run").rglob("ckpt-*"))

    pipelines = []

    def eval_set(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        pipelines.append(ctx)
        return blobs()

    class EvalsSeen(Callback):
        seen = []

        def on_eval_end(self, trainer, step, logs):
            self.seen.append(logs["seen"])

    _trainer(max_steps=6, eval_every=2, limit_eval_batches=0.25, callbacks=[EvalsSeen()]).fit(blobs(), eval_set)
    assert EvalsSeen.seen == [4 * 16] * 3  # steps 2, 4 and 6: a quarter of the 16 batches each
    assert len(pipelines) == 3 + 1  # one per evaluation, and the one count


def test_fast_dev_run_with_rollback_acts_as_stop_and_says_so(tmp_path, caplog):
    """fast_dev_run keeps no checkpoints (no run folder by design): on_divergence=rollback is accepted, said
    to act as stop, and a divergence stops the run (SGD at a huge rate: step 2's loss is far above step 1's)."""
    import keras

    from trainer import Trainer
    from trainer.callbacks import NumericalError

    with caplog.at_level(logging.INFO, logger="trainer"):
        logs = _trainer(run_dir=tmp_path / "run", fast_dev_run=True, on_divergence="rollback").fit(blobs(), blobs())
    assert logs["seen"] == 2 * 16 and not (tmp_path / "run").exists()
    assert "trainer.on_divergence=rollback acts as on_divergence=stop for this run" in caplog.text

    diverging = Trainer(_model, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                        lambda: keras.optimizers.SGD(200.0), run_dir=tmp_path / "run", fast_dev_run=True,
                        on_divergence="rollback", divergence_factor=1.5, steps_per_loop=1, log_every=1,
                        progress_bar=False, best_metric=None)
    with pytest.raises(NumericalError, match="Stopping at step 2: .* training diverged"):
        diverging.fit(blobs())


def test_overfit_batches_an_epoch_is_those_batches():
    """As Lightning counts it: epochs=1 with overfit_batches=2 trains 2 steps (not the 16 of the whole set);
    epochs=3, 6."""
    t = _trainer(overfit_batches=2, epochs=1)
    t.fit(blobs())
    assert int(t.step.numpy()) == 2 and t.steps_per_epoch == 2
    t = _trainer(overfit_batches=2)
    t.fit(blobs(), epochs=3)
    assert int(t.step.numpy()) == 6


def test_fast_dev_run_takes_lightnings_number_of_batches(tmp_path, caplog):
    """fast_dev_run=N (Lightning's whole number) trains N steps and evaluates N batches, where it used to be
    taken for true (2 steps, silently); a value neither true/false nor a whole number >= 0 is a ConfigError
    naming the fix, from Python and from the CLI (exit 2, no traceback, no run folder)."""
    from trainer.config import ConfigError

    with caplog.at_level(logging.INFO, logger="trainer"):
        dry = _trainer(max_steps=100, run_dir=tmp_path / "py", fast_dev_run=5)
        logs = dry.fit(blobs(), blobs())
    assert int(dry.step.numpy()) == 5 and logs["seen"] == 5 * 16
    assert "fast_dev_run: 5 train steps and 5 eval batches" in caplog.text and not (tmp_path / "py").exists()
    for bad in (2.5, -1, "yes", None):
        with pytest.raises(ConfigError, match=r"^Trainer\(fast_dev_run=.*Fix: "):
            _trainer(fast_dev_run=bad)

    tiny = [o for o in TINY if not o.startswith("trainer.eval_steps")]
    dry = run_cli(*tiny, "trainer.fast_dev_run=3", f"hydra.run.dir={tmp_path / 'cli'}")
    out = dry.stdout + dry.stderr
    assert dry.returncode == 0, out[-3000:]
    assert "fast_dev_run: 3 train steps and 3 eval batches" in out and "step 3/3" in out, out[-3000:]
    assert not (tmp_path / "cli").exists()
    bad = run_cli(*TINY, "trainer.fast_dev_run=2.5", f"hydra.run.dir={tmp_path / 'bad'}")
    out = bad.stdout + bad.stderr
    assert bad.returncode == 2, out[-3000:]
    assert "trainer.fast_dev_run=2.5 is neither true/false nor a whole number of batches" in out
    assert "Traceback" not in out and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("bad", ["-1", "-0.5", "1.5"])
def test_a_negative_fast_dev_run_is_the_same_clear_one_line_error_as_other_bad_values(tmp_path, bad):
    """fast_dev_run=-1 was "out of range: must be >= 0. Fix: set trainer.fast_dev_run to a value >= 0", where 1.5
    got what the setting takes: now every bad value gets that line (exit 2, no traceback, no run folder)."""
    from trainer.config import ConfigError

    result = run_cli(*TINY, f"trainer.fast_dev_run={bad}", f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    said = [line for line in out.splitlines() if "fast_dev_run" in line]
    assert len(said) == 1 and f"trainer.fast_dev_run={bad} is neither true/false nor a whole number" in said[0], out
    assert "e.g. trainer.fast_dev_run=5" in said[0] and "out of range" not in out
    assert "Traceback" not in out and not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="is neither true/false nor a whole number of batches"):
        _trainer(fast_dev_run=float(bad) if "." in bad else int(bad))
