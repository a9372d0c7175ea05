"""The per-layer model summary: model_summary.txt in the run folder (a section per model), one line in the log."""
import logging
import re

import keras
import pytest
import tensorflow as tf

from conftest import blobs
from trainer import Trainer


@pytest.fixture(autouse=True)
def reset_policy():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def mlp(width):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(width, activation="relu", name="hidden"),
                             keras.layers.Dense(2, name="logits")])


def test_mixed_precision_summary_shows_compute_and_variable_dtypes(tmp_path, caplog):
    """Under mixed_bfloat16: the user's layers compute in bfloat16 with float32 variables, and the layer the
    Trainer adds to make the outputs float32 is listed, in float32; the log has the totals and names the file."""
    run = tmp_path / "run"
    trainer = Trainer(model=lambda: mlp(8), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(1e-2), precision="mixed_bfloat16", run_dir=run,
                      progress_bar=False, best_metric=None)
    with caplog.at_level(logging.INFO, logger="trainer"):
        trainer.fit(blobs(), steps=1)
    text = (run / "model_summary.txt").read_text()
    rows = {line.split()[0].split("/")[-1]: line.split()[1:] for line in text.splitlines()[3:] if line.strip()}
    assert rows["hidden"] == ["Dense", "(batch,", "8)", "40", "bfloat16", "float32"], text
    assert rows["logits"] == ["Dense", "(batch,", "2)", "18", "bfloat16", "float32"], text
    assert rows["float32_outputs"][2:] == ["0", "float32", "-"], text
    assert "58 parameters (58 trainable), computes in bfloat16, float32, variables float32" in text
    assert re.search(rf"Model \w+: 58 parameters \(58 trainable\), computes in bfloat16, float32, variables float32; "
                     rf"per layer: {re.escape(str(run / 'model_summary.txt'))}", caplog.text), caplog.text
    assert "hidden" not in caplog.text  # the table stays out of the console


class Distillation(Trainer):
    def train_step(self, data):
        x, _ = data
        soft = tf.nn.softmax(self.models["teacher"](x, training=False))
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(soft, self.models["student"](x, training=True),
                                                                        from_logits=True))
        self.update(loss, tape)
        return {"distill_loss": loss}


def test_each_model_of_a_trainer_has_its_section(tmp_path):
    run = tmp_path / "run"
    Distillation(models={"student": lambda: mlp(3), "teacher": lambda: mlp(7)}, frozen={"teacher"},
                 optimizer=lambda: keras.optimizers.Adam(1e-2), run_dir=run, verbose=False).fit(blobs(), steps=1)
    text = (run / "model_summary.txt").read_text()
    student, teacher = text.split("Model 'teacher'")
    assert student.startswith("Model 'student'") and "23 parameters" in student and "(batch, 3)" in student
    assert "frozen: not trained, not checkpointed" in teacher and "51 parameters" in teacher and "(batch, 7)" in teacher
