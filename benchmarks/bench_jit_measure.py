#!/usr/bin/env python
"""Is trainer.jit_compile=measure worth it over auto (trainer.jit_compile=null)? For each workload x
precision, on this machine:

  1. two Trainers, XLA on and XLA off (benchmarks/bench.py's models and synthetic data): each is compiled by a
     one-step fit(), timed (compile_s), then both train `--steps` steps per call in interleaved rounds
     (trainer/timing.py): the median ms/step of each is the truth measure's choice is judged against.
  2. `--measure-runs` Trainers with trainer.jit_compile=measure train the measuring steps (40: 3 rounds of 5
     each way after a warm-up call each); their choice and the seconds that fit() took.
  3. auto's choice (xla_plan.decide_jit_compile, no measuring); the overhead of measuring over auto =
     measure's fit() seconds - (auto's compile_s + the same steps at auto's ms/step); the gain = auto's
     ms/step - the measured choice's; break-even = overhead / gain: the run length from which measuring pays.

Usage: python benchmarks/bench_jit_measure.py [--workloads mlp,resnet] [--precisions float32,mixed_bfloat16]
       [--size small|bench] [--rounds 5] [--steps 10] [--measure-runs 2]
mixed_float16 is not in the default list: on a CPU TensorFlow's float16 kernels are ~100x slower than XLA's
(auto turns XLA on), so its off-cells take minutes and decide nothing.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.workloads import (LEARNING_RATE, make_dataset, make_loss, mlp_workload,  # noqa: E402
                                  resnet_workload)
from benchmarks.report import machine  # noqa: E402
from trainer import Trainer  # noqa: E402
from trainer.xla_plan import decide_jit_compile  # noqa: E402
from trainer.config import PrecisionConfig, TrainerConfig  # noqa: E402
from trainer.timing import interleaved_seconds, median_seconds, seconds_of  # noqa: E402

SIZES = {  # bench: benchmarks/bench.py's default shapes (the guide's 20M-parameter MLP: ~1 s/step on 2 cores)
    "small": {"mlp": lambda: mlp_workload(units=1024, batch=128),
              "resnet": lambda: resnet_workload(batch=32)},
    "bench": {"mlp": mlp_workload, "resnet": resnet_workload},
}


def make_trainer(wl, precision: str, jit_compile) -> Trainer:
    return Trainer(model=wl.build, loss=make_loss(), optimizer=lambda: keras.optimizers.Adam(LEARNING_RATE),
                   precision=precision, seed=0, jit_compile=jit_compile, log_every=10**9, checkpoint_every=0,
                   progress_bar=False, tensorboard=False, verbose=False)


def timed_fit(trainer: Trainer, data, steps: int) -> float:
    return seconds_of(lambda: (trainer.fit(data, steps=steps), trainer.step.numpy()))


def per_step_ms(trainers, steps: int, rounds: int):
    def call(t):
        return lambda: (t.run_steps(steps), t.step.numpy())

    seconds = interleaved_seconds({name: call(t) for name, t in trainers.items()}, rounds=rounds, warmup=1)
    return {name: 1e3 * s / steps for name, s in median_seconds(seconds).items()}


def cell(wl, precision: str, args) -> dict:
    arrays = wl.make_data(np.random.default_rng(0))
    fixed = {"on": make_trainer(wl, precision, True), "off": make_trainer(wl, precision, False)}
    compile_s = {name: timed_fit(t, make_dataset(arrays), 1) for name, t in fixed.items()}
    ms = per_step_ms(fixed, args.steps, args.rounds)
    auto = decide_jit_compile(TrainerConfig(), PrecisionConfig(policy=precision), on_cpu=True, replicas=1)
    auto = "on" if auto else "off"
    runs = []
    for _ in range(args.measure_runs):
        t = make_trainer(wl, precision, "measure")
        seconds = timed_fit(t, make_dataset(arrays), 40)
        m = t.xla_measurement
        runs.append(dict(seconds=seconds, choice="on" if m.jit_compile else "off", on=1e3 * m.on_seconds,
                         off=1e3 * m.off_seconds, wins=m.on_wins))
        del t
    overhead = [r["seconds"] - (compile_s[auto] + 39 * ms[auto] / 1e3) for r in runs]
    gain = [ms[auto] - ms[r["choice"]] for r in runs]
    return dict(workload=wl.name, precision=precision, ms=ms, compile_s=compile_s, auto=auto, runs=runs,
                overhead=float(np.median(overhead)), gain=float(np.median(gain)))


def row(c: dict) -> str:
    best = min(c["ms"], key=c["ms"].get)
    choices = "/".join(r["choice"] for r in c["runs"])
    said = "; ".join(f"{r['on']:.1f}/{r['off']:.1f}, on won {r['wins']:g}" for r in c["runs"])
    even = c["overhead"] / (c["gain"] / 1e3) if c["gain"] > 0 else math.inf
    return (f"| {c['workload']} | {c['precision']} | {c['ms']['on']:.1f} | {c['ms']['off']:.1f} | {best} | "
            f"{c['compile_s']['on']:.1f} / {c['compile_s']['off']:.1f} | {c['auto']} | {choices} ({said}) | "
            f"{c['overhead']:+.1f} | {c['gain']:+.1f} | {'never' if math.isinf(even) else f'{even:,.0f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="mlp,resnet")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the XLA on/off reference")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed call of the reference")
    parser.add_argument("--measure-runs", type=int, default=2, help="jit_compile=measure runs per cell")
    args = parser.parse_args()
    print(f"Machine: {machine()}; {args.size} shapes; reference: median of {args.rounds} interleaved rounds "
          f"of {args.steps} steps; {args.measure_runs} measure runs per cell", flush=True)
    header = ("| workload | precision | on ms/step | off ms/step | faster | compile s on / off | auto | measure chose "
              "(its on/off ms, rounds XLA on won) | overhead s | gain ms/step | break-even steps |")
    lines = [header, "|" + " --- |" * 11]
    for name in args.workloads.split(","):
        for precision in args.precisions.split(","):
            lines.append(row(cell(SIZES[args.size][name](), precision, args)))
            print(lines[-1], flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
