"""Smoke test of benchmarks/bench.py: one tiny cell end to end, checking what it reports, not how fast."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_one_cell(tmp_path):
    out = tmp_path / "bench"
    proc = run_script(  # in this process (tests/cli_runner.py): the report is tested, not the start-up
        ROOT / "benchmarks" / "bench.py",
        ["--quick", "--workloads", "mlp", "--precisions", "float32", "--xla", "off", "--steps-per-loop", "2", "--out",
         out],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Goals (issue #4)" in proc.stdout and "Synthetic data" in proc.stdout

    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0
    assert report["meta"]["quick"] is True and report["meta"]["data"].startswith("synthetic")
    assert report["matmul_peak_gflops"]["float32"]["gflops"] > 0
    assert report["workloads"]["mlp"]["train_flops_per_example"] > 0
    ceiling = report["mlp_matmul_ceiling_gflops"]["float32"]
    assert set(ceiling["by_xla_gflops"]) == {"xla=off", "xla=on"} and ceiling["gflops"] > 0
    assert "MLP's training matmuls alone" in proc.stdout

    rows = report["results"]
    assert sorted(r["runner"] for r in rows) == ["fit", "hand", "trainer"]
    for r in rows:
        assert (r["workload"], r["precision"], r["xla"], r["steps_per_loop"]) == ("mlp", "float32", False, 2)
        assert r["steps"] % 2 == 0 and len(r["examples_per_sec"]) == r["repeats"] >= 1
        assert r["examples_per_sec_median"] > 0 and r["achieved_gflops"] > 0 and 0 < r["mfu"]
        assert r["time_to_first_step_s"] >= r["first_call_s"] > 0
        assert r["peak_mem_mb"] > 0
        assert r["vs_hand"] > 0 and r["vs_fit"] > 0
        assert r["ceiling_gflops"] == ceiling["by_xla_gflops"]["xla=off"]
        assert abs(r["of_ceiling"] * r["ceiling_gflops"] - r["achieved_gflops"]) < 1e-6 * r["achieved_gflops"]
        # The measured calls reuse the traced step: no retrace after the warmup.
        assert r["traces_end"] == r["traces_after_warmup"]
    trainer_vs = {g["goal"] for g in report["goals"]}
    assert {"trainer >= 1.0x hand", "trainer >= 1.0x fit"} <= trainer_vs
    for g in report["goals"]:
        if g["goal"].startswith("trainer >= 1.0x"):
            assert g["verdict"] in ("faster", "tie", "slower") and "paired rounds" in g["note"]
    assert "comparisons" in proc.stdout  # the summary line of the sign tests


def test_sign_test_tells_a_real_gap_from_noise():
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import sign_test

    assert sign_test([1.02, 1.01, 1.05, 1.03, 1.01]) == ("faster", 1 / 32)  # every round of 5
    assert sign_test([0.97, 0.99, 0.98, 0.9, 0.99])[0] == "slower"
    assert sign_test([1.02, 0.99, 1.05, 1.03, 1.01])[0] == "tie"  # 4 of 5: p = 6/32
    verdict, p = sign_test([1.1] * 8 + [0.9])  # 8 of 9: p = 10/512
    assert verdict == "faster" and abs(p - 10 / 512) < 1e-12


def test_plot_without_matplotlib_says_so_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """matplotlib is optional (the `bench` extra): without it the figures stand and only the picture is skipped."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.report import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    plot([], tmp_path / "bench.png")
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "bench.png").exists()


@pytest.mark.slow  # nine XLA compilations: about 90 s on two busy cores
def test_bench_step_xla_layout_runs_on_the_quick_workloads(monkeypatch, capsys):
    """benchmarks/bench_step.py's xla_layout section end to end on bench.py's tiny shapes: it imports and
    reports its three layouts for every workload (what it prints, not how fast)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_step, workloads

    monkeypatch.setattr(bench_step, "workloads", lambda quick: workloads.workloads(True))
    bench_step.main(["--only", "xla_layout", "--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("xla_layout")]
    assert [line.split()[1] for line in lines] == ["mlp", "resnet", "transformer"]
    assert all("select skip" in line and "tf.cond skip" in line for line in lines)


def test_trainer_noskip_runner_turns_only_the_finite_check_off(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.runners import RUNNER_CLASSES
    from benchmarks.workloads import workloads

    wl = workloads(quick=True)["mlp"]
    arrays = wl.make_data(np.random.default_rng(0))
    made = {}
    for name in ("trainer", "trainer_noskip"):
        runner = RUNNER_CLASSES[name](wl, "float32", False, 1, arrays, [])
        runner.setup()
        runner.run(2)
        made[name] = runner.trainer
    assert made["trainer"].precision.skip_nonfinite is True  # the Trainer's default
    assert made["trainer_noskip"].precision.skip_nonfinite is False
    assert made["trainer_noskip"].precision.policy == made["trainer"].precision.policy == "float32"
    assert int(made["trainer_noskip"].step.numpy()) == 2
