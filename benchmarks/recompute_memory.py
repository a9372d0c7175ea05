"""Peak host memory and step time of a train step with and without recomputation (model.recompute).

Usage: python benchmarks/recompute_memory.py [--model resnet20|minilm] [--batch N] [--steps N]

Each configuration runs in its own process: it builds the recipe's model (random weights), traces and runs
the train step once (forward, backward, SGD update, in one tf.function), then resets TensorFlow's CPU
allocator statistics (tf.config.experimental.get_memory_info works for "CPU:0" in TF 2.21) and runs the step
`--steps` times more. "step peak" is the allocator's peak during those steps: the weights, the optimizer,
the batch, and what a step holds at once (the activations kept for the backward pass, which recomputation
is meant to shrink, and the gradients). The process's peak resident set is printed too; it is blurred by
memory malloc keeps after the trace and by TensorFlow's own start-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def child(model_name: str, recompute: bool, batch: int, steps: int) -> dict:
    import trainer  # noqa: F401 - quiets TensorFlow's start-up lines
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.memory import host_peak_rss_mb
    from trainer.timing import seconds_of

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    if model_name == "minilm":
        from trainer.recipes.transformer import build_model

        model = build_model(pretrained=False, num_classes=2, recompute=recompute)
        ids = rng.integers(1, 30000, size=(batch, 128)).astype("int32")
        x = {"token_ids": ids, "padding_mask": np.ones_like(ids), "segment_ids": np.zeros_like(ids)}
    else:
        from trainer.recipes.resnet import build_model

        model = build_model(model_name, num_classes=10, image_size=32, recompute=recompute)
        x = rng.uniform(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 2, size=(batch,)).astype("int32")
    x, y = tf.nest.map_structure(tf.constant, x), tf.constant(y)
    optimizer = keras.optimizers.SGD(0.01)
    optimizer.build(model.trainable_variables)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True))
        optimizer.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    step()  # traced
    tf.config.experimental.reset_memory_stats("CPU:0")
    times = [seconds_of(lambda: float(step())) for _ in range(steps)]
    return {"step_peak_mb": tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20,
            "rss_peak_mb": host_peak_rss_mb(), "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20", help="resnet8..resnet110 (CIFAR ResNets) or minilm")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", choices=["0", "1"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child == "1", args.batch, args.steps)))
        return
    print(f"{args.model}, batch {args.batch}, {args.steps} timed steps; MiB (TensorFlow's CPU allocator; process RSS)")
    print("| recompute | step peak (MiB) | peak RSS (MiB) | s/step |")  # the docs' tables
    print("| --- | --- | --- | --- |")
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--batch", str(args.batch),
                              "--steps", str(args.steps), "--child", flag], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {['off', 'on'][int(flag)]} | {r['step_peak_mb']:.0f} | {r['rss_peak_mb']:.0f} | "
              f"{r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
