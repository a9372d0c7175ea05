"""The Python API without Hydra: custom models, overriding the step, callbacks."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Callback, Trainer


def blobs(n=512, seed=0):
    """Two well-separated Gaussian blobs: any working trainer separates them."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype("int32")
    x = rng.normal(size=(n, 8)).astype("float32") + (y[:, None] * 2.0 - 1.0) * 1.5
    return x, y


class TinyNet(keras.Model):
    """A subclassed model, as researchers write them."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(16, activation="relu")
        self.out = keras.layers.Dense(2, dtype="float32")

    def call(self, x, training=False):
        return self.out(self.hidden(x))


def make_trainer(**kwargs):
    return Trainer(
        model=TinyNet,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.Adam(1e-2),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        progress_bar=False,
        log_every=10,
        **kwargs,
    )


def datasets():
    x, y = blobs()
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(512, seed=1).batch(32, drop_remainder=True)
    xe, ye = blobs(256, seed=1)
    return train, tf.data.Dataset.from_tensor_slices((xe, ye)).batch(64)


def test_fit_trains_custom_model_on_tf_data(tmp_path):
    train, evals = datasets()
    trainer = make_trainer(run_dir=tmp_path)
    logs = trainer.fit(train, evals, steps=60)
    assert logs["split"] == "eval" and logs["accuracy"] > 0.95
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert (tmp_path / "checkpoints" / "ckpt-60.index").exists()
    assert int(trainer.step.numpy()) == 60 and int(trainer.optimizer.iterations.numpy()) == 60


def test_overriding_compute_loss_changes_the_step():
    class NoLearning(Trainer):
        def compute_loss(self, x, y, y_pred, sample_weight=None):
            return tf.reduce_sum(y_pred) * 0.0  # zero gradients

    train, _ = datasets()
    trainer = NoLearning(
        model=TinyNet, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False,
    )
    trainer.build(next(iter(train)))
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    trainer.fit(train, steps=5)
    after = [v.numpy() for v in trainer.model.trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_callbacks_see_every_hook_with_logs():
    events = []

    class Recorder(Callback):
        def on_train_begin(self, trainer):
            events.append(("begin", None))

        def on_log(self, trainer, step, logs):
            events.append(("log", step, logs["split"], "loss" in logs))

        def on_eval_end(self, trainer, step, logs):
            events.append(("eval", step, round(logs["accuracy"], 3) >= 0.0))

        def on_train_end(self, trainer, summary):
            events.append(("end", summary["step"]))

    class StopAt30(Callback):
        def on_loop_end(self, trainer, step):
            if step >= 30:
                trainer.stop_training = True

    train, evals = datasets()
    make_trainer(callbacks=[Recorder(), StopAt30()], eval_every=20).fit(train, evals, steps=100)
    assert events[0] == ("begin", None)
    assert ("log", 10, "train", True) in events and ("log", 30, "train", True) in events
    assert ("eval", 20, True) in events
    assert events[-1] == ("end", 30)  # stop_training honoured after the loop


def test_rejects_unknown_option():
    with pytest.raises(TypeError):
        make_trainer(no_such_option=1)


def test_a_metric_given_by_name_as_in_keras_compile_is_taken_and_an_unknown_name_says_what_to_give():
    """Keras' compile takes metrics=["accuracy"] and picks the accuracy from the shapes; so does the Trainer
    (tests/test_keras_compat.py). A name Keras does not know is a clear error naming the fix, not an
    AttributeError from inside."""
    from trainer.config import ConfigError

    trainer = Trainer(model=TinyNet, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-2), metrics=["accuracy"])
    assert list(trainer.train_metrics) == ["accuracy"]
    with pytest.raises(ConfigError, match=r"'accuracyy' is not a Keras metric name.*SparseCategoricalAccuracy"):
        Trainer(model=TinyNet, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.Adam(1e-2), metrics=["accuracyy"])


def test_example_script_trains_a_custom_model(tmp_path):
    """The example script of docs/recipes/mnist.md: a ~30-line script importing Trainer, a subclassed model, tf.data,
    real data. It runs in this process (tests/cli_runner.py); that `import trainer` first keeps TensorFlow's start-up
    lines (the CUDA probe) off stderr is a fresh process's matter: test_errors.py's probe test."""
    from pathlib import Path

    from cli_runner import run_script

    script = Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"
    result = run_script(script, [tmp_path, "120"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = float(result.stdout.strip().splitlines()[-1].split()[2])
    assert accuracy > 0.6  # 10 classes: chance is 0.1
    assert (tmp_path / "checkpoints" / "ckpt-120.index").exists()


def test_finished_iterators_are_destroyed_off_the_training_thread(monkeypatch):
    """tf.data can block an iterator's destruction until its autotuner wakes (up to the iterator's age):
    the sample iterator, the eval iterator, a kept train iterator that new data replace, and the one a
    freed Trainer held die on a release thread; a fit() call on the same data keeps using its iterator."""
    import gc
    import threading
    import weakref

    import trainer.inputs as inputs
    import trainer.iterator_release as iterator_release
    import trainer.evaluating as evaluating

    died_on = []

    def watched_release(holder, replicas=1):
        for item in holder:
            weakref.finalize(item, lambda: died_on.append(threading.current_thread().name))
        del item  # else this frame, not the thread, would hold the last reference
        iterator_release.release_in_background(holder, replicas)

    monkeypatch.setattr(evaluating, "release_in_background", watched_release)  # the eval iterator
    monkeypatch.setattr(inputs, "release_in_background", watched_release)  # sample and kept iterators
    t = make_trainer()
    train, evaluation = datasets()
    t.fit(train, steps=4)
    kept = t._kept_iterator.iterator
    t.fit(train, steps=6)  # same data: continues with the same iterator
    assert t._kept_iterator.iterator is kept
    del kept
    t.evaluate(evaluation)
    t.fit(train.map(lambda x, y: (x * 2.0, y)), steps=8)  # other data: the kept iterator is let go
    del t
    gc.collect()
    iterator_release._join_releases(timeout=120)
    # The sample iterators of the two data sets, the eval iterator, the replaced one, the freed one.
    assert died_on == ["trainer-release-iterator"] * 5
    assert not iterator_release._releasing


@pytest.mark.slow
def test_process_exits_when_a_freed_trainer_is_collected_at_shutdown():
    """A Trainer freed by the garbage collector during interpreter shutdown (as after Hydra's task
    function) must not start its release thread then: Thread.start() would wait forever."""
    import subprocess
    import sys

    script = (
        "import numpy as np, keras, tensorflow as tf\n"
        "from trainer import Trainer\n"
        "def run():\n"
        "    x = np.random.rand(256, 8).astype('float32'); y = np.random.randint(0, 2, 256).astype('int32')\n"
        "    def build():\n"
        "        i = keras.Input((8,)); return keras.Model(i, keras.layers.Dense(2)(i))\n"
        "    t = Trainer(model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),\n"
        "                optimizer=lambda: keras.optimizers.Adam(1e-3), progress_bar=False)\n"
        "    t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32).repeat().prefetch(tf.data.AUTOTUNE), steps=5)\n"
        "run()\n"
        "print('trained')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained" in done.stdout


def test_a_later_fit_continues_as_one_longer_call(tmp_path):
    """A second fit() keeps what the first trained: no second warm start from trainer.init_from, and a
    callback's stop ends that call only. Same weights as one uninterrupted call."""
    make_trainer(run_dir=tmp_path / "source").fit(datasets()[0], steps=5)

    class StopOnceAt4(Callback):
        def __init__(self):
            self.fired = False

        def on_loop_end(self, trainer, step):
            if step == 4 and not self.fired:
                self.fired, trainer.stop_training = True, True

    one = make_trainer(init_from=str(tmp_path / "source"))
    one.fit(datasets()[0], steps=20)  # a data set object of its own: each new iterator reshuffles
    two, train = make_trainer(init_from=str(tmp_path / "source"), callbacks=[StopOnceAt4()]), datasets()[0]
    two.fit(train, steps=10)
    assert int(two.step.numpy()) == 4
    two.fit(train, steps=20)
    assert int(two.step.numpy()) == 20
    for a, b in zip(one.model.weights, two.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_run_steps_continue_a_fit_as_one_longer_call_with_the_loops_host_work_only(tmp_path):
    """Trainer.run_steps(n, loop=True) after a fit() a callback stopped: it trains its n steps (the stop
    ended that fit() call), through the loop's host work only (the user's callbacks see none of it), and a
    later fit() gives the weights of one uninterrupted call."""
    class StopAt4(Callback):
        def __init__(self):
            self.fired, self.hooks = False, []

        def on_loop_end(self, trainer, step):
            self.hooks.append(("loop_end", step))
            if step == 4 and not self.fired:
                self.fired, trainer.stop_training = True, True

        def on_log(self, trainer, step, logs):
            self.hooks.append(("log", step))

    one = make_trainer()
    one.fit(datasets()[0], steps=20)
    stop = StopAt4()
    two, train = make_trainer(callbacks=[stop], steps_per_loop=2), datasets()[0]
    two.fit(train, steps=10)
    assert int(two.step.numpy()) == 4
    seen = list(stop.hooks)
    assert two.run_steps(6, loop=True) == 6 and int(two.step.numpy()) == 10
    assert stop.hooks == seen  # not the run's callbacks: nothing logged or judged twice
    two.fit(train, steps=20)
    assert int(two.step.numpy()) == 20 and one.weights_fingerprint() == two.weights_fingerprint()


def test_run_steps_count_their_batches_and_refuse_the_loop_with_a_run_folder(tmp_path):
    """run_steps(n) outside the loop still moves the data position a resume skips to (fit(4) + run_steps(6)
    + fit(20): 20 steps' batches read, not 14); run_steps(loop=True) is for a Trainer without a run folder."""
    trainer, train = make_trainer(run_dir=tmp_path / "run"), datasets()[0]
    trainer.fit(train, steps=4)
    with pytest.raises(RuntimeError, match="without a run folder"):
        trainer.run_steps(2, loop=True)
    assert trainer.run_steps(6) == 6
    trainer.fit(train, steps=20)
    record = json.loads((tmp_path / "run" / "checkpoints" / "configured.json").read_text())
    assert (record["step"], record["batches_read"]) == (20, 20)


def test_throughput_windows_leave_out_compile_eval_and_save_time(tmp_path):
    """The first window (only the untimed first loop) logs nan, not 0; a slow evaluation does not
    count against the training steps of the window after it."""
    import time as time_module

    train, evaluation = datasets()
    trainer = make_trainer(run_dir=tmp_path, steps_per_loop=10, eval_every=20, checkpoint_every=20)
    evaluate = trainer.evaluate

    def slow_evaluate(*args, **kwargs):
        time_module.sleep(2.0)  # ~100x a 10-step window of this tiny model
        return evaluate(*args, **kwargs)

    trainer.evaluate = slow_evaluate
    logs = []

    class Record(Callback):
        def on_log(self, trainer, step, row):
            logs.append(row)

    trainer.callbacks.callbacks.append(Record())
    trainer.fit(train, evaluation, steps=60)
    rates = {row["step"]: row["examples_per_sec"] for row in logs}
    assert sorted(rates) == [10, 20, 30, 40, 50, 60] and np.isnan(rates[10])
    # The windows after each eval (steps 21-30 and 41-50): their 10 steps of 32 examples are timed without the
    # evaluation's 2 s (with it, 320 examples would take > 2 s however fast the steps are). Not a speed check:
    # only which time a window counts, so a loaded machine cannot fail it.
    for step in (30, 50):
        assert 10 * 32 / rates[step] < 2.0, (step, rates)
