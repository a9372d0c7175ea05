#!/usr/bin/env python
"""Where the Trainer's step time goes, on the guide's MLP (784-4096-4096-10, batch 512): the figures
behind trainer/fused.py and the XLA layout in trainer/xla_plan.py `plan_xla`, side by side in one run.

  update       one Adam update of the MLP's 20M parameters: Keras' ops vs TF's fused kernel
  finite       finite check of the gradients: per-tensor is_finite + global norm vs the norm alone
  xla_layout   a train step with XLA on the MLP, ResNet and Transformer: whole step in one cluster, non-finite
               skip as a select (the default) or a tf.cond, vs forward/backward compiled and update outside
  overhead     a Trainer step vs the same model's forward and backward alone (no update, checks or
               metrics): what the Trainer adds around the model's own work
  skip         the small Transformer of benchmarks/bench.py (float32, XLA off): updates wait for the finite
               check (precision.skip_nonfinite=true, the default) vs start when their gradient is ready

Each pair is timed interleaved (A B A B ...), medians of --repeats. Usage: python benchmarks/bench_step.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks.workloads import make_dataset, make_loss, workloads  # noqa: E402  (bench.py's models)
from trainer import PrecisionConfig, Trainer  # noqa: E402
from trainer.fused import fuse  # noqa: E402
from trainer.timing import interleaved_seconds  # noqa: E402
from trainer.update import Updater  # noqa: E402

SHAPES = [(784, 4096), (4096,), (4096, 4096), (4096,), (4096, 10), (10,)]


def interleaved(fns: dict, calls: int, repeats: int) -> dict:
    """Median milliseconds per call of each function, timed A B A B ... after one warm call each."""
    for fn in fns.values():
        fn()

    def repeated(fn):
        def call():
            for _ in range(calls):
                fn()

        return call

    seconds = interleaved_seconds({name: repeated(fn) for name, fn in fns.items()}, rounds=repeats, warmup=0)
    return {name: statistics.median(s / calls * 1000 for s in t) for name, t in seconds.items()}


def update_and_finite(repeats: int) -> None:
    grads = [tf.random.normal(s) * 0.01 for s in SHAPES]

    def adam(fused: bool):
        variables = [keras.Variable(tf.random.normal(s) * 0.01) for s in SHAPES]
        optimizer = keras.optimizers.Adam(1e-3)
        optimizer.build(variables)
        if fused:
            fuse(optimizer)

        @tf.function
        def update():
            optimizer.apply(grads, variables)

        return lambda: update()  # noqa: PLW0108 - the variables live in the closure

    @tf.function
    def per_tensor():
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
        return finite, tf.linalg.global_norm(grads)

    @tf.function
    def norm_only():
        norm = tf.linalg.global_norm(grads)
        return tf.math.is_finite(norm), norm

    ms = interleaved({"keras_ops": adam(False), "fused": adam(True)}, calls=10, repeats=repeats)
    print(f"update      Adam on 20M float32 parameters: Keras ops {ms['keras_ops']:.1f} ms, "
          f"fused kernel {ms['fused']:.1f} ms "
          f"({ms['keras_ops'] / ms['fused']:.2f}x)")
    ms = interleaved({"per_tensor": lambda: per_tensor()[0].numpy(), "norm": lambda: norm_only()[0].numpy()},
                     calls=10, repeats=repeats)
    print(f"finite      per-tensor is_finite + norm {ms['per_tensor']:.1f} ms, norm only {ms['norm']:.1f} ms")


def compiled_steps(trainer: Trainer, ds: tf.data.Dataset, n: int):
    """After a 2-step fit (trace, compile), a function that runs n steps of the Trainer's compiled loop."""
    trainer.fit(ds, steps=2)

    def steps():
        for _ in range(n):
            trainer.run_steps(1)
        trainer.model.trainable_variables[-1].numpy()

    return steps


class CondSkipUpdater(Updater):
    """The skip of a non-finite update as a tf.cond also inside XLA (the way the Trainer skips outside it)."""

    def _apply_selected(self, grads, variables, finite):
        tf.cond(finite, lambda: self.optimizer.apply(grads, variables), self._skip)


class CondSkipTrainer(Trainer):
    """The whole step in one XLA cluster, with the skip of a non-finite update as a tf.cond."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for updater in self.updaters.values():
            updater.__class__ = CondSkipUpdater  # a diagnostic: the layout the Trainer does not use


def mlp():
    """The guide's MLP."""
    return keras.Sequential([
        keras.Input((784,)), keras.layers.Dense(4096, activation="relu"), keras.layers.Dense(4096, activation="relu"),
        keras.layers.Dense(10), keras.layers.Activation("softmax", dtype="float32"),
    ])


def mlp_data() -> tf.data.Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512 * 4, 784)).astype("float32")
    y = rng.integers(0, 10, 512 * 4).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(512).cache().repeat()


def mlp_trainer(cls=Trainer, **kwargs) -> Trainer:
    return cls(model=mlp, loss=keras.losses.SparseCategoricalCrossentropy(),
               optimizer=lambda: keras.optimizers.Adam(1e-4),
               log_every=10**9, checkpoint_every=0, progress_bar=False, tensorboard=False, **kwargs)


def xla_layout(repeats: int, precision: str) -> None:
    """The XLA layouts of one device (trainer.xla_whole_step=true with select or tf.cond skip, false) on
    the guide's MLP (20M parameters) and bench.py's small ResNet and Transformer; auto picks the first
    for the ResNet and Transformer, the last for the MLP."""
    for name, workload in workloads(False).items():
        arrays = workload.make_data(np.random.default_rng(0))

        def runner(cls, whole_step: bool):
            trainer = cls(model=workload.build, loss=make_loss(), optimizer=lambda: keras.optimizers.Adam(1e-4),
                          precision=precision, jit_compile=True, xla_whole_step=whole_step, log_every=10**9,
                          checkpoint_every=0, progress_bar=False, tensorboard=False)
            return compiled_steps(trainer, make_dataset(arrays), 1 if name == "mlp" else 4)

        runners = {"select": runner(Trainer, True), "cond": runner(CondSkipTrainer, True),
                   "split": runner(Trainer, False)}
        ms = interleaved(runners, calls=4, repeats=repeats)
        print(f"xla_layout  {name} {precision}, ms per call: whole step with select skip {ms['select']:.1f}, "
              f"with tf.cond skip {ms['cond']:.1f} ({ms['cond'] / ms['select']:.2f}x), update outside XLA "
              f"{ms['split']:.1f} ({ms['split'] / ms['select']:.2f}x)", flush=True)


def overhead(repeats: int, n: int = 4) -> None:
    trainer_steps = compiled_steps(mlp_trainer(jit_compile=False), mlp_data(), n)
    model, loss_fn, iterator = mlp(), keras.losses.SparseCategoricalCrossentropy(), iter(mlp_data())

    @tf.function
    def forward_backward(iterator):
        x, y = next(iterator)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        return [tf.reduce_sum(g[0]) for g in tape.gradient(loss, model.trainable_variables)]

    def model_steps():
        for _ in range(n):
            out = forward_backward(iterator)
        out[0].numpy()

    ms = interleaved({"trainer": trainer_steps, "model": model_steps}, calls=2, repeats=repeats)
    print(f"overhead    MLP float32, XLA off: Trainer step {ms['trainer'] / n:.0f} ms, the model's forward+backward "
          f"alone {ms['model'] / n:.0f} ms ({ms['trainer'] / ms['model']:.2f}x)")


def skip_nonfinite(repeats: int) -> None:
    workload = workloads(False)["transformer"]  # benchmarks/bench.py's Transformer
    arrays = workload.make_data(np.random.default_rng(0))

    def runner(skip: bool):
        trainer = Trainer(model=workload.build, loss=make_loss(), optimizer=lambda: keras.optimizers.Adam(1e-4),
                          precision=PrecisionConfig(skip_nonfinite=skip), log_every=10**9, checkpoint_every=0,
                          progress_bar=False, tensorboard=False)
        return compiled_steps(trainer, make_dataset(arrays), 5)

    ms = interleaved({"skip": runner(True), "apply": runner(False)}, calls=2, repeats=repeats)
    print(f"skip        Transformer step (float32, XLA off), 5 steps: "
          f"skip_nonfinite=true {ms['skip'] / 5:.1f} ms/step, "
          f"false {ms['apply'] / 5:.1f} ms/step ({ms['skip'] / ms['apply']:.3f}x)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="float32", help="of the xla_layout section")
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run these sections only")
    args = parser.parse_args(argv)
    keras.utils.disable_interactive_logging()
    for name in args.only or SECTIONS:
        SECTIONS[name](args)


SECTIONS = {
    "update": lambda args: update_and_finite(args.repeats),  # also prints the finite-check figures
    "xla_layout": lambda args: xla_layout(args.repeats, args.precision),
    "overhead": lambda args: overhead(args.repeats),
    "skip": lambda args: skip_nonfinite(args.repeats),
}

if __name__ == "__main__":
    main()
