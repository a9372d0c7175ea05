"""trainer.plot: curves of runs from their metrics.jsonl, read back from the PNG and the figure it draws.

The runs here are metrics.jsonl files written as the Trainer writes them (tests/test_sweep_optuna.py plots
the folders of a real sweep)."""
import json
import sys

import pytest

from trainer.plot import main, plot_runs


def write_run(folder, rows, overrides=None, config=None):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if overrides is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if config is not None:  # as trainer/cli.py records the composed config
        (folder / ".hydra" / "config.yaml").write_text(json.dumps(config))
    return folder


def rows_of(loss_scaling: bool):
    rows = []
    for step in (10, 20, 30):
        row = {"step": step, "split": "train", "loss": 2.0 / step, "accuracy": step / 40, "examples_per_sec": 900.0,
               "grad_norm": 1.0, "lr": 1e-3, "skipped_steps": (1 if step > 10 else 0) if loss_scaling else 0,
               "time": 1.0 * step}
        if loss_scaling:
            row["loss_scale"] = 2.0 ** (15 - step // 10)
        rows.append(row)
        if step % 20 == 0 or step == 30:
            rows.append({"step": step, "split": "eval", "loss": 2.5 / step, "accuracy": step / 50, "time": 1.0 * step})
    return rows


def lines_by_panel(fig):
    return {ax.get_ylabel(): [line.get_label() for line in ax.get_lines()] for ax in fig.get_axes()}


def test_runs_are_drawn_train_and_eval_by_their_overrides_with_loss_scaling_panels(tmp_path):
    import matplotlib.image

    a = write_run(tmp_path / "a", rows_of(False), ["precision=float32", "trainer.max_steps=30"])
    b = write_run(tmp_path / "b", rows_of(True), ["precision=mixed_float16", "trainer.max_steps=30"])
    panels = lines_by_panel(plot_runs([str(a), str(b)]))
    assert list(panels) == ["loss", "accuracy", "loss_scale", "skipped_steps"]  # speed, lr, grad_norm are not curves
    both = ["precision=float32 train", "precision=float32 eval", "precision=mixed_float16 train",
            "precision=mixed_float16 eval"]
    assert panels["loss"] == both and panels["accuracy"] == both  # the shared override is left out of the names
    assert panels["loss_scale"] == ["precision=mixed_float16 train"]
    assert panels["skipped_steps"] == ["precision=float32 train", "precision=mixed_float16 train"]
    loss_axis = plot_runs([str(b)]).get_axes()[0]
    train, evals = loss_axis.get_lines()
    assert list(train.get_xdata()) == [10, 20, 30] and list(evals.get_ydata()) == [2.5 / 20, 2.5 / 30]

    out = tmp_path / "runs.png"
    main([str(a), str(b), "--out", str(out)])
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (1020, 800)  # 4 panels of 2.4 in + 0.6 in for the legend, 8 in wide, at 100 dpi
    colours = {tuple(px) for px in image[::7, ::7, :3].reshape(-1, 3).round(2).tolist()}
    assert image[..., :3].std() > 0.05 and len(colours) > 20  # curves, text and grid, not a blank canvas


def test_a_multirun_folder_stands_for_its_jobs_and_runs_without_loss_scaling_have_no_such_panels(tmp_path):
    sweep = tmp_path / "multirun"
    for name in ("10_optimizer.lr=0.01", "2_optimizer.lr=0.1"):  # no .hydra: the folder names the run
        write_run(sweep / name, rows_of(False))
    (sweep / "sweep_summary.csv").write_text("job\n")
    panels = lines_by_panel(plot_runs([str(sweep)]))
    assert list(panels) == ["loss", "accuracy"]  # skipped_steps is 0 throughout: no panel
    assert panels["loss"] == ["2_optimizer.lr=0.1 train", "2_optimizer.lr=0.1 eval",
                              "10_optimizer.lr=0.01 train", "10_optimizer.lr=0.01 eval"]  # in job order


def test_bad_input_exits_2_with_the_fix_and_writes_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs.png"
    (tmp_path / "empty").mkdir()
    write_run(tmp_path / "fresh", [])  # a run that has not logged yet

    def fails(*args):
        with pytest.raises(SystemExit) as exit_:
            main([*args, "--out", str(out)])
        assert exit_.value.code == 2 and not out.exists()
        return capsys.readouterr().err

    assert "is not a folder. Fix: give a run folder" in fails(str(tmp_path / "nowhere"))
    empty = fails(str(tmp_path / "empty"))
    assert "has no metrics.jsonl (nor metrics.csv or tensorboard/), nor subfolders with one" in empty
    assert "hold no logs yet" in fails(str(tmp_path / "fresh"))
    run = write_run(tmp_path / "run", rows_of(False))
    with pytest.raises(SystemExit) as exit_:
        main([str(run), "--out", str(tmp_path / "no" / "such" / "folder.png")])
    assert exit_.value.code == 2 and "cannot write" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as when matplotlib is not installed
    assert "needs matplotlib, which is not installed. Fix: pip install -e '.[bench]'" in fails(str(run))


def test_long_names_wrap_below_the_panels_are_keyed_when_cut_and_a_single_point_has_a_marker(tmp_path, capsys):
    """Legends of long override lists stayed on one line, off the figure; a one-event run drew nothing."""
    import matplotlib.image

    shared = ["recipe=mnist"]
    long_a = [f"model.hidden_{i}=12{i}" for i in range(6)]  # about 100 characters: two lines
    long_b = [f"optimizer.option_number_{i}=0.00{i}" for i in range(9)]  # more than 3 lines: cut to #2
    a = write_run(tmp_path / "a", rows_of(False), shared + long_a)
    b = write_run(tmp_path / "b", rows_of(False)[:1], shared + long_b)  # one train log event
    fig = plot_runs([str(a), str(b)])
    names = [line.get_label() for line in fig.get_axes()[0].get_lines()]
    assert names[0].startswith("model.hidden_0=120,") and "\n" in names[0] and "recipe=mnist" not in names[0]
    assert all(len(line) <= 60 for name in names for line in name.split("\n")[:-1])
    assert names[2].startswith("#2: optimizer.option_number_0=0.000") and "\n" not in names[2]
    single = fig.get_axes()[0].get_lines()[2]
    assert list(single.get_xdata()) == [10] and single.get_marker() == "o"  # drawn, as a dot
    out = tmp_path / "long.png"
    main([str(a), str(b), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "#2: " + ",".join(long_b) in printed  # the key: the whole name
    image = matplotlib.image.imread(out)
    assert image.shape[1] == 800 and image.shape[0] > 540  # 2 panels, 0.6 in, and room for the wrapped names
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.draw(renderer := FigureCanvasAgg(fig).get_renderer())  # constrained layout places the legend
    legend = fig.legends[0].get_window_extent(renderer)
    assert legend.x0 >= 0 and legend.x1 <= fig.bbox.width and legend.y0 >= 0  # inside the figure


def test_a_run_without_metrics_jsonl_is_plotted_from_its_csv_or_tensorboard_logs(tmp_path):
    import shutil

    import keras

    from conftest import blobs
    from trainer import CSVLogger, MetricsWriter, TensorBoardWriter, Trainer
    from trainer.plot import load_runs

    run = tmp_path / "run"
    Trainer(model=lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            optimizer=lambda: keras.optimizers.SGD(0.1),
            run_dir=run, log_every=5, eval_every=10, eval_steps=2, progress_bar=False, best_metric=None,
            loggers=[MetricsWriter(), CSVLogger(), TensorBoardWriter()]).fit(blobs(), blobs(), steps=20)
    expected = load_runs([str(run)])[0]
    csv_only, tensorboard_only = tmp_path / "csv", tmp_path / "tb"
    shutil.copytree(run, csv_only, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"))
    shutil.copytree(run, tensorboard_only, ignore=shutil.ignore_patterns("metrics.jsonl", "metrics.csv"))
    for folder in (csv_only, tensorboard_only):
        got = load_runs([str(folder)])[0]
        for split in ("train", "eval"):
            steps, losses = got.series(split, "loss")
            assert steps == expected.series(split, "loss")[0] and steps, (folder, split, steps)
            assert losses == pytest.approx(expected.series(split, "loss")[1], rel=1e-6)


def test_histograms_images_and_text_in_the_tensorboard_files_are_skipped(tmp_path):
    """A user's own tf.summary calls write histograms, images and text beside the scalars; reading the
    TensorBoard files (a run without metrics.jsonl or metrics.csv) failed on them (float() of a tensor)."""
    import numpy as np
    import tensorflow as tf

    from trainer.plot import load_runs

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("[]\n")
    writer = tf.summary.create_file_writer(str(run / "tensorboard" / "train"))
    with writer.as_default():
        for step in (5, 10):
            tf.summary.scalar("loss", 1.0 / step, step=step)
            tf.summary.histogram("weights", np.arange(12.0), step=step)
            tf.summary.image("inputs", np.zeros((1, 4, 4, 1), np.float32), step=step)
            tf.summary.text("note", "a string", step=step)
    writer.close()
    with tf.compat.v1.Graph().as_default():  # a TF1 histogram: no simple_value, which read as 0.0
        v1 = tf.compat.v1.summary.FileWriter(str(run / "tensorboard" / "train"))
        histogram = tf.compat.v1.HistogramProto(min=0.0, max=1.0)
        v1.add_summary(tf.compat.v1.Summary(value=[tf.compat.v1.Summary.Value(tag="old_histo", histo=histogram)]), 5)
        v1.close()
    got = load_runs([str(run)])[0]
    assert got.series("train", "loss") == ([5, 10], [pytest.approx(0.2), pytest.approx(0.1)])
    assert all(set(row) <= {"step", "split", "loss"} for row in got.rows), got.rows


def test_steps_logged_twice_after_a_resume_are_drawn_once_with_their_last_value(tmp_path):
    """A run killed between a log and the next save logs the steps after that save again (docs/loggers.md):
    the curve keeps one point per step, the rerun's, instead of drawing back to the resume step."""
    from trainer.plot import load_runs

    first = [{"step": s, "split": "train", "loss": 1.0 / s} for s in (10, 20, 30)]
    rerun = [{"step": s, "split": "train", "loss": 2.0 / s} for s in (20, 30, 40)]
    run = write_run(tmp_path / "run", first + rerun)
    steps, losses = load_runs([str(run)])[0].series("train", "loss")
    assert steps == [10, 20, 30, 40]
    assert losses == pytest.approx([0.1, 0.1, 2.0 / 30, 0.05])


def test_a_changing_learning_rate_has_a_panel_and_names_say_what_differs_shortest_first(tmp_path):
    """A plateau's reduction (1e-3 -> 1e-4 at step 30) is drawn on a log-scale lr panel; each run is named by
    the config values that differ (not by every override it was given: the shared trainer.log_every, the
    progress bar that changes nothing), the shortest first."""
    reduced = rows_of(False)
    for row in reduced:
        if row["split"] == "train" and row["step"] == 30:
            row["lr"] = 1e-4
    base = {"optimizer": {"lr": 0.001}, "trainer": {"max_steps": 30, "log_every": 10, "progress_bar": True}}
    a = write_run(tmp_path / "a", reduced,
                  ["model.hidden_units=[64,64]", "trainer.log_every=10", "trainer.progress_bar=false"],
                  {**base, "trainer": {**base["trainer"], "progress_bar": False},
                   "model": {"hidden_units": [64, 64], "dropout": True}})
    b = write_run(tmp_path / "b", rows_of(False), ["trainer.log_every=10", "optimizer.lr=0.01"],
                  {**base, "optimizer": {"lr": 0.01}, "model": {"hidden_units": [128], "dropout": True}})
    fig = plot_runs([str(a), str(b)])
    panels = lines_by_panel(fig)
    assert list(panels) == ["loss", "accuracy", "lr"]
    assert panels["lr"] == ["optimizer.lr=0.001,model.hidden_units=[64,64] train",
                            "optimizer.lr=0.01,model.hidden_units=[128] train"]
    lr_axis = fig.get_axes()[2]
    assert lr_axis.get_yscale() == "log" and list(lr_axis.get_lines()[0].get_ydata()) == [1e-3, 1e-3, 1e-4]
