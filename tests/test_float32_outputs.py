"""Under a mixed policy trainer.model becomes the float32-output wrapper: code written against the user's model
(walking its layers to freeze a backbone, get_layer, summary) acts the same under every precision."""
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
