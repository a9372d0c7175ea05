"""What happens when a step is traced: what autograph converts, and what the trace is checked for.

Autograph rewrites every Python function a traced step calls (so `if`/`for` on tensors become graph
control flow), and the rewrite costs time at each first trace: ~0.05-0.35 s a function, 1.2-1.5 s for
the 29 functions of the default step (docs/internals.md). The framework's own helpers branch only on
Python values, so they are marked `framework_code` and run as written, as Keras 3 marks its step
functions. What users write or override (train_step, test_step, compute_gradients, compute_loss, a loss
function, a metric) stays converted.

With trainer.deterministic, each trace of the train step is searched for randomness whose state no
checkpoint holds (`warn_random_state_outside_checkpoint`): a resumed run would draw other numbers. A retrace
(another input shape) names only what no earlier trace of that Trainer named.
"""
import contextlib
import logging
import weakref
from typing import List, Tuple

import tensorflow as tf

log = logging.getLogger("trainer.core")
_named: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Trainer -> the random ops named at its traces

# Random ops that keep their state in the kernel (a counter seeded once per process), not in a variable: a
# resumed run starts them afresh. tf.random.Generator's ops (Stateful*, RngReadAndSkip) read a variable, the
# stateless ones (Stateless*, keras.random with a SeedGenerator, Keras' Dropout) a seed tensor: not here.
STATEFUL_RANDOM_OPS = frozenset({
    "RandomUniform", "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "ParameterizedTruncatedNormal",
    "RandomShuffle", "Multinomial", "RandomGamma", "RandomPoisson", "RandomPoissonV2", "RandomCrop",
    "SampleDistortedBoundingBox", "SampleDistortedBoundingBoxV2", "UniformCandidateSampler",
    "LogUniformCandidateSampler", "LearnedUnigramCandidateSampler", "FixedUnigramCandidateSampler",
    "ThreadUnsafeUnigramCandidateSampler", "AllCandidateSampler", "FractionalMaxPool", "FractionalAvgPool",
    "NonDeterministicInts",
    # a tf.data pipeline built inside the step: its seeds are drawn afresh in a new process
    "ShuffleDataset", "ShuffleDatasetV2", "ShuffleDatasetV3", "ShuffleAndRepeatDataset", "ShuffleAndRepeatDatasetV2",
    "RandomDataset", "RandomDatasetV2", "ExperimentalRandomDataset", "SamplingDataset",
})


def framework_code(function):
    """Marks a framework helper that autograph must call as it is (no tensor-dependent Python
    control flow inside, and no user code reached through it)."""
    return tf.autograph.experimental.do_not_convert(function)


@contextlib.contextmanager
def keras_random_explained():
    """keras.random.* without a seed, first called inside a replicated step, makes Keras create its global
    SeedGenerator there, which MirroredStrategy cannot (an UnliftableError that names neither)."""
    try:
        yield
    except Exception as error:
        if type(error).__name__ != "UnliftableError" or "seed_generator" not in str(error):
            raise
        raise ValueError(
            "A keras.random.* call without a seed in the step makes Keras create its global SeedGenerator inside the "
            "replicated step, which a distribution strategy cannot do (TensorFlow's UnliftableError below). Fix: draw "
            "from self.rng (self.rng.uniform(shape)), or give keras.random a seed=keras.random.SeedGenerator(...) "
            "created with the model (see docs/research.md, Randomness).") from error


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
    """With trainer.deterministic, at each trace of the train step (call it at the end of the traced
    function): names the random ops whose state a checkpoint does not hold, and the fix; each once per Trainer."""
    if not trainer.config.deterministic:
        return
    graph = tf.compat.v1.get_default_graph()
    found = [f"{op} {name!r}" for op, name in stateful_random_ops(graph)]
    if _uses_keras_global_seed_generator(graph):
        found.append("keras.random.* without a seed (Keras' global SeedGenerator)")
    named = _named.setdefault(trainer, set())  # what an earlier trace of this Trainer named already
    found = [f for f in found if f not in named]
    named.update(found)
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    log.warning(
        "trainer.deterministic=true, but the train step draws random numbers whose state is in no checkpoint, so a "
        "resumed run draws other numbers than an uninterrupted one and ends with other weights: %s. Fix: draw from "
        "self.rng, the Trainer's checkpointed tf.random.Generator (self.rng.uniform(shape), self.rng.normal(shape), or "
        "tf.random.stateless_*(shape, seed=self.rng.make_seeds(1)[:, 0])), give keras.random a SeedGenerator kept on a "
        "model (seed=model.seed_generator), or put the randomness in the data pipeline (see docs/research.md).", shown)
