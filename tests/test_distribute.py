"""tf.distribute strategies, XLA and steps_per_loop: same results however the steps are run."""
import json
import os
import re
import signal
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import SKIP_TEARDOWN, blobs, read_metrics, run_cli, wait_until
from trainer import Trainer

COMMON = [
    "trainer.max_steps=20", "trainer.log_every=10", "trainer.checkpoint_every=20", "trainer.eval_every=0",
    "trainer.eval_steps=5", "trainer.progress_bar=false", "model.dropout=0", "data.batch_size=64",
]


def model_tensors(prefix):
    """The model and optimizer-slot tensors of a checkpoint (by key), skipping bookkeeping."""
    reader = tf.train.load_checkpoint(str(prefix))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if k.startswith("optimizer/")}


@pytest.mark.slow  # over 30 s on 2 cores: CI runs it in the slow stage
def test_mirrored_two_replicas_match_one_device(tmp_path):
    """20 float32 steps on 2 logical CPUs (with and without XLA, and stopped at 10 then resumed) == the
    default strategy, same global batch."""
    mirrored = ["strategy=mirrored", "strategy.logical_cpus=2"]
    runs = {"default": [], "mirrored": mirrored, "mirrored_xla": [*mirrored, "trainer.jit_compile=true"]}
    tensors, losses = {}, {}
    for name, extra in runs.items():
        run_dir = tmp_path / name
        result = run_cli(*COMMON, *extra, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
        if name != "default":
            assert "2 replicas" in result.stdout + result.stderr
            # The CLI frees its Trainer and ends at once: no wait for the teardown of an iterator over 2 replicas,
            # nor the advice to `del trainer` (a Trainer the CLI held until exit), which its user cannot act on.
            assert "Waiting for tf.data" not in result.stderr, result.stderr[-3000:]
        tensors[name] = model_tensors(run_dir / "checkpoints" / "ckpt-20")
        losses[name] = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    # Stopped at step 10 and resumed: the data must go on at step 10's batches on each replica.
    run_dir, first_half = tmp_path / "mirrored_resumed", [a if a != "trainer.max_steps=20" else "trainer.max_steps=10"
                                                          for a in COMMON]
    for args in (first_half, COMMON):
        result = run_cli(*args, *mirrored, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from" in result.stdout + result.stderr
    tensors["mirrored_resumed"] = model_tensors(run_dir / "checkpoints" / "ckpt-20")
    for name in ("mirrored", "mirrored_xla", "mirrored_resumed"):
        assert tensors[name].keys() == tensors["default"].keys()
        for key, value in tensors["default"].items():
            np.testing.assert_allclose(tensors[name][key], value, rtol=1e-4, atol=1e-6, err_msg=f"{name}: {key}")
        if name in losses:
            np.testing.assert_allclose(losses[name], losses["default"], rtol=1e-4)


@pytest.mark.slow
def test_batch_must_divide_over_replicas(tmp_path):
    result = run_cli(*COMMON, "strategy=mirrored", "strategy.logical_cpus=2", "data.batch_size=63",
                     f"hydra.run.dir={tmp_path / 'r'}")
    assert result.returncode == 2
    assert "not divisible by the 2 replicas" in result.stdout + result.stderr


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_two_processes_on_loopback(tmp_path):
    """MultiWorkerMirroredStrategy, 2 worker processes: identical final weights, one set of outputs."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "trainer", "strategy=multi_worker", "trainer.max_steps=30", "trainer.log_every=10",
        "trainer.checkpoint_every=15", "trainer.eval_every=0", "trainer.progress_bar=false", "data.batch_size=64",
        f"hydra.run.dir={run_dir}",
    ]
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        outputs.append(out + err)
        assert p.returncode == 0, (out + err)[-3000:]
    fingerprints = [re.search(r"Weights fingerprint: (\w+)", o).group(1) for o in outputs]
    assert fingerprints[0] == fingerprints[1]
    rows = read_metrics(run_dir)
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == [10, 20, 30]  # written once, by the chief
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == ["ckpt-15.index", "ckpt-30.index"]
    assert (run_dir / "trainer.worker1.log").exists()


def _launch_two_workers(run_dir, log_dir, overrides):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = [
        sys.executable, "-m", "trainer", "strategy=multi_worker", "trainer.eval_every=0", "trainer.progress_bar=false",
        "data.batch_size=64", f"hydra.run.dir={run_dir}", *overrides,
    ]
    procs, logs = [], []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        logs.append(log_dir / f"worker{index}.{len(list(log_dir.glob('*.out')))}.out")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, text=True))
    return procs, logs


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "start-up"])
def test_multi_worker_sigterm_to_one_worker_saves_on_all_and_resumes(tmp_path, when):
    """SIGTERM to the non-chief worker only, while training or while starting (the strategy exists, the
    preemption handler does not yet; the coordination service's own handler used to swallow it): both
    workers save the same step and exit 143; the same commands resume from that step on both and finish."""
    run_dir = tmp_path / "run"
    common = ["trainer.max_steps=600", "trainer.log_every=20", "trainer.checkpoint_every=0"]
    procs, logs = _launch_two_workers(run_dir, tmp_path, common)
    sign = "First loop" if when == "training" else "Hardware:"  # logged once the start-up deferral is on
    try:
        wait_until(lambda: sign in logs[1].read_text(), procs[1], f"worker 1 logged {sign!r}")
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    outputs = [log.read_text() for log in logs]
    assert codes == [143, 143], [o[-3000:] for o in outputs]
    saved = [int(re.search(r"every worker saved step (\d+)", o).group(1)) for o in outputs]
    assert saved[0] == saved[1] < 600
    step = saved[0]
    if when == "start-up":
        assert ("SIGTERM during start-up" in outputs[1]
                and "First loop" not in outputs[1].split("SIGTERM during start-up")[0])
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == [f"ckpt-{step}.index"]

    procs, logs = _launch_two_workers(run_dir, tmp_path, common)
    codes = [p.wait(timeout=300) for p in procs]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [o[-3000:] for o in outputs]
    for o in outputs:
        assert f"(step {step})" in o and "Resuming from" in o
    fingerprints = [re.search(r"Weights fingerprint: (\w+)", o).group(1) for o in outputs]
    assert fingerprints[0] == fingerprints[1]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt-*.index")) == sorted(
        [f"ckpt-{step}.index", "ckpt-600.index"]
    )


@pytest.mark.slow
def test_multi_worker_needs_tf_config(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "strategy=multi_worker", f"hydra.run.dir={tmp_path / 'r'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2 and "TF_CONFIG" in result.stdout + result.stderr


@pytest.mark.slow
def test_tpu_without_a_tpu_fails_fast(tmp_path):
    for extra in ([], ["strategy.tpu=grpc://127.0.0.1:1"]):
        result = run_cli("strategy=tpu", *extra, f"hydra.run.dir={tmp_path / 'r'}", timeout=120)
        assert result.returncode == 2
        assert "strategy=tpu" in result.stdout + result.stderr


@pytest.mark.parametrize("jit_compile, steps_per_loop, whole_step",
                         [(True, 1, None), (False, 5, None), (True, 7, False)])
def test_xla_and_steps_per_loop_give_the_same_losses(jit_compile, steps_per_loop, whole_step):
    """Against the reference (no XLA, one step per call): same logged losses and weights, with the
    update compiled into the XLA step (auto for this small model) or run outside it."""

    def train(jit, k, whole_step=None):
        trainer = Trainer(
            model=lambda: keras.Sequential([keras.Input((16,)), keras.layers.Dense(32, activation="relu"),
                                            keras.layers.Dense(2, dtype="float32")]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.Adam(1e-2),
            progress_bar=False, log_every=10, jit_compile=jit, steps_per_loop=k, seed=1, xla_whole_step=whole_step,
        )
        losses = []

        class Record(__import__("trainer").Callback):
            def on_log(self, t, step, logs):
                losses.append((step, logs["loss"]))

        trainer.callbacks.callbacks.append(Record())
        trainer.fit(blobs(512, 16, 32, shuffle=True), steps=33)  # a final partial loop when k does not divide 33
        return losses, [v.numpy() for v in trainer.model.weights], trainer

    ref_losses, ref_weights, _ = train(False, 1)
    losses, weights, trainer = train(jit_compile, steps_per_loop, whole_step)
    if jit_compile:
        assert trainer.plan_xla().whole_step == (whole_step is None)
    assert [s for s, _ in losses] == [s for s, _ in ref_losses] == [10, 20, 30, 33]
    np.testing.assert_allclose([l for _, l in losses], [l for _, l in ref_losses], rtol=1e-4)
    for a, b in zip(weights, ref_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert trainer.traces["train"] == 1  # partial loops reuse the same trace (num_steps is a tensor)


def test_xla_whole_step_auto_keeps_large_variables_updates_outside_xla_on_a_cpu():
    """Auto: the update joins the XLA step unless the variables average >= 1M parameters (on a CPU),
    and never with gradient accumulation or several replicas (test_mirrored_two_replicas_match_one_device
    runs that layout)."""

    def trainer(units, **options):
        t = Trainer(
            model=lambda: keras.Sequential([keras.Input((1024,)), keras.layers.Dense(units)]),
            loss=keras.losses.MeanSquaredError(), optimizer=lambda: keras.optimizers.Adam(1e-3),
            progress_bar=False, jit_compile=True, **options,
        )
        t.build((tf.zeros((2, 1024)), tf.zeros((2, units))))
        return t

    assert trainer(64).plan_xla().whole_step is True  # 32k parameters per variable
    assert trainer(2048).plan_xla().whole_step is False  # a 2M kernel and its bias: 1M on average
    assert trainer(2048, xla_whole_step=True).plan_xla().whole_step is True
    assert trainer(64, xla_whole_step=False).plan_xla().whole_step is False
    assert trainer(64, grad_accum_steps=2).plan_xla().whole_step is False


_SIGTERM_PROBE = """
import json, os, signal, sys, time
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["127.0.0.1:%d"]}, "task": {"type": "worker", "index": 0}})
import keras, numpy as np, tensorflow as tf
from trainer import Trainer
strategy = tf.distribute.MultiWorkerMirroredStrategy()  # its coordination service installs a SIGTERM handler
trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=lambda: keras.optimizers.SGD(0.1), strategy=strategy, run_dir=sys.argv[2],
                  progress_bar=False, tensorboard=False)
if sys.argv[1] == "after_fit":
    before = signal.getsignal(signal.SIGTERM)
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    trainer.fit(tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int32"))).batch(8).repeat(), steps=2)
    assert signal.getsignal(signal.SIGTERM) is before, "TF's preemption handler outlived fit()"
print("signalling", flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(20)
print("SIGTERM was swallowed", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["after_init", "after_fit"])
def test_sigterm_is_not_swallowed_around_a_multi_worker_fit(tmp_path, when):
    """Library use, one-worker cluster: after Trainer() (which takes SIGTERM back from the coordination
    service) and after fit() (which puts back the handler TF's preemption handler replaced), SIGTERM
    does what it did before TensorFlow: it ends the process."""
    result = subprocess.run([sys.executable, "-c", _SIGTERM_PROBE % _free_ports(1)[0], when, str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGTERM, (result.stdout + result.stderr)[-3000:]
    assert "signalling" in result.stdout and "swallowed" not in result.stdout


READY_MADE = """
import keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
net = lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(2, dtype="float32")])
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
s = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
t = Trainer(model=net, loss=loss, optimizer=lambda: keras.optimizers.Adam(1e-3), strategy=s, jit_compile=True,
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")], progress_bar=False)
print("FIT", t.fit(ds, steps=4)["step"])
by_dict = Trainer(model=net, loss=loss, optimizer=lambda: keras.optimizers.Adam(1e-3), progress_bar=False,
                  strategy={"name": "mirrored", "logical_cpus": 2})  # docs/concepts/distribution.md's (slow) block
print("REPLICAS", by_dict.strategy.num_replicas_in_sync)
try:
    t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(33), steps=6)
except Exception as e:
    print("ERROR", type(e).__name__, e)
for kwargs in [dict(precision="mixed_bfloat16"), dict(strategy=s)]:
    try:
        Trainer(model=net(), loss=loss, optimizer=lambda: keras.optimizers.Adam(1e-3), progress_bar=False, **kwargs)
    except Exception as e:
        print("ERROR", type(e).__name__, e)
    keras.mixed_precision.set_dtype_policy("float32")
"""


@pytest.mark.slow
def test_ready_made_metrics_models_and_strategies(tmp_path):
    """Ready-made metrics are remade under the strategy (they crashed under Mirrored + XLA); a ready-made
    model that cannot honour the precision or the strategy, or a tf.data batch that does not split over
    the replicas, is a clear error, not a silent float32, unmirrored or misweighted run. A strategy given as a
    dict of StrategyConfig's fields makes its replicas."""
    script = tmp_path / "ready_made.py"
    script.write_text(READY_MADE + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("FIT", "ERROR"))]
    assert lines[0] == "FIT 4" and "REPLICAS 2" in result.stdout  # Trainer(strategy={"name": "mirrored", ...})
    assert lines[1].startswith("ERROR DataError The training batches (33 examples) do not split "
                               "evenly over the 2 replicas")
    assert lines[2].startswith("ERROR PrecisionError The model was built before the Trainer set "
                               "precision 'mixed_bfloat16'")
    assert lines[3].startswith("ERROR StrategyError The model's variables were created outside the strategy's scope")


LOSS_OBJECTS = """
import json, sys, keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
x = np.random.default_rng(0).normal(size=(128, 8)).astype("float32"); y = (x[:, :1] > 0).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
bce = keras.losses.BinaryCrossentropy(from_logits=True)
forms = {"object": bce,
         "function": lambda y, p: tf.reduce_mean(keras.losses.binary_crossentropy(y, p, from_logits=True)),
         # TensorFlow's distributed tutorial: the replica's share of the global mean, with or without the global batch
         "cal": lambda y, p: tf.nn.compute_average_loss(keras.losses.binary_crossentropy(y, p, from_logits=True),
                                                        global_batch_size=32),
         "cal_auto": lambda y, p: tf.nn.compute_average_loss(keras.losses.binary_crossentropy(y, p, from_logits=True))}

class OwnStep(Trainer):
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.form(y, self.model(x, training=True))
        self.update(loss, tape)
        return {"d_loss": loss}

    def test_step(self, data):
        return {"d_loss": self.form(data[1], self.model(data[0], training=False))}

class OwnComputeLoss(Trainer):  # its body returns this replica's share of the global mean: Keras' division
    def compute_loss(self, x, y, y_pred, sample_weight=None):
        return bce(y, y_pred)

    def train_step(self, data):
        loss, grads = self.compute_gradients(data)  # in an overridden step: of the replica's batch mean
        self.apply_gradients(grads, loss)
        return {"d_loss": loss}

class BatchMeanUpdate(Trainer):  # self.update(self.compute_loss(...)): the replica's batch mean
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self.model(x, training=True))
        self.update(loss, tape)
        return {"d_loss": loss}

class ApplyGradients(Trainer):  # tape.gradient(self.compute_loss(...)) then self.apply_gradients: averaged
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self.model(x, training=True))
        self.apply_gradients(tape.gradient(loss, self.model.trainable_variables), loss)
        return {"d_loss": loss}

class OptimizerApply(Trainer):  # Keras' habit, the optimizer's own apply_gradients (warned): averaged too
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self.model(x, training=True))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.model.trainable_variables),
                                           self.model.trainable_variables))
        return {"d_loss": loss}

class PenaltySum(Trainer):  # a loss plus a penalty: compute_loss's and the function form's give one update
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            penalty = 0.05 * tf.reduce_sum(tf.square(self.model.layers[0].kernel))
            y_pred = self.model(x, training=True)
            loss = (self.compute_loss(x, y, y_pred) if self.form is None else self.form(y, y_pred)) + penalty
        self.update(loss, tape)
        return {"d_loss": loss}

class GradStep(Trainer):
    def train_step(self, data):
        loss, grads = self.compute_gradients(data)
        self.apply_gradients(grads, loss)
        return {"d_loss": loss}

class LossMixin:
    def compute_loss(self, x, y, y_pred, sample_weight=None):
        return bce(y, y_pred)

class MixinStep(LossMixin, GradStep):  # a compute_loss from a mixin keeps Keras' convention too
    pass

out = {}
strategies = {1: tf.distribute.OneDeviceStrategy("/cpu:0"), 2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
NAMES = ("object", "function", "compute_loss", "default", "batch_mean_update", "mixin", "instance",
         "apply_gradients", "optimizer_apply", "compute_loss_sum", "function_sum", "cal", "cal_auto")
if sys.argv[1] == "full":
    runs = [(replicas, name) for replicas in (1, 2) for name in NAMES]
else:  # the 2-replica runs of the steps the loss convention changes, against the 1-replica references (the default
    # step and the optimizer's own apply_gradients on 2 replicas: the own-apply test below, test_several_batches.py)
    runs = [(1, "function"), (1, "function_sum")] + [(2, name) for name in (
        "object", "compute_loss_sum", "apply_gradients", "instance", "cal", "cal_auto")]
for replicas, name in runs:
    strategy = strategies[replicas]
    cls = {"compute_loss": OwnComputeLoss, "default": Trainer, "batch_mean_update": BatchMeanUpdate, "mixin": MixinStep,
           "instance": GradStep, "apply_gradients": ApplyGradients, "optimizer_apply": OptimizerApply,
           "compute_loss_sum": PenaltySum, "function_sum": PenaltySum}.get(name, OwnStep)
    t = cls(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)]),
            loss=bce if cls is not OwnStep else None, optimizer=lambda: keras.optimizers.SGD(0.5), strategy=strategy,
            progress_bar=False, log_every=1)
    t.form = forms.get(name.replace("_sum", ""))
    if name == "instance":  # a compute_loss assigned to the Trainer: as a class's
        t.compute_loss = lambda x, y, y_pred, sample_weight=None: bce(y, y_pred)
    logs = t.fit(ds, steps=3)
    evaluated = t.evaluate(ds) if cls is OwnStep else {}
    out[f"{name}/{replicas}"] = dict(weights=[w.numpy().tolist() for w in t.model.weights],
                                     loss=logs.get("d_loss", logs.get("loss")), eval=evaluated.get("d_loss"))

# Outside our steps, in the same process, Keras' behaviour is unchanged: a bare Loss call divides, and model.fit
# on 2 replicas (which sums the gradients) gives the weights of model.fit on 1.
ms = strategies[2]
bare = tf.function(lambda: ms.run(lambda: bce(tf.ones((4, 1)), tf.zeros((4, 1)))))
out["bare_loss_call/2"] = float(ms.experimental_local_results(bare())[0])
init = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]).get_weights()
for replicas, strategy in strategies.items() if sys.argv[1] == "full" else ():
    with strategy.scope():
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)])
        m.set_weights(init)
        m.compile(keras.optimizers.SGD(0.5), bce)
    m.fit(ds, epochs=1, verbose=0)
    out[f"keras_fit/{replicas}"] = [w.tolist() for w in m.get_weights()]

class KerasRandom(Trainer):  # unseeded keras.random in a replicated step: TensorFlow's UnliftableError names nothing
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = forms["function"](y, self.model(x + keras.random.uniform(tf.shape(x)), training=True))
        self.update(loss, tape)

try:
    KerasRandom(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(1)]), loss=None,
                optimizer=lambda: keras.optimizers.SGD(0.5), strategy=ms, progress_bar=False).fit(ds, steps=1)
except ValueError as error:
    out["keras_random_error"] = str(error)
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_a_keras_loss_object_in_an_overridden_step_gives_the_update_of_its_function_form_on_two_replicas(tmp_path):
    """The 2-replica runs of the steps the loss convention changes (the full matrix: the slow twin below)."""
    check_loss_objects(tmp_path, "quick")


@pytest.mark.slow
def test_every_loss_form_and_step_gives_one_update_on_one_and_two_replicas(tmp_path):
    check_loss_objects(tmp_path, "full")


def check_loss_objects(tmp_path, runs: str):
    """Keras divides a Loss object's value by the replicas (its trainer sums gradients); self.update averages
    them itself, so 2 replicas halved the update and the logged loss. Now the object and the function form give
    the same weights and logs on 1 and 2 replicas; so does tf.nn.compute_average_loss (TensorFlow's tutorial,
    which divides by the replicas too). In an overridden step self.compute_loss (the Step's, or one of the
    class, a mixin or the instance) returns the replica's batch mean, so self.compute_loss(...) + a penalty gives the
    update of the function form + the penalty on 1 and 2 replicas (it gave 1/replicas of the loss part, silently);
    compute_gradients, self.apply_gradients and the optimizer's own apply_gradients there average over replicas
    (the last left each replica's copy of the weights on its own); the default step still gives the mean's update.
    Keras' own fit and a bare Loss call in the same process still divide. Unseeded keras.random in the step is an
    error naming the fix."""
    script = tmp_path / "loss_objects.py"
    script.write_text(LOSS_OBJECTS + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script), runs], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT "):])
    # the Python API's line
    assert "Strategy: MirroredStrategy over" in result.stderr and "(2 replicas)" in result.stderr
    bare = out.pop("bare_loss_call/2")
    np.testing.assert_allclose(bare, np.log(2) / 2, rtol=1e-5)  # Keras' division, outside our steps
    if runs == "full":
        keras_fit = [out.pop(f"keras_fit/{r}") for r in (1, 2)]
        for got, want in zip(keras_fit[1], keras_fit[0]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    error = out.pop("keras_random_error", "no error")
    assert "keras.random.* call without a seed in the step" in error and "Fix: draw from self.rng" in error
    sums = {key: out.pop(key) for key in list(out) if "_sum/" in key}
    # its own loss (a penalty added): compute_loss's == the function form's, 2 replicas == 1
    for name, run in sums.items():
        for got, want in zip(run["weights"], sums["function_sum/1"]["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(run["loss"], sums["function_sum/1"]["loss"], rtol=1e-5, err_msg=name)
    assert sums["function_sum/1"]["weights"] != out["function/1"]["weights"]  # the penalty counts
    assert len(out) == (22 if runs == "full" else 6)
    reference = out["function/1"]
    assert 0.5 < reference["loss"] < 0.9 and 0.5 < reference["eval"] < 0.9  # a mean binary cross-entropy, not halved
    for name, run in out.items():
        for got, want in zip(run["weights"], reference["weights"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(run["loss"], reference["loss"], rtol=1e-5, err_msg=name)
        if run["eval"] is not None:
            np.testing.assert_allclose(run["eval"], reference["eval"], rtol=1e-5, err_msg=name)


OWN_APPLY = """
import json, keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32"); y = (x[:, :1] > 0).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
bce = keras.losses.BinaryCrossentropy(from_logits=True)
ms = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = {}

def copies_apart(model):  # the largest difference between the 2 replicas' copies of a weight
    return max(float(np.abs(w.value.values[1].numpy() - w.value.values[0].numpy()).max()) for w in model.weights)

def build(strategy):
    with strategy.scope():
        return (keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, kernel_initializer="ones")]),
                keras.optimizers.SGD(0.5))

class OptimizerApply(Trainer):  # an overridden step calling the optimizer's own apply_gradients
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss = self.compute_loss(x, y, self.model(x, training=True))
        self.optimizer.apply_gradients(zip(tape.gradient(loss, self.model.trainable_variables),
                                           self.model.trainable_variables))

class ForeignOptimizer(Trainer):  # an optimizer of the step's own (not the Trainer's), the TF tutorial's loss
    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            per_example = keras.losses.binary_crossentropy(y, self.model(x, training=True), from_logits=True)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=32)
        self.own.apply_gradients(zip(tape.gradient(loss, self.model.trainable_variables),
                                     self.model.trainable_variables))

class OwnApply(Trainer):  # the default step, apply_gradients overridden to call the optimizer's own
    def apply_gradients(self, unscaled_grads, loss=None, optimizer=None):
        self.optimizer.apply_gradients(zip(unscaled_grads, self.model.trainable_variables))

def fit(cls, model, optimizer, strategy=ms, **kw):
    t = cls(model=model, loss=bce, optimizer=optimizer, strategy=strategy, progress_bar=False, **kw)
    t.fit(ds, steps=1)
    return t.model

def weights(model):
    return [w.numpy().tolist() for w in model.weights]

model, optimizer = build(ms)
init = model.get_weights()
for i in (1, 2):  # a second Trainer of the same model and optimizer: the same update
    model.set_weights(init)
    fit(OptimizerApply, model, optimizer)
    out[f"shared/{i}"], out[f"shared/{i}/apart"] = weights(model), copies_apart(model)
for name, cls in (("default", Trainer), ("own_apply", OwnApply)):
    model, optimizer = build(ms)
    fit(cls, model, optimizer)
    out[name], out[f"{name}/apart"] = weights(model), copies_apart(model)
out["init"] = weights(build(ms)[0])
model, optimizer = build(ms)  # the Trainer holds `optimizer`; the step applies `own`, made apart from it
with ms.scope():
    own = keras.optimizers.SGD(0.5)
t = ForeignOptimizer(model=model, loss=bce, optimizer=optimizer, strategy=ms, progress_bar=False)
t.own = own
t.fit(ds, steps=1)
out["foreign"], out["foreign/apart"] = weights(model), copies_apart(model)
model, optimizer = build(ms)  # Keras' own fit with a Trainer's optimizer: Keras' sum
Trainer(model=model, loss=bce, optimizer=optimizer, strategy=ms, progress_bar=False)
with ms.scope():
    model.compile(optimizer=optimizer, loss=bce)
model.fit(ds.take(1), epochs=1, verbose=0)
out["keras_fit"], out["keras_fit/apart"] = weights(model), copies_apart(model)
model = fit(Trainer, lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(1, kernel_initializer="ones")]),
            lambda: keras.optimizers.SGD(0.5), ms, precision="mixed_float16")  # last: sets the global policy
out["mixed"], out["mixed/apart"] = weights(model), copies_apart(model)
print("RESULT", json.dumps(out))
"""


@pytest.mark.slow
def test_an_optimizers_own_apply_gradients_averages_in_an_own_step_and_sums_elsewhere_on_two_replicas(tmp_path):
    """A Trainer optimizer's own apply_gradients: the mean over replicas in an overridden step, Keras' sum
    elsewhere (an apply_gradients override under the default step, Keras' own fit with the Trainer's optimizer),
    none in the Trainer's update (also in its skip path, a fresh thread per replica under mixed_float16); a second
    Trainer of the same optimizer gives the same update (it halved it); an optimizer the Trainer does not hold, applied
    in an own step to tf.nn.compute_average_loss, averages too (it gave replicas x the update). Every replica's copy of
    a weight is the same."""
    script = tmp_path / "own_apply.py"
    script.write_text(OWN_APPLY + SKIP_TEARDOWN)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(l for l in result.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT "):])
    for name in [k for k in out if k.endswith("/apart")]:
        assert out.pop(name) == 0.0, name
    for name, want in (("shared/1", "default"), ("shared/2", "default"), ("own_apply", "default"),
                       ("keras_fit", "default"), ("mixed", "default"), ("foreign", "default")):
        tolerance = dict(rtol=1e-3, atol=1e-4) if name == "mixed" else dict(rtol=1e-5, atol=1e-6)  # float16's rounding
        for got, expected in zip(out[name], out[want]):  # (a doubled update is off by the update, 0.01-0.14)
            np.testing.assert_allclose(got, expected, err_msg=name, **tolerance)
    assert out["default"] != out["init"]  # one update


EXITS = """
import time
import keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer
from trainer.iterator_release import release_in_background

def main():
    x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32, drop_remainder=True)
    s = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    made, old = time.monotonic(), []
    for _ in range(6):  # distributed iterators as old as the run, of staggered ages
        old.append(iter(s.experimental_distribute_dataset(ds.repeat())))
        next(old[-1])
        time.sleep(0.35)
    t = Trainer(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]), strategy=s,
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                optimizer=lambda: keras.optimizers.SGD(0.1), progress_bar=False)
    print("FIT", t.fit(ds, steps=4)["step"], flush=True)
    # tf.data's autotuner wakes at doubling periods (about 2.5 s, 5 s, 10 s after an iterator was made):
    # an iterator dropped past one waits (the GIL released) for the next, so a release is still blocked
    # as the script ends.
    time.sleep(max(0.0, 6.0 - (time.monotonic() - made)))
    release_in_background(old, replicas=2)

main()  # returns: the Trainer and its kept train iterator are freed before the interpreter's exit
"""


@pytest.mark.slow
def test_a_finished_script_exits_0_with_iterators_still_being_freed(tmp_path):
    """A script that trained under MirroredStrategy aborted at interpreter exit ("FATAL: exception not
    rethrown", exit -6) when a tf.data iterator was still being destroyed on a release thread; it must
    exit 0 every time (the process waits for the releases)."""
    script = tmp_path / "exits.py"
    script.write_text(EXITS)
    runs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(3)]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert "FIT 4" in out
        assert run.returncode == 0, err[-3000:]


HELD_AT_EXIT = """
import threading, time, weakref
import keras, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from trainer import Trainer

x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32"); y = (x[:, 0] > 0).astype("int32")
trainer = Trainer(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]),
                  strategy=tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), verbose=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  optimizer=lambda: keras.optimizers.SGD(0.1))
trainer.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True), steps=2)
kept = trainer._kept_iterator  # private on purpose: no public API holds the iterator, and the test must watch it die
# a plain weak reference: weakref.finalize's callbacks are off once its own exit hook (before ours) has run
freed = weakref.ref(kept.iterator, lambda _: print("FREED ON", threading.current_thread().name, flush=True))


class SlowToFree:  # as an iterator hours old: freeing it waits for its autotuner's next wake-up
    def __del__(self):
        time.sleep(1.5)


kept.iterator = [kept.iterator, SlowToFree()]
print("END", flush=True)
"""


@pytest.mark.slow  # a TensorFlow process of its own under MirroredStrategy: 12-28 s, like its siblings here
def test_a_trainer_alive_at_exit_has_its_iterator_freed_by_the_exit_hook_and_the_wait_said(tmp_path):
    """A Trainer under MirroredStrategy in a module-level global: the interpreter's teardown destroyed its kept
    iterator in place, and the process idled 10-60 s there without a word. The exit hook frees it (on the release
    thread, waited for) and says what it waits for and how to avoid it, even with verbose=False."""
    script = tmp_path / "held_at_exit.py"
    script.write_text(HELD_AT_EXIT)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "END" in run.stdout and "FREED ON trainer-release-iterator" in run.stdout, run.stdout[-2000:]
    said = "Waiting for tf.data to free the training iterator of 1 Trainer(s) still alive at exit"
    assert run.stderr.count(said) == 1, run.stderr[-3000:]
    assert "`del trainer`" in run.stderr and "FATAL" not in run.stderr


@pytest.mark.slow
def test_a_command_that_exits_143_does_not_wait_for_the_iterators_being_freed(tmp_path):
    """After a SIGTERM the command line exits 143 (trainer.cli hands the code to iterator_release.exit_promptly):
    the wait for the releases (up to a minute) would outlast a 30 s grace period, so the process ends at
    once, with its code and without the abort."""
    script = tmp_path / "exits_143.py"
    script.write_text("import logging, sys\nlogging.basicConfig(level=logging.INFO)\n" + EXITS + (
        "from trainer.iterator_release import exit_promptly\nexit_promptly(143)\nsys.exit(143)\n"))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert "FIT 4" in run.stdout
    assert run.returncode == 143, run.stderr[-3000:]
    assert "Waiting for tf.data" not in run.stderr and "FATAL" not in run.stderr
