"""What happens when a step is traced: what autograph converts, and what the trace is checked for.

Autograph rewrites every Python function a traced step calls (so `if`/`for` on tensors become graph
control flow), and the rewrite costs time at each first trace: ~0.05-0.35 s a function, 1.2-1.5 s for
the 29 functions of the default step (docs/internals.md). The framework's own helpers branch only on
Python values, so they are marked `framework_code` and run as written, as Keras 3 marks its step
functions. What users write or override (train_step, test_step, compute_gradients, compute_loss, a loss
function, a metric) stays converted.

With trainer.deterministic, the first trace of the train step is searched for randomness whose state no
checkpoint holds (`warn_random_state_outside_checkpoint`): a resumed run would draw other numbers.
"""
import logging
from typing import List, Tuple

import tensorflow as tf

log = logging.getLogger("trainer.core")

# Random ops that keep their state in the kernel (a counter seeded once per process), not in a variable: a
# resumed run starts them afresh. tf.random.Generator's ops (Stateful*, RngReadAndSkip) read a variable, the
# stateless ones (Stateless*, keras.random with a SeedGenerator, Keras' Dropout) a seed tensor: not here.
STATEFUL_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "ParameterizedTruncatedNormal",
    "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2", "RandomCrop",
    "SampleDistortedBoundingBox", "SampleDistortedBoundingBoxV2", "UniformCandidateSampler",
    "LogUniformCandidateSampler", "LearnedUnigramCandidateSampler", "FixedUnigramCandidateSampler",
    "ThreadUnsafeUnigramCandidateSampler", "AllCandidateSampler",
})


def framework_code(function):
    """Marks a framework helper that autograph must call as it is (no tensor-dependent Python
    control flow inside, and no user code reached through it)."""
    return tf.autograph.experimental.do_not_convert(function)


def stateful_random_ops(graph) -> List[Tuple[str, str]]:
    """(type, name) of each op of STATEFUL_RANDOM_OPS in `graph` and in every function it calls (loop
    bodies, strategy.run's replicas, XLA-compiled parts), once per name."""
    definition = graph.as_graph_def()
    nodes = list(definition.node) + [n for f in definition.library.function for n in f.node_def]
    return sorted({(n.op, n.name) for n in nodes if n.op in STATEFUL_RANDOM_OPS})


def _uses_keras_global_seed_generator(graph) -> bool:
    """keras.random.* without a seed draws from Keras' global SeedGenerator, whose variable belongs to no
    model, so no checkpoint holds it."""
    try:
        from keras.src.backend.common import global_state

        generator = global_state.get_global_attribute("global_seed_generator")
    except ImportError:  # another Keras: not checked
        return False
    if generator is None:
        return False
    state = getattr(generator.state, "value", generator.state)
    handles = [getattr(v, "handle", None) for v in getattr(state, "values", (state,))]
    return any(external is h for external, _ in graph.captures for h in handles if h is not None)


@framework_code
def warn_random_state_outside_checkpoint(trainer) -> None:
    """With trainer.deterministic, at the first trace of the train step (call it at the end of the traced
    function): names the random ops whose state a checkpoint does not hold, and the fix."""
    if not trainer.config.deterministic or trainer.traces["train"] != 1:
        return
    graph = tf.compat.v1.get_default_graph()
    found = [f"{op} {name!r}" for op, name in stateful_random_ops(graph)]
    if _uses_keras_global_seed_generator(graph):
        found.append("keras.random.* without a seed (Keras' global SeedGenerator)")
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    log.warning(
        "trainer.deterministic=true, but the train step draws random numbers whose state is in no checkpoint, so a "
        "resumed run draws other numbers than an uninterrupted one and ends with other weights: %s. Fix: draw from "
        "self.rng, the Trainer's checkpointed tf.random.Generator (self.rng.uniform(shape), self.rng.normal(shape), or "
        "tf.random.stateless_*(shape, seed=self.rng.make_seeds(1)[:, 0])), give keras.random a SeedGenerator kept on a "
        "model (seed=model.seed_generator), or put the randomness in the data pipeline (see docs/research.md).", shown)
