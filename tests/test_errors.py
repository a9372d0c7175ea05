"""One classification of user errors (trainer/errors.py): every `python -m trainer.*` command says bad input in
one line, exit 2, no traceback, through the same mapping; and the lowest layers import without TensorFlow."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest


def _main(module: str, *args: str, capsys) -> tuple:
    """(exit code, stderr) of `python -m module args`, run by its main() in this process."""
    code = importlib.import_module(module).main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("module, extra", [
    ("trainer.evaluate", ()),
    ("trainer.predict", ("--input", "x.png", "--out", "p.csv")),
    ("trainer.export", ("--out", "exported")),
    ("trainer.convert", ("--policy", "mixed_float16", "--out", "converted")),
])
def test_every_command_says_not_a_run_folder_in_the_same_words(module, extra, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, err = _main(module, str(tmp_path / "empty"), *extra, capsys=capsys)
    assert code == 2, err
    assert f"{tmp_path / 'empty'} is not a run folder (no .hydra/config.yaml)" in err and "Fix:" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_the_doctor_says_not_a_run_folder_in_the_same_words(tmp_path, capsys):
    from trainer.doctor.__main__ import main

    assert main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a run folder (no .hydra/config.yaml)" in err and "Traceback" not in err


@pytest.mark.parametrize("module, args, says", [
    ("trainer.predict", ("run", "--input", "x", "--out", "p.txt"),
     "--out p.txt: the file name must end in .csv or .jsonl (it picks the format)"),
    ("trainer.predict", ("run", "--input", "x", "--out", "p.csv", "--batch-size", "0"), "--batch-size 0: must be >= 1"),
    ("trainer.export", ("run", "--out", "e", "--check-batches", "0"), "--check-batches 0: must be >= 1"),
    ("trainer.convert", ("run", "--policy", "float32", "--out", "c", "--eval-steps", "0"),
     "--eval-steps 0: must be >= 1"),
])
def test_bad_arguments_are_user_errors_through_the_one_mapping(module, args, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _main(module, *args, capsys=capsys)
    assert code == 2 and err.strip() == f"error: {says}"


def test_a_conversion_error_exits_2_with_its_message(tmp_path, capsys):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.save(tmp_path / "m.keras")
    code, err = _main("trainer.convert", str(tmp_path / "m.keras"), "--policy", "float64", "--out", str(tmp_path / "c"),
                      capsys=capsys)
    assert code == 2 and "--policy 'float64' is not one of" in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def test_an_error_wrapped_by_a_builder_maps_through_its_class():
    """A new error type needs no edit in any command: its base gives the exit code, found through the cause chain."""
    from trainer.errors import NumericalFailure, UserError, exit_code_of

    class RecipeError(UserError, ValueError):
        pass

    try:
        try:
            raise RecipeError("bad data.path")
        except RecipeError as inner:
            raise RuntimeError("hydra: error instantiating") from inner
    except RuntimeError as wrapped:
        code, cause = exit_code_of(wrapped)
    assert code == 2 and str(cause) == "bad data.path"
    assert exit_code_of(NumericalFailure("nan"))[0] == 3 and exit_code_of(KeyError("bug")) is None


@pytest.mark.parametrize("module", ["trainer.errors", "trainer.config"])
def test_the_lowest_layers_import_without_tensorflow(module):
    code = f"import {module}, sys; assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_tensorflow_loads_quietly_whoever_loads_it_first():
    """`import trainer` no longer loads TensorFlow, yet a trainer module or the user's own `import tensorflow`
    after it still keeps TensorFlow's C++ start-up lines off stderr (TRAINER_TF_LOGS=1 shows them)."""
    code = ("import trainer.config, tensorflow as tf; tf.config.list_physical_devices('GPU'); "
            "print(tf.__loader__ is tf.__spec__.loader)")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stdout.strip() == "True", quiet.stderr[-2000:]
    assert quiet.stderr.strip() == ""
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "TRAINER_TF_LOGS": "1", "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert shown.returncode == 0 and shown.stderr.strip() != ""  # the lines exist: the quiet run hid them


@pytest.mark.slow
def test_a_probe_for_tensorflow_is_not_its_import_and_submodules_are_attributes():
    """mlflow and etils probe with importlib.util.find_spec: the later real import is still quiet. And
    `import trainer` alone gives `trainer.callbacks`, `trainer.config`, ... as attributes, as before."""
    code = ("import trainer, importlib.util; importlib.util.find_spec('tensorflow'); import tensorflow; "
            "print(' '.join(getattr(trainer, m).__name__ for m in ('callbacks', 'config', "
            "'core', 'checkpoint', 'data')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["trainer.callbacks", "trainer.config", "trainer.core", "trainer.checkpoint",
                                     "trainer.data"]
    assert result.stderr.strip() == ""
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        import trainer
        trainer.no_such_name


def test_the_old_module_names_still_import_their_public_names():
    """trainer.core and trainer.compile were renamed trainer.trainer and trainer.step_functions: a user's
    `from trainer.core import Trainer` gets the same class, and the log channel keeps its name."""
    import logging

    import trainer
    from trainer import step_functions, xla_plan
    from trainer.compile import XlaPlan, decide_jit_compile, make_eval_function, make_train_function, plan_xla
    from trainer.core import NumericalError, Trainer, TrainingInterrupted

    assert (Trainer, NumericalError, TrainingInterrupted) == (trainer.Trainer, trainer.NumericalError,
                                                                trainer.TrainingInterrupted)
    assert (make_train_function, make_eval_function) == (step_functions.make_train_function,
                                                         step_functions.make_eval_function)
    assert (XlaPlan, decide_jit_compile, plan_xla) == (xla_plan.XlaPlan, xla_plan.decide_jit_compile, xla_plan.plan_xla)
    assert sys.modules["trainer.trainer"].log is logging.getLogger("trainer.core")


@pytest.mark.parametrize("imports", ["trainer, keras", "keras, trainer"])
def test_a_keras_file_with_trainers_classes_loads_after_import_trainer(imports, tmp_path):
    """A .keras file naming Float32Outputs and a Warmup schedule loads in a fresh process after a plain
    `import trainer`, whichever of trainer and Keras is imported first."""
    import keras

    from trainer.optim import Warmup
    from trainer.precision import Float32Outputs

    inputs = keras.Input((3,))
    model = Float32Outputs(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(Warmup(0.1, 5)), loss="mse")
    model(keras.ops.zeros((1, 3)))
    model.save(tmp_path / "f32.keras")
    code = (f"import {imports}; m = keras.saving.load_model({str(tmp_path / 'f32.keras')!r}); "
            "print(type(m).__name__, type(m.optimizer._learning_rate).__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["Float32Outputs", "Warmup"]


def test_a_missing_run_is_still_a_serving_error(tmp_path):
    """load_run's missing-folder error is a RunNotFound, which `except ServingError` (as before) and
    `except FileNotFoundError` both catch."""
    from trainer.runs import RunNotFound, ServingError, load_run

    for caught in (ServingError, FileNotFoundError, RunNotFound):
        with pytest.raises(caught, match="is not a run folder"):
            load_run(str(tmp_path))


def test_a_trainer_option_copied_from_the_old_default_still_composes(tmp_path):
    """conf/trainer/*.yaml of users' own that name `base_trainer` (as the shipped default does, like
    `base_precision` and `base_strategy`) compose, and their values apply."""
    from hydra import compose, initialize_config_module

    from trainer.assemble import register_configs

    (tmp_path / "trainer").mkdir()
    (tmp_path / "trainer" / "mine.yaml").write_text("defaults:\n  - base_trainer\n  - _self_\nkeep_checkpoints: 7\n")
    register_configs()
    with initialize_config_module("trainer.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "trainer=mine"])
    assert cfg.trainer.keep_checkpoints == 7
