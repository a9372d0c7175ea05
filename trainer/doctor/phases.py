"""Where a train step's time goes: input, forward, backward and the optimizer update, each timed as a
piece of its own (the forward pass with the loss; forward and gradients; the whole compiled step, from
which the other two are subtracted; the input pipeline pulled alone). It explains why a large matmul
speed-up (bfloat16 on AMX: 3.4x) gives a small model little: only the matmuls in forward and backward get
faster, while the update (float32 variables under every policy), elementwise work and input do not."""
from __future__ import annotations

import time
from typing import Callable, Dict

import keras
import tensorflow as tf

PIECE_SECONDS = 0.2  # each piece is timed over calls that last about this long


def _per_call(call: Callable[[], object], seconds: float = PIECE_SECONDS) -> float:
    """Seconds per call of `call` (its first call, tracing, not timed), over enough calls to last `seconds`."""
    call()
    calls, spent = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        spent = time.perf_counter() - start
        if spent >= seconds or calls >= 4096:
            return spent / calls
        calls = min(4096, calls * max(2, int(seconds / max(spent, 1e-6))))


def _pieces(trainer, batch, xla: bool):
    """The forward (with loss) and forward-plus-gradients functions of the trainer's model."""
    model = trainer.model
    loss = trainer.loss
    x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)

    def loss_of(outputs):
        value = loss(y, outputs) if callable(loss) else tf.nest.flatten(outputs)[0]
        return tf.reduce_mean(tf.cast(value, tf.float32))

    forward = tf.function(lambda: loss_of(model(x, training=True)), jit_compile=xla, autograph=False)

    def gradients():
        with tf.GradientTape() as tape:
            value = loss_of(model(x, training=True))
        return [g for g in tape.gradient(value, model.trainable_variables) if g is not None]

    backward = tf.function(gradients, jit_compile=xla, autograph=False)
    return (lambda: forward().numpy()), (lambda: [g.numpy() for g in backward()[:1]])


def phase_breakdown(trainer, data, xla: bool, step_seconds: float) -> Dict[str, object]:
    """Seconds per step of each phase for one configuration: `step_seconds` is its measured step time
    (the speed section's median), `data` the run's input pipeline for its batch."""
    dataset = data if isinstance(data, tf.data.Dataset) else data(tf.distribute.InputContext())
    iterator = iter(dataset.repeat())
    batch = next(iterator)
    input_seconds = _per_call(lambda: next(iterator))
    forward_call, backward_call = _pieces(trainer, batch, xla)
    forward = _per_call(forward_call)
    forward_backward = max(_per_call(backward_call), forward)
    update = max(step_seconds - forward_backward, 0.0)
    phases = {"forward": forward, "backward": forward_backward - forward, "update and the rest": update,
              "input (pipeline alone)": input_seconds}
    return {"step_seconds": step_seconds, "seconds": phases,
            "share": {k: v / step_seconds for k, v in phases.items()},
            "how": "forward: model and loss; backward: forward with gradients minus forward; update and the rest: "
                   "the measured step minus forward with gradients (optimizer, loss scaling, finite checks, metrics, "
                   "the loop); input: the pipeline pulled alone (overlaps the step when prefetched)"}
