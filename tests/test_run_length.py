"""How long a run trains: max_steps and epochs, whichever comes first (as Lightning), said loudly at the start when
max_steps cuts the epochs short; from the command line, trainer.epochs alone replaces the recipe's max_steps.
Tiny models through the public API; two short CLI runs."""
from __future__ import annotations

import keras
import numpy as np
import yaml

from conftest import run_cli
from trainer import Trainer

X = np.random.default_rng(0).normal(size=(2048, 8)).astype("float32")
Y = (X.sum(axis=1) > 0).astype("int32")  # batches of 32: 64 steps an epoch
SHORT = ["trainer.log_every=10", "trainer.eval_every=0", "trainer.eval_steps=2", "trainer.progress_bar=false",
         "data.batch_size=64", "model.hidden_units=[16]"]  # 60000 images: 937 steps an epoch


def make(**options):
    return Trainer(model=lambda: keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)]),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.Adam(1e-3), progress_bar=False, **options)


def test_max_steps_that_cuts_fit_epochs_warns_naming_both_in_the_python_form(caplog):
    with caplog.at_level("WARNING", logger="trainer"):
        logs = make(max_steps=20).fit(X, Y, epochs=5)
    assert logs["step"] == 20  # the smaller wins, as the reference says
    assert ("fit(epochs=5) is 320 steps (64 per epoch), but Trainer(max_steps=20) ends the run first, at step 20 "
            "(epoch 0.312): with both set, the smaller wins. Fix: Trainer(max_steps=None), or Trainer(max_steps=320) "
            "or more, to train all 5 epochs.") in caplog.text, caplog.text
    assert "trainer.max_steps" not in caplog.text


def test_fit_steps_that_cut_fit_epochs_warn_too_and_epochs_ending_first_do_not(caplog):
    with caplog.at_level("WARNING", logger="trainer"):
        assert make().fit(X, Y, steps=20, epochs=5)["step"] == 20
    assert "but fit(steps=20) ends the run first" in caplog.text
    assert "Fix: leave out fit(steps=...), or fit(steps=320) or more, to train all 5 epochs." in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer"):
        assert make(max_steps=1000).fit(X, Y, epochs=1)["step"] == 64  # a cap the epochs never reach: no warning
    assert "smaller wins" not in caplog.text, caplog.text


def test_cli_epochs_alone_replace_the_recipes_max_steps(tmp_path):
    """recipe=mnist sets trainer.max_steps=1500: trainer.epochs=4 was cut to 1500 steps with no word of why."""
    result = run_cli("recipe=mnist", "trainer.epochs=0.01", *SHORT, f"hydra.run.dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert ("Run length: trainer.epochs=0.01 from the command line replaces the config's trainer.max_steps=1500 "
            "(now null).") in output, output[-3000:]
    assert "Done: 10 steps" in output and "smaller wins" not in output, output[-3000:]  # ceil(0.01 x 937)
    recorded = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())["trainer"]
    assert recorded["max_steps"] is None and recorded["epochs"] == 0.01  # the record says what ran


def test_cli_both_given_the_smaller_wins_and_the_warning_names_the_overrides(tmp_path):
    result = run_cli("recipe=mnist", "trainer.epochs=0.02", "trainer.max_steps=5", *SHORT, f"hydra.run.dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert ("trainer.epochs=0.02 is 19 steps (937 per epoch), but trainer.max_steps=5 ends the run first, at step 5 "
            "(epoch 0.00534): with both set, the smaller wins. Fix: trainer.max_steps=null, or trainer.max_steps=19 "
            "or more, to train all 0.02 epochs.") in output, output[-3000:]
    assert "Done: 5 steps" in output and "Run length:" not in output and "Trainer(" not in output, output[-3000:]
