#!/usr/bin/env python
"""Why float16 is so slow on a CPU without XLA: TensorFlow's grappler remapper fuses MatMul + BiasAdd
(+ ReLU) into one `_FusedMatMul`, and that kernel's float16 path on CPU is orders of magnitude slower than
the plain float16 MatMul (which oneDNN runs fast on AVX-512 FP16 CPUs). Times relu(x @ w + b) for n x n
float16 inputs with the remapper on (TensorFlow's default) and off, each in a fresh process (the option
is process-wide), plus float32 for scale. The Trainer avoids the slow path with XLA (trainer.jit_compile
auto = on for mixed_float16 on a CPU).

Usage: python scripts/f16_remapper.py [--sizes 128 256] [--timeout 120]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = """
import sys, time
import tensorflow as tf
remapping, dtype, n = sys.argv[1] == "on", sys.argv[2], int(sys.argv[3])
tf.config.optimizer.set_experimental_options({"remapping": remapping})
x = tf.random.normal([n, n], dtype=dtype)
w = tf.random.normal([n, n], dtype=dtype) * 0.01
b = tf.zeros([n], dtype)
f = tf.function(lambda x, w, b: tf.nn.relu(tf.nn.bias_add(tf.matmul(x, w), b)))
f(x, w, b).numpy()
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    f(x, w, b).numpy()
    best = min(best, time.perf_counter() - t)
print(f"{best * 1e3:.2f}")
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per measurement")
    args = p.parse_args(argv)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    print(f"{'n':>5} {'dtype':>8} {'remapper on ms':>15} {'remapper off ms':>16}")
    for n in args.sizes:
        for dtype in ("float16", "float32"):
            cells = []
            for remapping in ("on", "off"):
                try:
                    out = subprocess.run([sys.executable, "-c", CHILD, remapping, dtype, str(n)], capture_output=True,
                                         text=True, timeout=args.timeout, env=env, check=True).stdout.split()[-1]
                except subprocess.TimeoutExpired:
                    out = f">{args.timeout * 1e3:.0f}"
                cells.append(out)
            print(f"{n:>5} {dtype:>8} {cells[0]:>15} {cells[1]:>16}", flush=True)


if __name__ == "__main__":
    main()
