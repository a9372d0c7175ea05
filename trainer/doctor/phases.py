"""Where a train step's time goes: input, forward, backward and the optimizer update, each timed as a
piece of its own (the forward pass with the loss; forward and gradients; the whole compiled step, from
which the other two are subtracted; the input pipeline pulled alone). It explains why a large matmul
speed-up (bfloat16 on AMX: 3.4x) gives a small model little: only the matmuls in forward and backward get
faster, while the update (float32 variables under every policy), elementwise work and input do not."""
from __future__ import annotations

import statistics
from typing import Callable, Dict

import keras
import tensorflow as tf

from trainer.timing import interleaved_seconds, repeats_lasting, seconds_of

PIECE_SECONDS = 0.2  # each piece's timed call lasts about this long
ROUNDS = 3  # the pieces are timed in interleaved rounds, as the configurations are
MOST_REPEATS = 4096


def _pieces(trainer, batch, iterator) -> Dict[str, Callable[[tf.Tensor], object]]:
    """Each piece as a function of a repeat count n that runs it n times inside one tf.function (no
    per-call Python cost in the pieces: that is the loop's, counted in "update and the rest")."""
    model, loss = trainer.model, trainer.loss
    x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)

    def loss_of(outputs):
        value = loss(y, outputs) if callable(loss) else tf.nest.flatten(outputs)[0]
        return tf.reduce_mean(tf.cast(value, tf.float32))

    def varied(total):
        # Each repeat's input depends on the last one's loss (x times 1 + 1e-30 * loss, numerically x):
        # Grappler's loop optimizer would otherwise hoist the loop-invariant matmuls out of the loop.
        return tf.nest.map_structure(lambda t: t * tf.cast(1.0 + 1e-30 * total, t.dtype) if t.dtype.is_floating else t,
                                     x)

    @tf.function
    def forward(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            total += loss_of(model(varied(total), training=True))
        return total

    @tf.function
    def forward_backward(n):
        total = tf.constant(0.0)
        for _ in tf.range(n):
            with tf.GradientTape() as tape:
                value = loss_of(model(varied(total), training=True))
            grads = [g for g in tape.gradient(value, model.trainable_variables) if g is not None]
            total += tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32)) for g in grads])  # keeps every gradient
        return total

    @tf.function
    def pull(n):
        count = tf.constant(0)
        for _ in tf.range(n):
            count += tf.shape(tf.nest.flatten(next(iterator))[0])[0]
        return count

    # a tensor count: a Python int would retrace (and time the tracing) for every new count
    return {name: (lambda n, fn=fn: fn(tf.constant(n, tf.int32)))
            for name, fn in (("forward", forward), ("forward_backward", forward_backward), ("input", pull))}


def _call(run: Callable[[int], object], n: int) -> Callable[[], None]:
    """`run(n)`, finished when it returns: a tensor result is read back."""
    def call():
        out = run(n)
        if hasattr(out, "numpy"):
            out.numpy()

    return call


def _size(run: Callable[[int], object]) -> int:
    """Repeats of `run` that last about PIECE_SECONDS (its first call, tracing, not counted)."""
    seconds_of(_call(run, 1))
    return repeats_lasting(lambda n: seconds_of(_call(run, n)), PIECE_SECONDS, MOST_REPEATS)


def phase_pieces(trainer, data, run_steps: Callable[[int], None]) -> Dict[str, Callable[[int], object]]:
    """One configuration's timed pieces: `run_steps(n)` trains n steps as the run does (the step's own
    time), `data` is the run's input pipeline for its batch."""
    dataset = data if isinstance(data, tf.data.Dataset) else data(tf.distribute.InputContext())
    iterator = iter(dataset.repeat())
    return {"step": run_steps, **_pieces(trainer, next(iterator), iterator)}


def phase_breakdowns(pieces: Dict[str, Dict[str, Callable[[int], object]]]) -> Dict[str, dict]:
    """Milliseconds per step of each phase, per configuration: every piece of every configuration is
    timed in the same interleaved rounds (a burst of load hits them alike); each is its median."""
    runs = {(config, name): run for config, named in pieces.items() for name, run in named.items()}
    repeats = {key: _size(run) for key, run in runs.items()}
    seconds = interleaved_seconds({key: _call(run, repeats[key]) for key, run in runs.items()}, rounds=ROUNDS, warmup=0)
    per_step = {key: [s / repeats[key] for s in values] for key, values in seconds.items()}
    median = {key: statistics.median(values) for key, values in per_step.items()}
    noise = {key: (max(values) - min(values)) / 2 for key, values in per_step.items()}
    return {config: _breakdown({name: median[(config, name)] for name in named},
                               {name: noise[(config, name)] for name in named}) for config, named in pieces.items()}


def _breakdown(median: Dict[str, float], noise: Dict[str, float]) -> dict:
    """The phases from the pieces' medians. A phase that is a difference of two pieces (backward, update and
    the rest) has their noise (each piece's half-range over the rounds, added): one below it is noise, not a
    time (a clamped 0 read as "nothing", and the next run measured 9.65 ms), and is listed in below_noise."""
    step = median["step"]
    forward = min(median["forward"], step)
    forward_backward = min(max(median["forward_backward"], forward), step)
    phases = {"forward": forward, "backward": forward_backward - forward,
              "update and the rest": step - forward_backward, "input (pipeline alone)": median["input"]}
    differences = {"backward": (median["forward_backward"] - median["forward"],
                                noise["forward_backward"] + noise["forward"]),
                   "update and the rest": (step - median["forward_backward"],
                                           noise["step"] + noise["forward_backward"])}
    return {"step_seconds": step, "seconds": phases, "share": {k: v / step for k, v in phases.items()},
            "noise_seconds": {k: n for k, (_, n) in differences.items()},
            "below_noise": [k for k, (difference, n) in differences.items() if difference < n],
            "how": "forward: model and loss; backward: forward with gradients minus forward; update and the rest: "
                   "the step minus forward with gradients (optimizer, loss scaling, finite checks, metrics, the "
                   "loop's per-window host work); input: the pipeline pulled alone, inside a tf.function (it overlaps "
                   f"the step when prefetched); medians of {ROUNDS} rounds interleaved across the configurations"}
