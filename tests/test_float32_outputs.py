"""Under a mixed policy trainer.model becomes the float32-output wrapper: code written against the user's model
(walking its layers to freeze a backbone, get_layer, summary) acts the same under every precision, and a run
resumes under another precision whichever layout (wrapped or not) its checkpoints hold."""
import keras
import numpy as np
import pytest

from conftest import blobs
from trainer import Callback, Trainer
from trainer.float32_outputs import Float32Outputs


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def backbone_and_head():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, activation="relu", name="bb_dense")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(hidden))


class FreezeBackbone(Callback):
    """As the docs advise: freeze in on_train_begin, after the build, by walking trainer.model.layers."""

    def on_train_begin(self, trainer):
        self.names = [layer.name for layer in trainer.model.layers]
        for layer in trainer.model.layers:
            if layer.name.startswith("bb_"):
                layer.trainable = False


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_freezing_by_walking_trainer_model_layers_acts_under_every_precision(precision):
    freeze = FreezeBackbone()
    trainer = Trainer(model=backbone_and_head, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.5), precision=precision, callbacks=[freeze],
                      verbose=False)
    model = trainer.model
    before = {name: model.get_layer(name).get_weights()[0].copy() for name in ("bb_dense", "head")}
    trainer.fit(blobs(), steps=3)
    assert isinstance(trainer.model, Float32Outputs) == (precision != "float32")
    assert freeze.names == ["input_layer", "bb_dense", "head"]  # the user's layers, not the wrapper's two
    after = {name: trainer.model.get_layer(name).get_weights()[0] for name in before}
    np.testing.assert_array_equal(after["bb_dense"], before["bb_dense"])  # frozen: not trained
    assert not np.array_equal(after["head"], before["head"])  # trained
    lines = []
    trainer.model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    assert "bb_dense" in "".join(lines) and "float32_outputs" not in "".join(lines)


def head_computing_in(dtype):
    """A model whose last layer computes in `dtype` (None: the global policy, so a mixed one wraps the model)."""
    return lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                     keras.layers.Dense(2, dtype=dtype)])


def in_folder(run_dir, precision, build, **options):
    return Trainer(model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-2), precision=precision, run_dir=run_dir,
                   progress_bar=False, verbose=False, **options)


def state(trainer):
    """The weights and the optimizer's variables (slots, iterations, rate), as arrays."""
    return [np.array(v) for v in [*trainer.model.weights, *trainer.optimizer.variables]]


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("mixed", ["mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("head", [None, "float32"])
def test_a_run_resumes_under_another_precision_and_back_with_its_weights_and_optimizer_state(tmp_path, mixed, head):
    """docs/concepts/checkpoints.md: another precision is allowed on resume. A model whose outputs are not float32
    is wrapped under a mixed policy only, which nests its variables under `model/inner` in the checkpoint: a
    float32 run resumes under the mixed policy, that run (its newest checkpoint wrapped) under float32 again, and
    trainer.resume_from goes back to the float32 checkpoint under the mixed policy, each restoring every weight
    and optimizer variable as saved; float16's loss scale starts at its initial value (float32 saved none)."""
    build = head_computing_in(head)
    wraps = head is None
    first = in_folder(tmp_path, "float32", build)
    first.fit(blobs(), steps=4)
    saved_float32 = state(first)

    resumed = in_folder(tmp_path, mixed, build)
    resumed.fit(blobs(), steps=4)  # the run is at step 4: restored, nothing trained
    assert isinstance(resumed.model, Float32Outputs) == wraps
    assert_same(state(resumed), saved_float32)
    scale = resumed.loss_scale.status()
    assert scale.scale == (2.0**15 if mixed == "mixed_float16" else 1.0) and scale.skipped_steps == 0
    resumed.fit(blobs(), steps=6)
    assert int(resumed.step.numpy()) == 6
    saved_mixed = state(resumed)

    back = in_folder(tmp_path, "float32", build)
    back.fit(blobs(), steps=6)
    assert not isinstance(back.model, Float32Outputs)
    assert_same(state(back), saved_mixed)
    assert back.loss_scale.status().scale == 1.0  # a float16 run's scale does not carry over to float32
    back.fit(blobs(), steps=8)
    assert int(back.step.numpy()) == 8

    rewound = in_folder(tmp_path, mixed, build, resume_from="ckpt-4")
    rewound.fit(blobs(), steps=4)
    assert_same(state(rewound), saved_float32)
