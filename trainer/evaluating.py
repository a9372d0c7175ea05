"""One evaluation pass over the eval set (or several named sets): the loop's evaluations, Trainer.evaluate and
python -m trainer.evaluate go through `evaluate`. It restarts the eval window, reads the batches in chunks (the
bar moves while the loop stays in the graph), and records what it read (trainer.eval_batches) and counted
(trainer.eval_counts: per set, what the learning check judges)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from trainer import evalsets, step_functions
from trainer.console import bar_shown
from trainer.inputs import distribute
from trainer.iterator_release import release_in_background
from trainer.tracking import kept_aside

log = logging.getLogger("trainer.core")


def evaluate(trainer, eval_data, *, steps: Optional[int], step: int, callbacks=None, show_bar: bool = True,
             asked: bool = False) -> Dict[str, Any]:
    """The loss and metrics (and an overridden test_step's logs) over the eval set, or `steps` batches of
    it; with `callbacks` (the loop's evaluations), on_eval_begin and on_eval_end around it. `show_bar`: False hides
    the progress bar (Keras' evaluate(verbose=0)), else it shows as the Trainer's config says. `asked`: `steps` is
    the caller's evaluate(steps=...), so a set shorter than that is said (Keras warns that the input ran out). Sets
    trainer.eval_batches before on_eval_end, so a callback reads this evaluation's count. Several named sets
    (a dict): evaluate_sets."""
    if evalsets.names_of(eval_data) is not None:
        return evaluate_sets(trainer, eval_data, steps=steps, step=step, callbacks=callbacks, show_bar=show_bar,
                             asked=asked)
    # a train window's state in the adopted metrics goes on after; on_eval_end reads the evaluation's
    with kept_aside(trainer.eval_window.adopted.values()):
        logs = _evaluated(trainer, eval_data, steps=steps, step=step, callbacks=callbacks, show_bar=show_bar)
        _say_short(asked, steps, trainer.eval_batches)
        trainer.eval_counts = {None: trainer.eval_window.counts()}
        if callbacks is not None:
            callbacks.on_eval_end(trainer, step, logs)
    return logs


def _evaluated(trainer, eval_data, *, steps: Optional[int], step: int, callbacks, show_bar: bool) -> Dict[str, Any]:
    """evaluate's logs (one set), on_eval_begin called."""
    t = trainer
    t.eval_window.restart()
    if callbacks is not None:
        callbacks.on_eval_begin(t, step)
    holder = [iter(distribute(eval_data, t.strategy, training=False))]  # its only reference: see the end
    bar = None
    if show_bar and t.config.verbose and bar_shown(t.config.progress_bar):  # verbose=False: nothing on the terminal
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    done, chunk = 0, 25  # batches per call: the bar moves while the loop stays in the graph
    while steps is None or done < steps:
        want = chunk if steps is None else min(chunk, steps - done)
        n = step_functions.run_eval(t, holder[0], want)
        done += n
        if bar is not None:
            bar.update(n)
        if n < want:
            break
    if bar is not None:
        bar.close()
    release_in_background(holder, t.strategy.num_replicas_in_sync)  # its destruction can wait (iterator_release.py)
    t.eval_batches = done  # what this evaluation read (python -m trainer.evaluate records it)
    return {"step": step, "split": "eval", **t.eval_window.logs()}


def evaluate_sets(trainer, eval_sets, *, steps, step: int, callbacks=None, show_bar: bool = True,
                  asked: bool = False) -> Dict[str, Any]:
    """Each named eval set in turn (`steps`: one limit for all, or name -> limit), as one eval event: one
    on_eval_begin/on_eval_end around them, with the results merged as `<name>/<metric>` (evalsets.py);
    trainer.eval_batches: all sets' batches."""
    t = trainer
    if callbacks is not None:
        callbacks.on_eval_begin(t, step)
    results, read, counts = {}, 0, {}
    with kept_aside(t.eval_window.adopted.values()):  # on_eval_end reads the adopted metrics at the last set's end
        for name, data in eval_sets.items():
            limit = steps.get(name) if isinstance(steps, dict) else steps
            results[name] = _evaluated(t, data, steps=limit, step=step, callbacks=None, show_bar=show_bar)
            _say_short(asked, limit, t.eval_batches, name)
            read, counts[name] = read + t.eval_batches, t.eval_window.counts()
        t.eval_batches, t.eval_counts = read, counts
        logs = evalsets.merged(results, step)
        if callbacks is not None:
            callbacks.on_eval_end(t, step, logs)
    return logs


def _say_short(asked: bool, steps: Optional[int], read: int, name: Optional[str] = None) -> None:
    """evaluate(steps=N) on a set of fewer batches: the results are of those, said (they were silently fewer)."""
    if asked and steps is not None and read < steps:
        log.warning("evaluate(steps=%d): the eval set%s has only %d batches, so the results are of those %d. Fix: "
                    "steps=%d or fewer (or None: the whole set).", steps, f" {name!r}" if name else "", read, read,
                    read)
