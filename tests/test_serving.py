"""Serving a trained run: trainer.evaluate, Trainer.predict, trainer.predict, trainer.export's formats
and trainer.convert's eval-set check, all against ONE tiny real Fashion-MNIST run (module fixture).

Each command runs once as a real subprocess (exit code, no traceback); its other cases call the same
`main(argv)` in this process, which spares a TensorFlow start-up (~6 CPU-seconds) per case."""
import csv
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY, read_metrics, run_cli

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_trainer_predict_on_two_replicas_ragged_last_batch_and_dict_outputs():
    from trainer import Trainer

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:  # first in this file: before anything here initializes TensorFlow's devices
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:  # already initialized (another test file ran first in this process)
        pass
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("two logical CPUs must be configured before TensorFlow initializes")

    def build():
        x = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu")(x)
        return keras.Model(x, {"a": keras.layers.Dense(2)(h), "b": keras.layers.Dense(1)(h)})

    x = np.random.default_rng(0).normal(size=(37, 4)).astype("float32")
    trainer = Trainer(model=build, loss=None, optimizer=keras.optimizers.SGD,
                      strategy=tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"]))
    expected = trainer.model(x)
    out = trainer.predict(x, batch_size=8)  # 4 full batches and one of 5, split over 2 replicas
    labelled = trainer.predict(tf.data.Dataset.from_tensor_slices((x, np.zeros(37))).batch(10))
    batches = trainer.predict(iter([x[:5], x[5:9]]))
    for name in ("a", "b"):
        np.testing.assert_allclose(out[name], expected[name].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(labelled[name], expected[name].numpy(), rtol=1e-5, atol=1e-6)
    assert batches["a"].shape == (9, 2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny MLP trained 40 steps, evaluated and checkpointed at steps 20 and 40 (best/ kept)."""
    folder = tmp_path_factory.mktemp("serving") / "run"
    overrides = [o for o in TINY if not o.startswith("trainer.eval_every")]
    result = run_cli("recipe=mnist", *overrides, "trainer.eval_every=20", "model.hidden_units=[32]",
                     f"hydra.run.dir={folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def in_process(module: str, *args: str, capsys) -> tuple:
    """(exit code, stdout, stderr) of `python -m module args`, run by its main() in this process."""
    import importlib

    code = importlib.import_module(module).main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _eval_logged(run_dir, step):
    return next(r for r in read_metrics(run_dir) if r["split"] == "eval" and r["step"] == step)


def test_evaluate_reproduces_trainings_eval_of_each_checkpoint_and_touches_nothing(run_dir, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    latest = run_cli(str(run_dir), module="trainer.evaluate")
    assert latest.returncode == 0, latest.stderr[-2000:]
    out = tmp_path / "ckpt20.json"
    code, stdout, stderr = in_process("trainer.evaluate", str(run_dir), "--checkpoint", "ckpt-20", "--out", str(out),
                                      capsys=capsys)
    assert code == 0, stderr
    for record, step in ((json.loads((run_dir / "eval" / "ckpt-40.json").read_text()), 40),
                         (json.loads(out.read_text()), 20)):
        logged = _eval_logged(run_dir, step)
        assert record["step"] == step
        assert record["metrics"]["accuracy"] == pytest.approx(logged["accuracy"], abs=1e-6)
        assert record["metrics"]["loss"] == pytest.approx(logged["loss"], rel=1e-5)
    assert "accuracy=" in stdout and "accuracy=" in latest.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and p.parent != run_dir / "eval"}
    assert after == before  # nothing of the run changed: only RUN/eval/ was added

    # best = the best/ copy; a data override changes what is evaluated.
    code, _, stderr = in_process("trainer.evaluate", str(run_dir), "--checkpoint", "best", "trainer.eval_steps=2",
                                 "data.batch_size=32", capsys=capsys)
    assert code == 0, stderr
    record = json.loads((run_dir / "eval" / "best-ckpt-40.json").read_text())
    assert record["overrides"] == ["trainer.eval_steps=2", "data.batch_size=32"] and record["eval_steps"] == 2
    # 64 examples, not 640
    assert record["metrics"]["accuracy"] != pytest.approx(_eval_logged(run_dir, 40)["accuracy"], abs=1e-9)


def test_evaluate_user_errors_say_the_fix(run_dir, tmp_path):
    from trainer.evaluate import ServingError, load_run

    for args, message in [
        (("ckpt-7",), "ckpt-20"),  # lists the checkpoints there are
        (("latest", ["model.hidden_units=[8]"]), "data.* or trainer.*"),
        (("latest", ["trainer.eval_steps=0"]), "trainer.eval_steps"),
        (("latest", ["data.nope=1"]), "batch_size"),
    ]:
        with pytest.raises(ServingError, match=message.replace("*", r"\*").replace(".", r"\.")):
            load_run(str(run_dir), *args)
    result = run_cli(str(tmp_path), module="trainer.evaluate")  # the CLI: exit 2, one line, no traceback
    assert result.returncode == 2 and "not a run folder" in result.stderr and "Traceback" not in result.stderr


def test_evaluates_overrides_are_checked_as_python_m_trainer_checks_them(run_dir, capsys):
    """A misspelt key listed the section's keys without the one meant; no argument said "required: run, overrides"
    though overrides are optional."""
    code, _, stderr = in_process("trainer.evaluate", str(run_dir), "trainer.eval_stepz=3", capsys=capsys)
    assert code == 2
    assert ("trainer.eval_stepz=3: trainer has no key 'eval_stepz'. Fix: did you mean trainer.eval_steps=3? "
            "(max_steps,") in stderr
    code, _, stderr = in_process("trainer.evaluate", "trainer.eval_steps=3", capsys=capsys)  # the run forgotten
    assert code == 2 and "not a run folder" in stderr
    with pytest.raises(SystemExit) as exited:
        in_process("trainer.evaluate", capsys=capsys)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "required: run (a run folder" in err and "run, overrides" not in err


def test_predict_cli_on_real_fashion_mnist_images_equals_trainer_predict(run_dir, tmp_path, capsys):
    from PIL import Image

    from trainer.data import read_idx
    from trainer.evaluate import load_run, trainer_for
    from trainer.recipes.images import FASHION_MNIST_CLASSES

    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")[:5]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(inputs / f"item{i}.png")
    np.save(inputs / "stack.npy", images[:3])
    out = tmp_path / "predictions.csv"
    result = run_cli(str(run_dir), "--input", str(inputs), "--out", str(out), "--batch-size", "4",
                     module="trainer.predict")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [r["input"] for r in rows] == ([f"item{i}.png" for i in range(5)]
                                          + ["stack.npy[0]", "stack.npy[1]", "stack.npy[2]"])

    trainer = trainer_for(load_run(str(run_dir)))
    logits = trainer.predict(images.astype("float32") / 255.0, batch_size=2)  # the recipe's scaling
    np.testing.assert_allclose(logits, trainer.model(images.astype("float32") / 255.0).numpy(), rtol=1e-5, atol=1e-5)
    expected = tf.nn.softmax(logits).numpy()
    for row, p in zip(rows, np.concatenate([expected, expected[:3]])):
        assert row["class"] == FASHION_MNIST_CLASSES[int(np.argmax(p))] and int(row["class_index"]) == int(np.argmax(p))
        got = np.array([float(row[f"p_{name}"]) for name in FASHION_MNIST_CLASSES])
        np.testing.assert_allclose(got, p, rtol=1e-4, atol=1e-6)

    jsonl = tmp_path / "p.jsonl"
    assert in_process("trainer.predict", str(run_dir), "--input", str(inputs / "item0.png"), "--out", str(jsonl),
                      capsys=capsys)[0] == 0
    (line,) = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert line["input"] == "item0.png" and sum(line["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    from trainer.evaluate import ServingError
    from trainer.predict import input_files

    with pytest.raises(ServingError, match="no such file or folder"):
        input_files(str(tmp_path / "none"))


@pytest.mark.parametrize("fmt", ["saved_model", "keras", "onnx", "tflite"])
def test_export_each_format_is_loaded_back_and_checked(run_dir, tmp_path, fmt, capsys):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / fmt
    code, stdout, stderr = in_process("trainer.export", str(run_dir), "--format", fmt, "--out", str(out),
                                      "--checkpoint", "best", capsys=capsys)
    assert code == 0, stderr
    assert "checked: loaded back, 128 eval examples" in stdout and "best-ckpt-40" in stdout
    assert float(stdout.split("relative ")[1].split()[0]) <= 1e-4
    assert any(p.is_file() for p in out.rglob("*"))


def test_export_of_a_run_stopped_before_its_end_says_so(run_dir, tmp_path, capsys):
    """A run stopped at step 40 of 100 (its config says 100) exported with exit 0 and only "step 40" shown."""
    import shutil

    stopped = tmp_path / "stopped"
    shutil.copytree(run_dir, stopped)
    config = stopped / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("max_steps: 40", "max_steps: 100"))
    code, stdout, stderr = in_process("trainer.export", str(stopped), "--format", "keras", "--out",
                                      str(tmp_path / "out"), capsys=capsys)
    assert code == 0, stderr
    assert "note: ckpt-40 is step 40 of the run's 100 (trainer.max_steps): the run stopped before its end" in stdout
    code, stdout, _ = in_process("trainer.export", str(run_dir), "--format", "keras", "--out", str(tmp_path / "done"),
                                 capsys=capsys)
    assert code == 0 and "note:" not in stdout  # a finished run


def test_export_without_its_packages_exits_2_with_the_pip_command(run_dir, tmp_path, capsys, monkeypatch):
    from trainer import export_formats

    # As if onnxruntime were not installed: a module name that no environment has.
    monkeypatch.setitem(export_formats.NEEDS, "onnx", [("onnxruntime_is_not_installed", "onnxruntime==1.31.1")])
    code, _, stderr = in_process("trainer.export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x"),
                                 capsys=capsys)
    assert code == 2 and 'pip install -e ".[export]"' in stderr and "pip install onnxruntime==1.31.1" in stderr
    assert not (tmp_path / "x").exists()
    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["export"]
    monkeypatch.undo()
    # the pins the message gives
    assert {pin for needs in export_formats.NEEDS.values() for _, pin in needs} <= set(extra)


def test_export_beyond_tolerance_exits_3(run_dir, tmp_path):
    # float16 compute against the float32 model: about 1e-3 apart, far more than 1e-12.
    result = run_cli(str(run_dir), "--format", "keras", "--policy", "mixed_float16", "--tolerance", "1e-12",
                     "--out", str(tmp_path / "x"), module="trainer.export")
    assert result.returncode == 3 and "does not reproduce" in result.stderr and "Traceback" not in result.stderr
    assert "it was removed, nothing is in" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no unchecked model in --out or beside it"


def test_an_export_killed_before_its_check_leaves_only_a_sibling_the_next_export_removes(run_dir, tmp_path):
    out = tmp_path / "x"
    left = tmp_path / "x.export-unchecked"  # as a SIGKILL between the write and the check leaves it
    (left / "variables").mkdir(parents=True)
    (left / "saved_model.pb").write_bytes(b"half")
    result = run_cli(str(run_dir), "--out", str(out), module="trainer.export")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"removed {left}: an earlier export of {out} was stopped before its check" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"] and (out / "saved_model.pb").stat().st_size > 4
    assert f"wrote saved_model {out} " in result.stdout


@pytest.mark.parametrize("given", ["empty folder", "symlink to one", "."])
def test_an_export_to_an_existing_empty_folder_is_written_inside_it(run_dir, tmp_path, given, capsys, monkeypatch):
    # A mount point, a symlink's target and `.` cannot be replaced by a rename: the export is staged inside them.
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".export-unchecked" / "variables").mkdir(parents=True)  # an interrupted export's, inside
    out = {"empty folder": str(folder), "symlink to one": str(tmp_path / "link"), ".": "."}[given]
    if given == "symlink to one":
        (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(folder)
    code, stdout, stderr = in_process("trainer.export", str(run_dir), "--out", out, capsys=capsys)
    assert code == 0, stderr
    assert f"removed {folder / '.export-unchecked'}: an earlier export" in stdout
    assert f"wrote saved_model {out} " in stdout and (folder / "saved_model.pb").stat().st_size > 4
    assert not (folder / ".export-unchecked").exists() and sorted(p.name for p in tmp_path.iterdir()) == (
        ["link", "out"] if given == "symlink to one" else ["out"])


@pytest.mark.parametrize("into", ["new", "empty folder"])
def test_a_refused_move_into_place_removes_the_export_in_one_line(run_dir, tmp_path, into, capsys, monkeypatch):
    import errno
    import os

    out = tmp_path / "x"
    if into == "empty folder":
        out.mkdir()

    def refused(source, target):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(source))

    monkeypatch.setattr("trainer.export.os.replace", refused)
    code, _, stderr = in_process("trainer.export", str(run_dir), "--out", str(out), capsys=capsys)
    assert code == 2 and "Traceback" not in stderr
    assert f"could not be moved to {out}: {os.strerror(errno.EBUSY)}" in stderr and "Fix: " in stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == (["x"] if into == "empty folder" else [])


def test_convert_reports_the_recipes_metrics_before_and_after_on_eval_data(run_dir, tmp_path, capsys):
    out = tmp_path / "converted"
    result = run_cli(str(run_dir), "--policy", "mixed_bfloat16", "--eval-steps", "5", "--out", str(out),
                     module="trainer.convert")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "conversion.json").read_text())
    assert report["inputs"] == "a batch of the recipe's eval split"
    assert set(report["eval_before"]) == set(report["eval_after"]) == {"loss", "accuracy"}
    assert abs(report["eval_before"]["accuracy"] - report["eval_after"]["accuracy"]) <= 0.05
    assert report["eval_before"]["accuracy"] > 0.2  # a trained model on real data: not a constant guess
    from trainer.export import load_trained_model

    load_trained_model(str(run_dir))[0].save(tmp_path / "trained.keras")
    code, _, stderr = in_process("trainer.convert", str(tmp_path / "trained.keras"), "--policy", "mixed_float16",
                                 "--out", str(tmp_path / "back"), capsys=capsys)
    assert code == 0, stderr
    back = json.loads((tmp_path / "back" / "conversion.json").read_text())
    assert back["inputs"].startswith("8 seeded random inputs") and back["max_abs_error"] > 0  # not all-zero inputs


def test_transformer_predict_inputs_tokenize_as_training_in_order(tmp_path):
    pytest.importorskip("keras_hub")
    from trainer.recipes import text, transformer

    lines = tmp_path / "words.txt"
    lines.write_text("hello world\n\nbonjour le monde\nguten tag\n")
    cfg = {"preset": transformer.DEFAULT_PRESET, "max_length": 16, "languages": ["en", "fr", "de"],
           "_target_": "trainer.recipes.text.build_wordlist_data"}
    names, batches = text.predict_inputs([lines], cfg, batch_size=2)
    assert names == ["words.txt:1", "words.txt:3", "words.txt:4"] and text.class_names(cfg) == ["en", "fr", "de"]
    tokenizer = transformer.load_tokenizer(transformer.DEFAULT_PRESET)
    got = np.concatenate([x["token_ids"].numpy() for x, _ in batches])
    for row, line in zip(got, ["hello world", "bonjour le monde", "guten tag"]):
        ids = [int(tokenizer.cls_token_id), *np.asarray(tokenizer(line)).tolist(), int(tokenizer.sep_token_id)]
        assert row[: len(ids)].tolist() == ids and not row[len(ids):].any()  # [CLS] words [SEP], then padding


def test_trainer_predict_uses_the_ema_averages_as_evaluate_does():
    """With use_ema=True, Trainer.predict gives the model's outputs under the averaged weights (what
    evaluate, best/, export and python -m trainer.predict use), not the raw weights'; and puts them back."""
    from conftest import blobs

    from trainer import Trainer
    from trainer.ema import averaged_weights

    def build():
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2)])

    trainer = Trainer(build, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      lambda: keras.optimizers.Adam(1e-2, use_ema=True, ema_momentum=0.9),
                      max_steps=30, log_every=10, progress_bar=False, best_metric=None)
    trainer.fit(blobs())
    x = np.concatenate([b[0].numpy() for b in blobs()])
    raw = trainer.model(x).numpy()
    with averaged_weights(trainer) as averaged:
        assert averaged
        under_averages = trainer.model(x).numpy()
    predicted = trainer.predict(x)
    np.testing.assert_allclose(predicted, under_averages, rtol=1e-5, atol=1e-6)
    assert np.abs(predicted - raw).max() > 1e-3
    np.testing.assert_array_equal(trainer.model(x).numpy(), raw)  # training goes on from the raw weights


def test_evaluate_records_the_batches_a_fraction_limit_used(run_dir, tmp_path, capsys):
    """trainer.limit_eval_batches=0.5: the JSON's eval_steps is the number of batches evaluated (half the
    eval set's), not null."""
    import tensorflow as tf

    from trainer.data import build_data
    from trainer.evaluate import load_run

    out = tmp_path / "half.json"
    code, _, stderr = in_process("trainer.evaluate", str(run_dir), "trainer.eval_steps=null",
                                 "trainer.limit_eval_batches=0.5", "--out", str(out), capsys=capsys)
    assert code == 0, stderr
    data = build_data(load_run(str(run_dir)).cfg.data)
    batches = int(data.eval(tf.distribute.InputContext()).cardinality())
    assert batches > 2 and json.loads(out.read_text())["eval_steps"] == int(0.5 * batches)


def test_export_tolerance_zero_is_zero_and_negative_is_a_user_error(run_dir, tmp_path, capsys):
    code, _, stderr = in_process("trainer.export", str(run_dir), "--format", "keras", "--tolerance", "-1",
                                 "--out", str(tmp_path / "neg"), capsys=capsys)
    assert code == 2 and "--tolerance -1.0: must be >= 0" in stderr and not (tmp_path / "neg").exists()
    code, stdout, stderr = in_process("trainer.export", str(run_dir), "--format", "keras", "--tolerance", "0",
                                      "--out", str(tmp_path / "zero"), capsys=capsys)
    assert code == 0 and stdout.strip().endswith("(tolerance 0)"), (code, stdout, stderr)  # not the default 1e-4


def test_predict_inputs_are_read_batch_by_batch_and_a_bad_file_is_a_user_error(run_dir, tmp_path, capsys):
    """The mnist recipe's predict_inputs decodes a batch when it is consumed (a folder larger than memory
    works): the first batch reads before a broken file further on; the CLI then says which error, exit 2."""
    from PIL import Image

    from trainer.recipes import mnist

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(3):
        Image.fromarray(np.full((28, 28), 40 * i, np.uint8)).save(inputs / f"a{i}.png")
    np.save(inputs / "b.npy", np.zeros((3, 28, 28), np.uint8))
    (inputs / "c.png").write_bytes(b"not an image")
    paths = sorted(inputs.iterdir())
    names, batches = mnist.predict_inputs(paths, {}, batch_size=2)
    assert names == ["a0.png", "a1.png", "a2.png", "b.npy[0]", "b.npy[1]", "b.npy[2]", "c.png"]
    assert not isinstance(batches, np.ndarray)
    first = next(batches)
    assert first.shape == (2, 28, 28) and first[1].max() == pytest.approx(40 / 255)
    assert next(batches).shape == next(batches).shape == (2, 28, 28)  # [a2.png, b.npy[0]], [b.npy[1], b.npy[2]]
    with pytest.raises(tf.errors.InvalidArgumentError):
        next(batches)  # c.png, only now

    out = tmp_path / "p.csv"
    code, _, stderr = in_process("trainer.predict", str(run_dir), "--input", str(inputs), "--out", str(out),
                                 capsys=capsys)
    assert code == 2 and stderr.startswith("error: ") and "Traceback" not in stderr and not out.exists(), stderr


def test_export_takes_the_keras_file_it_wrote_by_a_relative_path(run_dir, tmp_path, capsys, monkeypatch):
    """The trial's refusal of runs/exp/keras/model.keras ("not ... a .keras file"): a .keras file is exported,
    checked on seeded random inputs (it carries no data)."""
    code, _, stderr = in_process("trainer.export", str(run_dir), "--format", "keras", "--out", str(tmp_path / "k"),
                                 capsys=capsys)
    assert code == 0, stderr
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = in_process("trainer.export", "k/model.keras", "--format", "saved_model", "--out", "sm",
                                      capsys=capsys)
    assert code == 0, stderr
    assert "wrote saved_model sm (model.keras)" in stdout and "16 seeded random inputs" in stdout
    assert (tmp_path / "sm" / "saved_model.pb").is_file()


@pytest.mark.slow
def test_an_export_prints_tensorflows_log_lines_once(run_dir, tmp_path):
    """TensorFlow gave its logger a handler of its own (it loads before the command's logging is set up): through
    the root's too, "Assets written to" came twice, as `INFO:tensorflow:` and `INFO tensorflow:`. A process of its
    own: TensorFlow decides on that handler when it first loads."""
    out = tmp_path / "saved"
    result = run_cli(str(run_dir), "--format", "saved_model", "--out", str(out), module="trainer.export", process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "Assets written to" in line]
    assert len(lines) == 1 and lines[0].startswith("INFO tensorflow: Assets written to: "), lines  # staged, then moved
