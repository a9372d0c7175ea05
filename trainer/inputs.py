"""Input: the sample batch that builds the variables, distribution, the skip on resume, and the iterator a
fit() call leaves for the next one on the same data."""
from __future__ import annotations

import logging
import math
import weakref
from typing import Any, Callable, Optional, Union

import tensorflow as tf

from trainer.accumulation import check_accumulation
from trainer.config import ConfigError
from trainer.data import DataError
from trainer.iterator_release import hold_until_exit, release_in_background
from trainer.step import Step

log = logging.getLogger("trainer.core")

DataArg = Union[tf.data.Dataset, Callable[[tf.distribute.InputContext], tf.data.Dataset]]
_trained_from: "weakref.WeakSet" = weakref.WeakSet()  # seeded shuffles a training iterator was made of (any Trainer)


class KeptIterator:
    """What a fit() call that ended normally leaves for the next call on the same data set. When it is
    let go (fit() on other data, or the Trainer is freed), its iterator dies on the release thread: after a
    100 s run, destroying it in the calling thread took 45 s (tf.data's autotuner wait, see iterator_release.py). One
    still held at exit is let go by iterator_release.py's exit hook (hold_until_exit)."""

    def __init__(self, data: DataArg, step: int, iterator: Any, replicas: int = 1):
        self.data, self.step, self.iterator, self.replicas = data, step, iterator, replicas
        hold_until_exit(self)

    def __del__(self):
        self.let_go()

    def let_go(self) -> None:
        if self.iterator is not None:
            holder, self.iterator = [self.iterator], None
            try:
                release_in_background(holder, self.replicas)
            except Exception:  # late in interpreter shutdown module globals may be gone: it dies here
                holder.clear()


def sample_batch(data: DataArg, strategy: tf.distribute.Strategy):
    """(one batch, global batch size): what one replica of `strategy` would be given first."""
    if isinstance(data, tf.data.Dataset):
        probe = [iter(data)]
    else:  # the unshuffled twin, where there is one, skips filling the shuffle buffer twice (data.py)
        make = getattr(data, "unshuffled", data)
        probe = [iter(make(tf.distribute.InputContext(1, 0, strategy.num_replicas_in_sync)))]
    sample = next(probe[0])
    # its age includes filling a shuffle buffer: see iterator_release.py
    release_in_background(probe, strategy.num_replicas_in_sync)
    replicas = strategy.num_replicas_in_sync
    batch_size = int(tf.nest.flatten(sample)[0].shape[0]) * (1 if isinstance(data, tf.data.Dataset) else replicas)
    if isinstance(data, tf.data.Dataset) and batch_size % replicas:
        raise DataError(
            f"The training batches ({batch_size} examples) do not split evenly over the {replicas} "
            f"replicas, so the loss would be misweighted. Fix: a batch size that is a multiple of "
            f"{replicas}, with .batch(..., drop_remainder=True) for the last one."
        )
    return sample, batch_size


def unbatched_error(model, x) -> Optional[DataError]:
    """Why the model refused its input `x` (of the first training batch), when it is one example, not a batch: a
    scalar, or a tensor of one rank less than the model's (keras.Input) input and of its shape, from a tf.data.Dataset
    not batched. A DataError saying to batch it, where Keras said "Invalid input shape ... (2,)" (a slice of the
    example); None: another cause. Asked only once the model refused `x` (Keras accepts some such shapes: it adds a
    missing trailing axis of 1, so Input((1,)) takes a batch of shape (1,))."""
    flat = tf.nest.flatten(x)
    inputs = getattr(model, "inputs", None) if len(flat) == 1 else None
    shape = flat[0].shape if flat and hasattr(flat[0], "shape") else None
    if shape is None or shape.rank is None:
        return None
    wanted = inputs[0].shape if inputs and len(inputs) == 1 else None
    one_example = shape.rank == 0 or (
        wanted is not None and len(wanted) == shape.rank + 1
        and all(a is None or b is None or a == b for a, b in zip(wanted[1:], shape.as_list())))
    if not one_example:
        return None
    model_takes = f" and the model takes {tuple(wanted)} (a batch of them)" if wanted is not None else ""
    return DataError(
        f"The training data gives single examples, not batches: its input has shape {tuple(shape.as_list())}"
        f"{model_takes}. Fix: batch the dataset, e.g. dataset.batch(32, drop_remainder=True) (or give arrays: "
        "fit(x, y, batch_size=32)).")


def batches_read_per_step(config) -> int:
    """The batches one train step reads: trainer.grad_accum_steps micro-batches, or trainer.batches_per_step
    batches for an overridden step (one of them is 1). Epochs, resume skips and examples/s count by it."""
    return config.grad_accum_steps * config.batches_per_step


def check_step_settings(trainer_type, config) -> None:
    """The CLI's train command's, before the data is loaded: check_batches_per_step (Trainer() checks it too) and
    accumulation.check_accumulation (fit() checks it too)."""
    check_batches_per_step(trainer_type, config)
    check_accumulation(trainer_type, config)


def check_batches_per_step(trainer_type, config) -> None:
    """trainer.batches_per_step=K > 1 hands train_step a tuple of K batches: only a step written for them may
    get it (its class says `takes_several_batches = True`; a step for one batch would mis-unpack the tuple).
    Said at Trainer(), before any data is loaded or model built."""
    k = config.batches_per_step
    if k == 1:
        return
    if not getattr(trainer_type, "takes_several_batches", False):
        written = ("the default train_step trains on one" if trainer_type.train_step is Step.train_step
                   else f"{trainer_type.__name__}.train_step does not say it takes them")
        raise ConfigError(f"trainer.batches_per_step={k} hands train_step a tuple of {k} batches, and {written}. Fix: "
                          "override train_step to use them and set `takes_several_batches = True` on the class (see "
                          "docs/research.md, 'Several updates per step'), or trainer.grad_accum_steps to average "
                          "the gradients of several batches in one update.")
    if config.overfit_batches % batches_read_per_step(config):
        raise ConfigError(f"trainer.overfit_batches={config.overfit_batches} is not a whole number of steps of "
                          f"trainer.batches_per_step={k} batches, so the steps would not go over the same batches. "
                          f"Fix: trainer.overfit_batches a multiple of {k}.")


def steps_per_epoch_of(data: DataArg, batches_read_per_step: int) -> Optional[int]:
    """Steps in one pass over a data set of known size (the batches left over start the next); None when unknown."""
    if not isinstance(data, tf.data.Dataset):
        return None
    card = int(data.cardinality())  # batches; a step reads batches_read_per_step of them
    return card // batches_read_per_step if card > 0 else None


def distribute(data: DataArg, strategy: tf.distribute.Strategy, skip_batches: int = 0, training: bool = True):
    """A tf.data.Dataset (global batches) or an InputContext -> Dataset function (per-replica
    batches) -> a distributed data set. Training data repeats, and skips the batches already
    consumed: with a seeded shuffle the order is the same as in an uninterrupted run."""
    if isinstance(data, tf.data.Dataset):
        ds = data
        if training:
            ds = ds.repeat().skip(skip_batches)
        return strategy.experimental_distribute_dataset(ds)

    def fn(ctx):
        if training and skip_batches and getattr(data, "skips_itself", False):
            return data(ctx, skip_steps=skip_batches).repeat()  # data.py: DatasetFn
        ds = data(ctx)
        if training:  # a step takes one per-replica batch for each replica this pipeline feeds
            ds = ds.repeat().skip(skip_batches * (ctx.num_replicas_in_sync // ctx.num_input_pipelines))
        return ds

    return strategy.distribute_datasets_from_function(fn)


def training_iterator(data: DataArg, strategy, start: int, batches_read: int, kept: Optional[KeptIterator],
                      exact_resume: bool = False, other_examples: bool = False):
    """The iterator a fit() call trains from: the one the last call left, when it ended at step `start` on
    the same data; else a new one that skips the `batches_read` batches the run trained on so far.
    `exact_resume`: this run is one a resume should repeat (a run_dir, and a resume or trainer.deterministic).
    `other_examples`: the run read them with another worker count (data_position.reads_other_examples, warned)."""
    if kept is not None and kept.iterator is not None and kept.data is data and kept.step == start:
        iterator, kept.iterator = kept.iterator, None
        return iterator
    if batches_read and other_examples:
        log.info("Data: skipping %d batches, as many examples as the first %d steps trained on, but not the same ones "
                 "(another worker count, warned above)", batches_read, start)
    elif batches_read:  # tf.data produces the skipped batches (reads, decodes) and drops them: it takes time
        log.info("Data: skipping %d batches, the examples the first %d steps trained on, to resume in the same order",
                 batches_read, start)
    warn_if_reshuffled_again(data, start, exact_resume)
    return iter(distribute(data, strategy, skip_batches=batches_read))


def total_steps(steps: Optional[int], epochs: Optional[float], steps_per_epoch: Optional[int],
                cli: Optional[bool] = None, epochs_from: str = "fit") -> int:
    """The step a fit ends at: the smaller of `steps` and `epochs` x `steps_per_epoch` (ceil); a ConfigError
    when neither says it, its fix in the user's form: the CLI's overrides (`cli`), fit()'s and the Trainer's
    arguments (`cli` false; `epochs_from`: the call `epochs` was given to, fit or Trainer), or both (None: not
    known)."""
    def fix(python: str, command: str) -> str:
        both = f"{python}; from the CLI, {command}"
        return both if cli is None else command if cli else python

    candidates = []
    if steps:
        candidates.append(int(steps))
    if epochs:
        if steps_per_epoch is None:
            raise ConfigError("epochs needs a training set of known size. Fix: "
                              + fix("fit(steps=...) or Trainer(max_steps=...)", "trainer.max_steps=..."))
        if steps_per_epoch < 1:
            raise ConfigError("epochs (trainer.epochs): an epoch of this training set is shorter than one step "
                              "(data.batch_size x trainer.grad_accum_steps or batches_per_step examples); lower them "
                              "or give the steps: " + fix("fit(steps=...) or Trainer(max_steps=...)",
                                                          "trainer.max_steps=..."))
        if epochs * steps_per_epoch < 1:  # Lightning's rule for a limit_train_batches fraction under one batch
            least = f"{1 / steps_per_epoch:.3g}"
            asked = f"{epochs_from}(epochs={epochs})" if cli is False else f"trainer.epochs={epochs}"
            raise ConfigError(f"{asked} is {epochs * steps_per_epoch:.3g} of a step (an epoch is "
                              f"{steps_per_epoch} steps). Fix: at least "
                              + fix(f"{epochs_from}(epochs={least}) (one step), or fit(steps=...)",
                                    f"trainer.epochs={least} (one step), or set trainer.max_steps") + ".")
        candidates.append(int(math.ceil(epochs * steps_per_epoch)))
    if not candidates:
        raise ConfigError("say how long to train: " + fix("fit(epochs=...) or fit(steps=...), or Trainer(max_steps=...)"
                                                          " / Trainer(epochs=...)",
                                                          "trainer.max_steps=... or trainer.epochs=..."))
    return min(candidates)


def warn_if_epochs_cut(steps: Optional[int], epochs: Optional[float], steps_per_epoch: Optional[int],
                       fit_steps: Optional[int], fit_epochs: Optional[float], cli: bool) -> None:
    """Loudly, at the start, when `steps` (max_steps) ends the run before `epochs` does: the smaller wins, and a
    `Done: 1500 steps` after asking for 4 epochs said nothing of why. Names both settings as the user gave them
    (`fit_steps`/`fit_epochs`: fit()'s arguments, else the Trainer's; `cli`: the overrides) and the fix."""
    if not (steps and epochs and steps_per_epoch) or math.ceil(epochs * steps_per_epoch) <= steps:
        return
    wanted = int(math.ceil(epochs * steps_per_epoch))
    if cli:
        asked, cap = f"trainer.epochs={epochs:g}", f"trainer.max_steps={steps}"
        fix = f"trainer.max_steps=null, or trainer.max_steps={wanted} or more"
    else:
        asked = f"{'fit' if fit_epochs is not None else 'Trainer'}(epochs={epochs:g})"
        cap = f"fit(steps={steps})" if fit_steps is not None else f"Trainer(max_steps={steps})"
        fix = (f"leave out fit(steps=...), or fit(steps={wanted}) or more" if fit_steps is not None
               else f"Trainer(max_steps=None), or Trainer(max_steps={wanted}) or more")
    log.warning("%s is %d steps (%d per epoch), but %s ends the run first, at step %d (epoch %.3g): with both set, "
                "the smaller wins. Fix: %s, to train all %g epochs.", asked, wanted, steps_per_epoch,
                cap, steps, steps / steps_per_epoch, fix, epochs)


def _seeded(ds) -> bool:
    """A shuffle's seeds (tf.data's: 0 and 0 when neither the op nor TensorFlow's global seed was set)."""
    seeds = [getattr(ds, name, None) for name in ("_seed", "_seed2")]
    return any(s is not None and tf.get_static_value(s) not in (None, 0) for s in seeds)


def _reshuffling(data: tf.data.Dataset) -> list:
    """The seeded shuffles (and Dataset.random) in the pipeline that draw the next order of their sequence for
    each iterator made of them (an unseeded one draws a new order in each process anyway). Only the pipeline's
    own inputs are walked: a shuffle inside a function of interleave/flat_map is not seen."""
    found, stack, seen = [], [data], set()
    while stack:
        ds = stack.pop()
        if id(ds) in seen:
            continue
        seen.add(id(ds))
        if (getattr(ds, "_reshuffle_each_iteration", False) or getattr(ds, "_rerandomize", False)) and _seeded(ds):
            found.append(ds)
        try:
            stack.extend(ds._inputs())  # tf.data's own walk over a pipeline's inputs
        except (AttributeError, NotImplementedError, TypeError):
            pass
    return found


def warn_if_reshuffled_again(data: DataArg, start: int, exact_resume: bool) -> None:
    """A seeded shuffle gives each new iterator of one data set object the next order of its sequence: the
    training iterator of a second Trainer (or fit) on the object goes over other batches than a new process
    would, so skipping the batches trained on (a resume) is inexact, silently. tf.data keeps that sequence in the
    object, out of the Trainer's reach: said, with the fix, for a run a resume should repeat (`exact_resume`)."""
    if not isinstance(data, tf.data.Dataset):
        return  # a function of an InputContext builds its pipeline afresh each time
    shuffles = _reshuffling(data)  # the shuffle nodes, not the outer object: ds.map(f) made anew shares ds's shuffle
    try:
        again = any(shuffle in _trained_from for shuffle in shuffles)
        _trained_from.update(shuffles)
    except TypeError:  # not weakly referable: not tracked
        return
    if again and exact_resume:
        log.warning("The training data set's shuffle was iterated for training before in this process (by another "
                    "Trainer or fit(), maybe through another .map/.take/.batch of the same shuffled data set), and it "
                    "shuffles anew for each iterator (Dataset.shuffle's reshuffle_each_iteration): this run, at step "
                    "%d, reads its batches in another order than a new process would, so a resume does not go on with "
                    "the batches an uninterrupted run reads. Fix: build the pipeline from its source each time, "
                    "including the shuffle (a function that builds it all), or give the data through "
                    "the data config (data=...).", start)


def nothing_to_train(step: int, total: int, fit_steps: Optional[int], fit_epochs: Optional[float], config,
                     steps_per_epoch: Optional[int], cli: bool) -> str:
    """Why a fit() call trains nothing: its steps and epochs are totals (as trainer.max_steps; a resume relies
    on it), unlike Keras' fit, which trains `epochs` more. Names the form the limit came in and the fix."""
    epochs = fit_epochs if fit_epochs is not None else config.epochs  # as Trainer._fit reads them
    by_epochs = bool(epochs) and bool(steps_per_epoch) and math.ceil(epochs * steps_per_epoch) == total
    key, value = (("epochs", epochs) if by_epochs
                  else ("max_steps", fit_steps if fit_steps is not None else config.max_steps))
    value = total if value is None else value  # a limit debug.plan_fit set (overfit_batches)
    given_to_fit = fit_epochs is not None if by_epochs else fit_steps is not None
    arg = "epochs" if by_epochs else "steps" if given_to_fit else "max_steps"
    form = f"trainer.{key}={value:g}" if cli else f"{'fit' if given_to_fit else 'Trainer'}({arg}={value:g})"
    at = f" (epoch {round(step / steps_per_epoch, 2):g})" if steps_per_epoch else ""  # 0.43, not 0.42735
    # up, to 2 decimals: rounded down (1.0 for 1.0014), the total suggested ended a step short of "as much again"
    more = math.ceil(round((step / steps_per_epoch + epochs) * 100, 6)) / 100 if by_epochs else step + value
    fix = (f"trainer.{key}={more:g} (a total) to train as much again" if cli else
           f"fit({'epochs' if by_epochs else 'steps'}={more:g}) to train as much again, or fit(steps=...)")
    return (f"{form} trains until {'epoch' if by_epochs else 'step'} {value:g} in total (a total, unlike Keras' "
            f"epochs) and this run is already at step {step} of {total}: nothing to train{at}. Fix: {fix}.")
