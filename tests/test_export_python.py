"""Exporting what the Python API trained: a .keras file model.save() wrote (under a mixed policy it holds the
Trainer's float32-output wrapper, which loads after `import trainer`, as the warning and docs say), given to
`python -m trainer.export`; a folder Trainer(run_dir=...) wrote, which the command-line tools refuse saying what
it lacks (no recipe to rebuild the model from) and the way round, and that way round itself (rebuild,
warm_start, save, export) on a folder trained under a mixed policy; warm starts across the wrapper's two forms."""
import subprocess
import sys

import keras
import numpy as np
import pytest

from conftest import run_cli

X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
Y = (X[:, 0] > 0).astype("int32")


def build():
    """Its last layer computes in the global policy: under mixed_bfloat16 the Trainer wraps it."""
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trainer, its run folder): 8 steps under mixed_bfloat16, checkpointed, from Python."""
    from trainer import Trainer

    run_dir = tmp_path_factory.mktemp("python_run") / "run"
    trainer = Trainer(model=build, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      optimizer=keras.optimizers.Adam, precision="mixed_bfloat16", run_dir=str(run_dir),
                      checkpoint_every=4, progress_bar=False, tensorboard=False, verbose=False)
    trainer.fit(X, Y, epochs=2, batch_size=16)
    yield trainer, run_dir
    keras.mixed_precision.set_dtype_policy("float32")


@pytest.mark.slow
def test_a_mixed_precision_model_saved_from_python_loads_after_import_trainer_and_exports(trained, tmp_path):
    from trainer.precision import Float32Outputs

    trainer, _ = trained
    assert isinstance(trainer.model, Float32Outputs)
    path = tmp_path / "model.keras"
    trainer.model.save(path)
    np.save(tmp_path / "x.npy", X[:8])
    expected = np.asarray(trainer.model(X[:8], training=False))
    code = ("import sys, keras, numpy as np\n"
            f"try: keras.saving.load_model({str(path)!r})\n"
            "except Exception as e: print('without trainer:', e, file=sys.stderr)\n"
            f"import trainer; m = keras.saving.load_model({str(path)!r}); y = m(np.load({str(tmp_path / 'x.npy')!r}))\n"
            "print(type(m).__name__, y.dtype.name); np.save(sys.argv[1], np.asarray(y))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.npy")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "without trainer: Could not locate class 'Float32Outputs'" in result.stderr  # as the docs say
    assert result.stdout.split() == ["Float32Outputs", "float32"]  # saved as itself: the same object graph
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)

    out = tmp_path / "exported"
    exported = run_cli(str(path), "--format", "saved_model", "--out", str(out), module="trainer.export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "wrote saved_model" in exported.stdout and "(model.keras)" in exported.stdout
    assert "computes in bfloat16: exporting it in float32" in exported.stdout
    assert "16 seeded random inputs" in exported.stdout and (out / "saved_model.pb").is_file()


def test_the_wrapper_warning_says_a_saved_file_needs_import_trainer(caplog):
    from trainer.precision import ensure_float32_outputs

    model = build()
    with caplog.at_level("WARNING"):
        ensure_float32_outputs(model, keras.ops.cast(model(X[:2]), "float16"), strict=False)
    assert "load it after `import trainer`" in caplog.text and "Could not locate class 'Float32Outputs'" in caplog.text


def test_the_docs_way_round_exports_a_folder_trained_under_a_mixed_policy(trained, tmp_path):
    """Rebuild the model as before (plain, float32), warm_start it from the folder (whose checkpoints hold the
    wrapped model under model/inner), save it, export that: the outputs are the trained model's."""
    from trainer import warm_start

    trainer, run_dir = trained
    keras.mixed_precision.set_dtype_policy("float32")
    try:
        later = build()
        report = warm_start(later, str(run_dir))
    finally:
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    assert len(report["restored"]) == 4 and not report["missing"] and not report["mismatched"]
    assert all(path.startswith("model/inner/") for path in report["restored"])
    for got, want in zip(later.get_weights(), trainer.model.inner.get_weights()):
        np.testing.assert_array_equal(got, want)
    later.save(tmp_path / "later.keras")
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "exported"
    exported = run_cli(str(tmp_path / "later.keras"), "--format", "saved_model", "--out", str(out),
                       module="trainer.export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    code = (f"import sys, numpy as np, tensorflow as tf; m = tf.saved_model.load({str(out)!r}); "
            f"np.save(sys.argv[1], m.serve(np.load({str(tmp_path / 'x.npy')!r})).numpy())")
    served = subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.npy")], capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    # The float32 export of bfloat16 training: the same weights, computed in float32 (bfloat16's 3 digits apart).
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(later(X)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), np.asarray(trainer.model(X, training=False)),
                               rtol=0.05, atol=0.05)


def test_warm_starts_cross_the_wrapper_both_ways_and_a_python_call_is_named_as_one(trained, tmp_path):
    """A wrapped model from a plain checkpoint or .keras (and a plain one from a wrapped .keras) loads every
    variable; a checkpoint of another model is refused naming the Python call, not trainer.init_from."""
    from trainer import CheckpointError, warm_start
    from trainer.precision import Float32Outputs

    trainer, run_dir = trained
    trainer.model.save(tmp_path / "wrapped.keras")
    plain = build()
    warm_start(plain, tmp_path / "wrapped.keras")
    for got, want in zip(plain.get_weights(), trainer.model.inner.get_weights()):
        np.testing.assert_array_equal(got, want)
    plain.save(tmp_path / "plain.keras")
    for source in (tmp_path / "plain.keras", run_dir):
        wrapped = Float32Outputs(build())
        wrapped(X[:2])
        report = warm_start(wrapped, source)
        assert len(report["restored"]) == 4 and not report["missing"]
        for got, want in zip(wrapped.get_weights(), trainer.model.get_weights()):
            np.testing.assert_array_equal(got, want)
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="elsewhere")])
    with pytest.raises(CheckpointError, match=r"^warm_start\(model, '.*run'\): no variable of this model"):
        warm_start(other, run_dir)


def test_a_keras_file_whose_layers_do_not_load_is_no_warm_start(tmp_path, caplog):
    """Keras' loader only warns "N objects could not be loaded": nothing loaded is a CheckpointError, part of it
    a warning naming what stayed at its initial values, and the report says so (not "restored")."""
    from trainer import CheckpointError, warm_start

    source = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="body"), keras.layers.Dense(2)])
    source.save(tmp_path / "source.keras")
    unrelated = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(5),
                                  keras.layers.Dense(1)])
    with pytest.raises(CheckpointError, match=r"no layer of this model loaded from .*source.keras \(Keras' loader"):
        warm_start(unrelated, tmp_path / "source.keras")
    new_head = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(5)])
    with caplog.at_level("WARNING"):
        report = warm_start(new_head, tmp_path / "source.keras")
    assert len(report["restored"]) == 2 and len(report["missing"]) == 2
    assert "could not load 2 variables, left at their initial values" in caplog.text
    np.testing.assert_array_equal(new_head.layers[0].kernel.numpy(), source.layers[0].kernel.numpy())


def test_a_python_run_folder_is_refused_saying_it_has_no_recipe_and_the_way_round(trained, tmp_path):
    _, run_dir = trained
    for source in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "ckpt-8"):
        result = run_cli(str(source), "--format", "keras", "--out", str(tmp_path / "x"), module="trainer.export")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "written by Trainer(run_dir=...) from Python" in result.stderr, result.stderr
        assert ("it holds checkpoints" in result.stderr) == (source == run_dir), result.stderr
        assert 'trainer.model.save("model.keras")' in result.stderr and "trainer.export model.keras" in result.stderr
        assert f'trainer.warm_start(model, "{run_dir}")' in result.stderr
    assert not (tmp_path / "x").exists()
    for module, args in (("trainer.evaluate", []), ("trainer.predict", ["--input", str(tmp_path), "--out", "p.csv"])):
        result = run_cli(str(run_dir), *args, module=module, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "written by Trainer(run_dir=...) from Python" in result.stderr
        assert "trainer.evaluate(data)" in result.stderr


def test_export_of_a_keras_file_refuses_checkpoint_and_a_missing_file(trained, tmp_path):
    trainer, _ = trained
    path = tmp_path / "model.keras"
    trainer.model.save(path)
    picked = run_cli(str(path), "--checkpoint", "best", "--out", str(tmp_path / "x"), module="trainer.export")
    assert picked.returncode == 2 and "a .keras file holds one model" in picked.stderr
    missing = run_cli(str(tmp_path / "none.keras"), "--out", str(tmp_path / "x"), module="trainer.export")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "x").exists()
