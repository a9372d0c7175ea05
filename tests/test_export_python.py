"""Exporting what the Python API trained: a .keras file model.save() wrote (under a mixed policy too: the
Trainer's float32-output wrapper saves as a plain Keras model, loadable without trainer), given to
`python -m trainer.export`; and a folder Trainer(run_dir=...) wrote, which the command-line tools refuse
saying what it lacks (no recipe to rebuild the model from) and the way round."""
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


def test_a_mixed_precision_model_saved_from_python_loads_without_trainer_and_exports(trained, tmp_path):
    from trainer.precision import Float32Outputs

    trainer, _ = trained
    assert isinstance(trainer.model, Float32Outputs)
    path = tmp_path / "model.keras"
    trainer.model.save(path)
    np.save(tmp_path / "x.npy", X[:8])
    expected = np.asarray(trainer.model(X[:8], training=False))
    code = ("import sys, keras, numpy as np; "
            f"m = keras.saving.load_model({str(path)!r}); y = m(np.load({str(tmp_path / 'x.npy')!r})); "
            "print('trainer' in sys.modules, y.dtype.name); np.save(sys.argv[1], np.asarray(y))")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "y.npy")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "float32"]  # loaded without trainer; outputs still float32
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), expected)

    out = tmp_path / "exported"
    exported = run_cli(str(path), "--format", "saved_model", "--out", str(out), module="trainer.export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "wrote saved_model" in exported.stdout and "(model.keras)" in exported.stdout
    assert "computes in bfloat16: exporting it in float32" in exported.stdout
    assert "16 seeded random inputs" in exported.stdout and (out / "saved_model.pb").is_file()


def test_a_compiled_wrapper_saves_as_itself_and_says_to_import_trainer(tmp_path, caplog):
    from trainer.precision import Float32Outputs

    model = Float32Outputs(build())
    model.compile(optimizer="sgd", loss="mse")
    model(X[:2])
    with caplog.at_level("WARNING"):
        model.save(tmp_path / "compiled.keras")
    assert "import trainer" in caplog.text and "model.inner.save" in caplog.text
    assert type(keras.saving.load_model(tmp_path / "compiled.keras")).__name__ == "Float32Outputs"


def test_a_python_run_folder_is_refused_saying_it_has_no_recipe_and_the_way_round(trained, tmp_path):
    _, run_dir = trained
    for source in (run_dir, run_dir / "checkpoints", run_dir / "checkpoints" / "ckpt-8"):
        result = run_cli(str(source), "--format", "keras", "--out", str(tmp_path / "x"), module="trainer.export")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "written by Trainer(run_dir=...) from Python" in result.stderr, result.stderr
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
