"""What happens when a step is traced: what autograph converts, and what the trace is checked for.

Autograph rewrites every Python function a traced step calls (so `if`/`for` on tensors become graph
control flow), and the rewrite costs time at each first trace: ~0.05-0.35 s a function, 1.2-1.5 s for
the 29 functions of the default step (docs/internals.md). The framework's own helpers branch only on
Python values, so they are marked `framework_code` and run as written, as Keras 3 marks its step
functions. What users write or override (train_step, test_step, compute_gradients, compute_loss, a loss
function, a metric) stays converted.

With trainer.deterministic, each trace of the train step is searched for randomness whose state no
checkpoint holds (`warn_random_state_outside_checkpoint`): a resumed run would draw other numbers. That is
a stateful random op, Keras' global SeedGenerator, or the state variable of a tf.random.Generator that the
checkpoint does not hold (the user's own). A retrace (another input shape) names only what no earlier trace
of that Trainer named. `warn_unused_optimizers` names the optimizers a traced train step never updated.
"""
import contextlib
import logging
import sys
import types
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
        if isinstance(error, RuntimeError) and '"get_global_generator" cannot be called if determinism' in str(error):
            raise RuntimeError(
                "tf.random.get_global_generator() in the step: TensorFlow refuses it under op determinism "
                "(trainer.deterministic=true), and the global generator is in no checkpoint anyway (a resume would "
                "draw other numbers). Fix: draw from self.rng, the Trainer's checkpointed generator "
                "(self.rng.normal(shape)); see docs/research.md, Randomness.") from error
        if type(error).__name__ != "UnliftableError" or "seed_generator" not in str(error):
            raise
        raise ValueError(
            "A keras.random.* call without a seed in the step makes Keras create its global SeedGenerator inside the "
            "replicated step, which a distribution strategy cannot do (TensorFlow's UnliftableError below). Fix: draw "
            "from self.rng (self.rng.uniform(shape)), or give keras.random a seed=keras.random.SeedGenerator(...) "
            "created with the model (see docs/research.md, Randomness).") from error


def graph_nodes(graph) -> List[list]:
    """The NodeDefs of `graph` and of each function it calls (loop bodies, strategy.run's replicas, XLA-compiled
    parts), one list per graph (a node's inputs name nodes of its own graph)."""
    definition = graph.as_graph_def()
    return [list(definition.node)] + [list(f.node_def) for f in definition.library.function]


def stateful_random_ops(graph) -> List[Tuple[str, str]]:
    """(type, name) of each op of STATEFUL_RANDOM_OPS in `graph` and in every function it calls (loop
    bodies, strategy.run's replicas, XLA-compiled parts), once per name."""
    return sorted({(n.op, n.name) for nodes in graph_nodes(graph) for n in nodes if n.op in STATEFUL_RANDOM_OPS})


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


def _variable(v):
    """A variable as the checkpoint holds it: a replica's copy is its distributed variable's."""
    container = getattr(v, "_distributed_container", None)
    distributed = container() if callable(container) else None
    return v if distributed is None else distributed


def _generators_outside_checkpoint(graph, trainer) -> List[str]:
    """The tf.random.Generators whose state variable the traced step read but no checkpoint object holds,
    named where found (an attribute of the Trainer, a global of the step's module or of __main__)."""
    read = [_variable(v) for v in getattr(graph, "_watched_variables", ())  # every variable the trace read
            if v.name.split(":")[0].rsplit("/", 1)[-1] == "StateVar"]  # tf.random.Generator's (its fixed name)
    # Found by that name, which TensorFlow gives a Generator's variable (stateful_random_ops.py): a TensorFlow
    # that renamed it would find no generator here (no warning, not a false one).
    read = [v for v in read if v is not _variable(trainer.rng.state)]
    if not read:
        return []
    with tf.init_scope():  # the checkpoint's object graph, walked eagerly
        # What the Checkpointer saves (its objects were fixed when fit() started: a generator made since is in
        # none), or without one (no run folder) what a checkpoint would hold.
        saved = trainer.checkpointer.saved_objects() if trainer.checkpointer else trainer.checkpoint_objects()
        checkpoint = tf.train.Checkpoint(**saved)  # held: the view keeps a weak reference
        held = {id(_variable(thing.state if isinstance(thing, tf.random.Generator) else thing))
                for thing in tf.train.TrackableView(checkpoint).descendants()}
    outside = [v for v in read if id(v) not in held]
    if not outside:
        return []
    places = [("self.", vars(trainer))] + [(f"{m}.", vars(sys.modules[m]))
                                           for m in {type(trainer).__module__, "__main__"} if m in sys.modules]
    names = {}
    for prefix, space in places:
        for key, value in list(space.items()):
            for path, g in _one_level_in(value):
                if isinstance(g, tf.random.Generator):
                    names.setdefault(id(_variable(g.state)), prefix + key + path)
    return [f"a tf.random.Generator of your own ({names.get(id(v), 'state variable ' + repr(v.name))}), which no "
            "checkpoint holds" for v in outside]


def _one_level_in(value):
    """`value` and what it holds one level in (a dict's values, a list's items, an object's attributes, a function's
    closure variables), with the path to each: a generator in self.rngs["noise"] or a helper is named too."""
    yield "", value
    try:
        if isinstance(value, dict):
            yield from [(f"[{k!r}]", v) for k, v in list(value.items())]
        elif isinstance(value, (list, tuple)):
            yield from [(f"[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, types.FunctionType) and value.__closure__:
            cells = zip(value.__code__.co_freevars, value.__closure__)
            yield from [(f" (its closure's {name})", cell.cell_contents) for name, cell in cells]
        elif hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType, tf.random.Generator)):
            yield from [(f".{k}", v) for k, v in list(vars(value).items())]
    except (TypeError, ValueError, AttributeError):  # an object that hides its attributes, an empty cell
        return


@framework_code
def warn_random_state_outside_checkpoint(trainer) -> None:
    """With trainer.deterministic, at each trace of the train step (call it at the end of the traced
    function): names the random ops and generators whose state a checkpoint (trainer.checkpointer's)
    does not hold, and the fix; each once per Trainer."""
    if not trainer.config.deterministic:
        return
    graph = tf.compat.v1.get_default_graph()
    found = [f"{op} {name!r}" for op, name in stateful_random_ops(graph)]
    named = _named.setdefault(trainer, set())  # what an earlier trace of this Trainer named already
    _warn_draws_restart_at_retrace(trainer, [f for f in found if f in named])
    if _uses_keras_global_seed_generator(graph):
        found.append("keras.random.* without a seed (Keras' global SeedGenerator)")
    found += _generators_outside_checkpoint(graph, trainer)
    found = [f for f in found if f not in named]
    named.update(found)
    if not found:
        return
    shown = ", ".join(found[:6]) + (f" and {len(found) - 6} more" if len(found) > 6 else "")
    log.warning(
        "trainer.deterministic=true, but the train step draws random numbers whose state is in no checkpoint, so a "
        "resumed run draws other numbers than an uninterrupted one and ends with other weights: %s. Fix: draw from "
        "self.rng, the Trainer's checkpointed tf.random.Generator, in place of tf.random.* or a generator of your own "
        "(self.rng.uniform(shape), self.rng.normal(shape), or "
        "tf.random.stateless_*(shape, seed=self.rng.make_seeds(1)[:, 0])), or hold your generator on the Trainer "
        "(self.noise_rng = tf.random.Generator...: then every checkpoint holds it), give keras.random a SeedGenerator "
        "kept on a model (seed=model.seed_generator), or put the randomness in the data pipeline (see "
        "docs/research.md).", shown)


def _warn_draws_restart_at_retrace(trainer, ops: List[str]) -> None:
    """A retrace (another input shape, a changed trainable flag) makes the stateful random ops anew: seeded by
    their place in the graph under trainer.deterministic, they draw from here what they drew from the run's start
    (a mixup's lambda at step 30 equal to step 10's), within one uninterrupted run."""
    if not ops:
        return
    with tf.init_scope():
        step = int(trainer.step.numpy())
    shown = ", ".join(ops[:6]) + (f" and {len(ops) - 6} more" if len(ops) > 6 else "")
    log.warning(
        "trainer.deterministic=true: the train step was traced again (at step %d: another input shape, a changed "
        "trainable flag or precision), and its stateful random ops %s start their sequences afresh in the new trace "
        "(each is seeded by its place in the graph), so from here they draw the numbers they drew from the first "
        "trace on: the same noise again. Fix: draw from self.rng, the Trainer's checkpointed tf.random.Generator "
        "(self.rng.uniform(shape)), whose state goes on across traces (see docs/research.md).", step, shown)


def warn_unused_optimizers(trainer) -> None:
    """Names each optimizer the traced train step never updated through self.update: an old-style step that
    calls optimizer.apply itself gets no loss scaling, all-reduce or finite check, and a model left out
    trains not at all, with exit 0 either way."""
    unused = [name for name, updater in trainer.updaters.items() if not updater.in_step]
    if unused:
        log.warning("The train step never calls self.update(loss, tape, name) for optimizer(s) %s (this Trainer's: "
                    "%s). If the step applies their gradients itself (optimizer.apply_gradients), their models train, "
                    "with the gradients averaged over replicas in an overridden train_step (summed, as Keras does, "
                    "elsewhere), but without the Trainer's loss scaling, finite check (a step with inf/NaN gradients "
                    "is applied, not skipped), clipping, and grad_norm/skipped_steps logs; if nothing applies them (a "
                    "misspelt name), those models do not train. Fix: call self.update(loss, tape, %r) in train_step.",
                    unused, sorted(trainer.updaters), unused[0])
