"""The learning-rate range test (trainer/lr_finder.py, `python -m trainer.lr_find`): the suggestion is the
steepest descent of the recorded smoothed loss, the Trainer it ran on is left as it was, nothing is
written into a run folder."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import blobs, run_cli


def steepest(result, skip_begin=10):
    """The index where the recorded smoothed loss falls fastest against log10(lr), computed afresh."""
    lrs, smoothed = np.array(result.lrs), np.array(result.smoothed)
    kept = [i for i in range(skip_begin, len(smoothed) - 1) if math.isfinite(smoothed[i])]
    slopes = np.gradient(smoothed[kept], np.log10(lrs[kept]))
    return kept[int(np.argmin(slopes))]


@pytest.mark.parametrize("schedule", [False, True], ids=["constant_lr", "schedule"])
def test_lr_find_suggests_the_steepest_descent_and_leaves_the_trainer_as_it_was(tmp_path, schedule):
    import keras

    from trainer import Trainer
    from trainer.lr_finder import lr_find

    rate = keras.optimizers.schedules.CosineDecay(1e-2, 100) if schedule else 1e-2
    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                                      keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.Adam(rate), run_dir=tmp_path, verbose=False, log_every=2)
    data = blobs(n=512, batch=16, shuffle=True).repeat()
    trainer.fit(data, steps=2)
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    optimizer = trainer.optimizer
    before = (trainer.weights_fingerprint(), [v.numpy().copy() for v in optimizer.variables], int(trainer.step.numpy()),
              optimizer._learning_rate)

    result = lr_find(trainer, data, steps=50, min_lr=1e-4, max_lr=10.0)

    assert len(result.lrs) == len(result.losses) == len(result.smoothed) <= 50
    assert result.lrs[0] == pytest.approx(1e-4) and all(b > a for a, b in zip(result.lrs, result.lrs[1:]))
    assert result.suggestion_index == steepest(result) and result.suggestion == result.lrs[result.suggestion_index]
    i = result.suggestion_index
    assert result.smoothed[i + 1] < result.smoothed[i - 1]  # the curve falls there
    assert 1e-3 < result.suggestion < 10.0  # for a 2-layer MLP with Adam: between the flat start and the blow-up
    # the Trainer as it was: weights, optimizer slots and iterations, learning rate (or schedule), step; no new file
    assert trainer.weights_fingerprint() == before[0]
    assert all(np.array_equal(v.numpy(), old) for v, old in zip(optimizer.variables, before[1]))
    assert int(trainer.step.numpy()) == before[2] and optimizer._learning_rate is before[3]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == files
    trainer.fit(data, steps=4)  # and it trains on from there
    assert int(trainer.step.numpy()) == 4


def test_lr_find_stops_when_the_loss_diverges(tmp_path):
    import keras

    from trainer import Trainer
    from trainer.lr_finder import lr_find

    trainer = Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)
    result = lr_find(trainer, blobs(n=512).repeat(), steps=60, min_lr=1e-3, max_lr=1e6)
    assert result.stopped == "diverged" and len(result.losses) < 60
    last = result.smoothed[-1]
    assert not math.isfinite(last) or last > 4 * min(result.smoothed[:-1])

    def refuse(name):
        raise AssertionError(f"{name} in lr_find.json: not JSON")

    written = json.loads(result.to_json(tmp_path / "lr_find.json").read_text(), parse_constant=refuse)
    assert written["stopped"] == "diverged" and len(written["smoothed_loss"]) == len(result.losses)


def test_cli_lr_find_writes_json_and_plot_and_no_run_folder(tmp_path):
    out = tmp_path / "lr"
    result = run_cli("--steps", "30", "--min", "1e-5", "--max", "10", "--out", str(out), "recipe=mnist",
                     "model.hidden_units=[16]", "data.batch_size=32", module="trainer.lr_find", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    assert found["steps"] == 30 and len(found["lr"]) == len(found["smoothed_loss"]) <= 30
    assert found["suggestion"] in found["lr"] and 1e-5 < found["suggestion"] < 10
    assert f"Suggested learning rate: {found['suggestion']:.3g}" in result.stdout
    assert f"optimizer.lr={found['suggestion']:.3g}" in result.stdout
    # no checkpoint, no runs/
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lr", "lr_find.json", "lr_find.png"]


def test_cli_lr_find_composes_the_run_length_as_python_m_trainer_does(tmp_path, monkeypatch):
    """`trainer.epochs=1` alone on the command line replaces recipe=mnist's max_steps=1500 in the run python -m
    trainer makes (tests/test_run_length.py); lr_find composed the recipe's max_steps beside it."""
    import trainer.assemble

    composed, parts_of = [], trainer.assemble.parts_of  # the command runs as __main__: its find() calls this
    monkeypatch.setattr(trainer.assemble, "parts_of",
                        lambda cfg, **kw: (composed.append(dict(cfg.trainer)), parts_of(cfg, **kw))[1])
    for given, length in ((["trainer.epochs=1"], (None, 1)), (["trainer.epochs=1", "trainer.max_steps=7"], (7, 1))):
        result = run_cli("--steps", "13", "--out", str(tmp_path / "lr"), "recipe=mnist", "model.hidden_units=[8]",
                         "data.batch_size=16", *given, module="trainer.lr_find", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (composed[-1]["max_steps"], composed[-1]["epochs"]) == length  # both given: both stand


def test_cli_lr_find_bad_input_exits_2(tmp_path):
    result = run_cli("--min", "1", "--max", "0.1", "recipe=mnist", module="trainer.lr_find", cwd=tmp_path)
    assert result.returncode == 2 and "0 < min_lr < max_lr" in result.stderr + result.stdout
    assert not (tmp_path / "runs").exists()


def test_suggest_gives_nothing_where_the_loss_never_falls():
    """A rising or flat smoothed loss has no descent: no suggestion (the steepest slope is not negative)."""
    from trainer.lr_finder import exponential_rates, no_suggestion_reason, suggest

    lrs = list(exponential_rates(1e-5, 1.0, 30))
    rising, flat, falling = [1 + 0.1 * i for i in range(30)], [1.0] * 30, [1 - 0.01 * i for i in range(30)]
    assert suggest(lrs, rising) is None and suggest(lrs, flat) is None
    assert suggest(lrs, falling) is not None
    reason = no_suggestion_reason(lrs, rising, rising, "steps")
    assert reason.startswith(f"the loss never decreased between lr {lrs[10]:.3g} and {lrs[28]:.3g}")


def _tiny_trainer(loss=None):
    import keras

    from trainer import Trainer

    return Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
                   loss=loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                   optimizer=lambda: keras.optimizers.SGD(0.1), verbose=False)


def test_lr_find_on_a_flat_loss_says_it_never_decreased():
    from trainer.lr_finder import lr_find

    flat = _tiny_trainer(loss=lambda y, p: 0.0 * p[:, 0] + 1.0)  # the same loss whatever the rate
    result = lr_find(flat, blobs(n=256).repeat(), steps=20, min_lr=1e-4, max_lr=1.0)
    assert result.stopped == "steps" and len(result.losses) == 20
    assert result.suggestion is None and result.suggestion_index is None
    assert result.no_suggestion.startswith("the loss never decreased between lr")


def test_lr_find_with_a_non_finite_first_loss_blames_the_data_not_the_rate():
    import numpy as np
    import tensorflow as tf

    from trainer.lr_finder import lr_find

    x = np.full((64, 4), np.nan, "float32")
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(64, "int32"))).batch(16).repeat()
    result = lr_find(_tiny_trainer(), data, steps=20, min_lr=1e-4, max_lr=1.0)
    assert result.stopped == "diverged" and result.suggestion is None
    assert ("first step's loss is not finite" in result.no_suggestion
            and "the data or model, not the rate" in result.no_suggestion)


@pytest.mark.parametrize("args, message", [(["--steps", "5"], "steps=5 is too few"),
                                           (["--min", "nan"], "0 < min_lr < max_lr")], ids=["steps", "nan"])
def test_cli_lr_find_refuses_settings_before_building_anything(tmp_path, args, message):
    result = run_cli(*args, "recipe=mnist", "data.batch_size=0", module="trainer.lr_find", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2 and message in output, output[-2000:]
    assert "batch_size" not in output  # refused before the config's data (a bad batch size) is looked at
