"""mixed_float16's advice: the multiples-of-8 tip on GPUs only, small output layers left out (one definition of
an output layer, the Trainer's and the doctor's), a wide one named with a note; the float16-on-a-CPU warning,
once per process, before TensorFlow's `oneDNN supports DT_HALF` line, hedged where this CPU's flags cannot say."""
import logging
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_cli
from trainer import PrecisionConfig, Trainer
from trainer import precision as precision_lib
from trainer.doctor import hardware
from trainer.doctor.model_table import model_section
from trainer.layer_probe import LayerProbe, output_layers


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def batches(batch=12):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4 * batch, 8)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype("int32"))).batch(batch)


def make(model, precision="mixed_float16"):
    return Trainer(model=model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.05), precision=precision, progress_bar=False)


def classifier(head=10):
    """A hidden Dense(12), a LayerNormalization, a float16 output layer of `head` units under an activation."""
    return lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(12, name="hidden"),
                                     keras.layers.LayerNormalization(), keras.layers.Dense(head, name="head"),
                                     keras.layers.Activation("linear")])


def tips(caplog):
    return [r.getMessage() for r in caplog.records if "multiples of 8" in r.getMessage()]


def test_multiple_of_8_tip_only_on_gpus_small_outputs_left_out_a_vocabulary_named(caplog, monkeypatch):
    precision = PrecisionConfig(policy="mixed_float16", float32_layers=["LayerNormalization"])
    monkeypatch.setattr(precision_lib, "device_kind", lambda strategy: "CPU")
    with caplog.at_level(logging.INFO):
        make(classifier(), precision).fit(batches(), steps=1)
    assert not tips(caplog)
    caplog.clear()
    monkeypatch.setattr(precision_lib, "device_kind", lambda strategy: "GPU")
    with caplog.at_level(logging.INFO):
        trainer = make(classifier(), precision)
        trainer.fit(batches(), steps=1)
    said = tips(caplog)
    assert len(said) == 1 and "hidden.units=12" in said[0] and "per-replica batch size=12" in said[0], said
    assert "units=10" not in said[0]  # 10 classes: the task's size
    assert trainer.model.inner.layers[1].compute_dtype == "float32"  # float32_layers still applied
    caplog.clear()
    with caplog.at_level(logging.INFO):
        make(classifier(head=300), precision).fit(batches(), steps=1)
    said = tips(caplog)
    assert len(said) == 1 and f"units=300 ({precision_lib.OUTPUT_PAD_NOTE})" in said[0], said


def _heads(build):
    """The names of the output layers of `build()`, built under mixed_float16 and called once."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model = build()
    with LayerProbe(model, record_calls=True) as probe:
        outputs = model(tf.ones((2, 4)), training=False)
    return sorted(layer.name for layer in probe.layers if id(layer) in output_layers(probe.calls, outputs))


class AttributeOrderIsNotCallOrder(keras.Model):
    """`out` is made first, called last, under a raw op: call order finds it (attribute order would not)."""

    def __init__(self):
        super().__init__()
        self.out, self.hidden = keras.layers.Dense(10, name="out"), keras.layers.Dense(10, name="net_hidden")

    def call(self, x):
        return tf.nn.relu(self.out(self.hidden(x)))


def test_output_layers_by_call_order_alike_for_every_kind_of_model():
    def nested():
        inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(12, name="hidden"),
                                  keras.layers.Dense(10, name="head"), keras.layers.Activation("softmax")])
        return keras.Sequential([keras.Input((4,)), inner, keras.layers.Dropout(0.1)])

    def two_outputs():
        x = keras.Input((4,))
        return keras.Model(x, {"a": keras.layers.Dense(3, name="a")(x),
                               "b": keras.layers.Conv1D(5, 1, name="b")(keras.layers.Reshape((4, 1))(x))})

    def float32_softmax():  # Keras casts the float16 logits on the way in: no layer returned that tensor
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(10, name="logits"),
                                 keras.layers.Activation("softmax", dtype="float32")])

    assert _heads(nested) == ["head"]
    assert _heads(two_outputs) == ["a", "b"]
    assert _heads(float32_softmax) == ["logits"]
    assert _heads(AttributeOrderIsNotCallOrder) == ["out"]


def test_doctor_table_and_trainer_tip_agree_on_the_output_layer(caplog, monkeypatch):
    """Dense(10) under an Activation: the doctor says it is fine (no fix), as the Trainer leaves it out; a
    300-unit output layer is a fix with the note in both."""
    sample = tf.ones((16, 8))
    table = model_section(classifier(), "mixed_float16", sample, 16)
    head = next(r for r in table["layers"] if r["name"] == "head")
    assert head["output_layer"] and head["not_multiple_of_8"] == ["units=10: fine, an output layer's size is the "
                                                                  "task's"]
    assert [f["layer"] for f in table["multiple_of_8_fixes"]] == ["hidden"]
    wide = model_section(classifier(head=300), "mixed_float16", sample, 16)
    fixes = {f["layer"]: f for f in wide["multiple_of_8_fixes"]}
    assert fixes["head"]["fix"] == 304 and fixes["head"]["note"] == precision_lib.OUTPUT_PAD_NOTE


@pytest.mark.parametrize("flags, vendor, expected", [
    ({"avx512bw", "avx512_bf16"}, "AuthenticAMD", "yes"),  # a Zen 4
    ({"avx2"}, "AuthenticAMD", "yes"),
    ({"avx512bw", "avx512_fp16", "amx_bf16"}, "GenuineIntel", "no"),  # a Sapphire Rapids
    ({"avx512bw", "amx_fp16"}, "GenuineIntel", "no"),
    ({"avx512f", "avx512_fp16"}, "GenuineIntel", "maybe"),  # no AVX-512 BW: AVX-NE-CONVERT, unseen, decides
    ({"avx512bw", "avx512f"}, "GenuineIntel", "yes"),  # an Ice Lake: AVX-512 BW without FP16
    ({"avx2", "avx_vnni"}, "GenuineIntel", "maybe"),  # an Intel core without AVX-512: AVX-NE-CONVERT unseen
    ({"avx2", "avx_ne_convert"}, "GenuineIntel", "no"),  # alone it suffices (were it listed)
    (set(), "", "maybe"),  # no /proc/cpuinfo flags (not Linux, or aarch64's `Features`)
])
def test_dt_half_line_by_cpu_flags(monkeypatch, caplog, flags, vendor, expected):
    monkeypatch.setattr(precision_lib, "_onednn_custom_ops_on", lambda: True)
    monkeypatch.setattr(precision_lib, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(precision_lib, "cpu_vendor", lambda: vendor)
    assert precision_lib.dt_half_line_here() == expected
    with caplog.at_level(logging.WARNING):
        precision_lib.warn_float16_on_cpu()
    said = caplog.text
    assert "precision=mixed_float16 on a CPU" in said
    assert ("oneDNN supports DT_HALF" in said) == (expected != "no")
    assert ("If TensorFlow's line" in said) == (expected == "maybe")
    claim = "this CPU has no fast float16 or bfloat16 matmuls"  # a hardware claim: from known flags only
    assert (claim in said) == bool(flags and not flags & {"amx_bf16", "avx512_bf16"}), said
    assert ("flags are unknown" in said) == (not flags)
    monkeypatch.setattr(precision_lib, "_onednn_custom_ops_on", lambda: False)
    assert precision_lib.dt_half_line_here() == "no"


def test_float16_on_a_cpu_is_said_once_per_process(caplog, monkeypatch):
    monkeypatch.setattr(precision_lib, "device_kind", lambda strategy: "CPU")
    with caplog.at_level(logging.WARNING):
        make(classifier())
        make(classifier())
    assert caplog.text.count("precision=mixed_float16 on a CPU") == 1


@pytest.mark.parametrize("line_here", ["yes", "maybe", "no"])
def test_doctor_names_the_dt_half_line_before_its_first_float16_matmul(monkeypatch, line_here):
    monkeypatch.setattr(hardware, "dt_half_line_here", lambda: line_here)
    monkeypatch.setattr(hardware.tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(hardware, "_float32_side", lambda: 128)
    monkeypatch.setattr(hardware, "_sized_call", lambda dtype, xla, side: (lambda: None, side))
    monkeypatch.setattr(hardware, "interleaved_seconds", lambda calls, rounds, warmup: {k: [0.01] for k in calls})
    said = []
    hardware.measure_matmul(rounds=1, progress=said.append)
    noted = [line for line in said if "DT_HALF" in line]
    if line_here == "no":
        assert not noted
    else:
        assert noted == [next(line for line in said if line.startswith("hardware: sizing the float16 XLA off"))]
        assert ("If TensorFlow's line" in noted[0]) == (line_here == "maybe") and "harmless" in noted[0]


def test_cli_model_gets_the_same_multiple_of_8_tip(tmp_path, monkeypatch):
    """The command line's model (a float32 logits layer of 10 classes) on GPUs: the tip names the hidden layer
    only, as for a model built from Python (on a CPU no tip: the in-process test above)."""
    monkeypatch.setattr(precision_lib, "device_kind", lambda strategy: "GPU")
    done = run_cli("recipe=mnist", "precision=mixed_float16", "model.hidden_units=[12]", "trainer.max_steps=1",
                   "trainer.eval_every=0", "trainer.eval_steps=1", "trainer.checkpoint_every=0",
                   "trainer.progress_bar=false", "data.batch_size=64", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    said = [line for line in (done.stdout + done.stderr).splitlines() if "multiples of 8" in line]
    assert len(said) == 1 and ".units=12" in said[0] and "units=10" not in said[0], said


@pytest.mark.slow
def test_float16_on_a_cpu_is_said_before_tensorflows_dt_half_line():
    """TensorFlow prints an error-level `oneDNN supports DT_HALF only on platforms with AVX-512` line at the first
    float16 op on a CPU without float16 kernels; the Trainer's warning comes first and names it as harmless."""
    script = (
        "import numpy as np, keras, tensorflow as tf\n"
        "from trainer import Trainer\n"
        "x = np.random.rand(64, 8).astype('float32'); y = np.random.randint(0, 2, 64).astype('int32')\n"
        "t = Trainer(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]),\n"
        "            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),\n"
        "            optimizer=lambda: keras.optimizers.SGD(0.1), precision='mixed_float16', progress_bar=False,\n"
        "            jit_compile=False)\n"  # TensorFlow's float16 kernels run (XLA's print no line)
        "t.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), steps=1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    ours = done.stderr.find("precision=mixed_float16 on a CPU")
    assert ours >= 0, done.stderr[-2000:]
    theirs = re.search(r"^E\d{4} .*util\.cc:\d+\] oneDNN supports DT_HALF only", done.stderr, re.MULTILINE)
    line_here = precision_lib.dt_half_line_here()
    if line_here == "no":
        assert not theirs, done.stderr[-2000:]
    # where the line is foretold, TensorFlow prints it only if an op goes through oneDNN's float16 check (a CI run's
    # fresh process printed none): what must hold is that ours comes first whenever it does
    if theirs:
        assert ours < theirs.start() and "oneDNN supports DT_HALF" in done.stderr[ours:theirs.start()]
        assert "harmless" in done.stderr[ours:theirs.start()]
