"""Several evaluation sets: `fit(train, {"val": ds, "ood": ds2})`.

Each set is evaluated in turn and its results are merged into one eval record, the set's name before each
result (`val/loss`, `ood/accuracy`); every logger writes that record (`eval/val/loss` in MLflow, a
tensorboard/eval/<name> run per set). One set given alone (not in a dict) keeps the plain names (`loss`,
`accuracy`), so nothing that worked before changes. A monitored name (trainer.best_metric, early stopping,
plateau) is `<set>/<metric>`; a bare metric name, with several sets, means the first set's (the log says so).
"""
from __future__ import annotations

import difflib
import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from trainer.config_ranges import ConfigError, as_given, written
from trainer.errors import UserError

log = logging.getLogger("trainer.core")

RESERVED = ("train", "eval")  # `train/loss` is a train log; `eval/` is the prefix a monitor may carry

# Other names users give a result (lower case), one group a result: Keras 2's `acc`, the names Keras gives a metric
# made from a string or class without `name=`, and short forms. A wrong name of a group is told the group's name
# the results hold (`acc`: did you mean 'accuracy'?), which a spelling match alone misses.
SYNONYMS = (
    ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"),
    ("loss", "sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "crossentropy",
     "xent"),
    ("mean_squared_error", "mse"),
    ("mean_absolute_error", "mae"),
    ("root_mean_squared_error", "rmse"),
    ("perplexity", "ppl"),
    ("lr", "learning_rate"),
)


# How mode=auto tells whether a larger value is better, from a word in the name, as Keras' EarlyStopping does (the
# callbacks' mode and trainer.best_mode): a loss-like word first (`val_loss`, `error_rate`), then an accuracy-like.
LARGER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "score")
SMALLER_IS_BETTER = ("loss", "error", "mse", "mae", "perplexity")


class EvalSetError(UserError, ValueError):
    """Eval sets whose names cannot be told apart in the logs, or a monitored name no set holds."""


def names_of(eval_data: Any) -> Optional[List[str]]:
    """The set names of several eval sets (a mapping), in the order given; None for one set (or none)."""
    if not isinstance(eval_data, Mapping):
        return None
    names = list(eval_data)
    if not names:
        raise EvalSetError("fit(): the eval sets are an empty dict. Fix: give at least one name -> data set, or None.")
    for name in names:
        if not isinstance(name, str) or not name or "/" in name or name in RESERVED:
            raise EvalSetError(f"fit(): eval set name {name!r} cannot name logs: a set's name is a non-empty string "
                               f"without '/', not one of {list(RESERVED)}. Fix: rename it (e.g. 'val', 'ood').")
    return names


def merged(results: Mapping[str, Dict[str, Any]], step: int) -> Dict[str, Any]:
    """One eval record from each set's results: `<set>/<name>` for every result."""
    logs: Dict[str, Any] = {"step": step, "split": "eval"}
    for name, result in results.items():
        logs.update({f"{name}/{k}": v for k, v in result.items() if k not in ("step", "split")})
    return logs


def split_by_set(logs: Mapping[str, Any], names: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """The inverse of `merged`, for loggers that keep a series per set (TensorBoard's runs)."""
    out: Dict[str, Dict[str, Any]] = {name: {} for name in names}
    for key, value in logs.items():
        head, _, tail = key.partition("/")
        if head in out and tail:
            out[head][tail] = value
    return out


def _prefixed(name: str) -> Tuple[str, str]:
    """(prefix, result): `val/acc` and `train/acc` -> ('val/', 'acc'); Keras' `val_acc` -> ('val_', 'acc')."""
    if "/" in name:
        head, _, tail = name.rpartition("/")
        return head + "/", tail
    if name.startswith("val_") and len(name) > len("val_"):
        return "val_", name[len("val_"):]
    return "", name


def meant(name: str, names: Sequence[str]) -> Optional[str]:
    """The one of `names` (the results or logs) a wrong `name` most likely means, as the user would write it: the
    same result by another name (SYNONYMS: `acc` -> 'accuracy', `val_acc` -> 'val_accuracy'), else the closest
    spelling. A prefix the names lack (`val_` before one eval set's plain results) is kept. None: nothing close."""
    head, tail = _prefixed(name)
    plain = bool(head) and not any(n.startswith(head) for n in names)
    spelt = [head + n if plain else n for n in names]  # the names as the user would write them
    for group in SYNONYMS:
        if tail.lower() in group:
            found = next((head + other for other in group if head + other in spelt), None)
            if found:
                return found
    close = difflib.get_close_matches(name, spelt, n=1)
    return close[0] if close else None


def _misspelt(name: str, known: str) -> bool:
    """`name` reads as `known` misspelt (`acuracy`, `los`, `losss`), not as a result of its own: one holding `known`
    as a `_`-separated word (`kl_loss`, `top1_accuracy`, `eval_loss`), `known` and a suffix (`lossA`, `loss2`,
    `accuracy5`) or other digits, or another result by a short name (`mae` beside `mse`, `auc`, `acc`) is not."""
    digitless = name.rstrip("0123456789") == known.rstrip("0123456789")
    if name == known or digitless or known in name.split("_") or name in known.split("_"):
        return False
    if name.startswith(known) and name[len(known)] != known[-1]:  # a suffix, not a doubled last letter (losss)
        return False
    return difflib.SequenceMatcher(None, name, known).ratio() >= 0.85


def probable_typo(asked: str, key: str, known: Sequence[str]) -> Optional[str]:
    """Before an overridden step has run (its own result names unknown): the name among `known` (what the default
    step reports: the loss and the Trainer's metrics, `<set>/` before each with several sets) that a monitored
    name outside them is most likely misspelt from (`acuracy`: 'accuracy', `val_los`: 'val_loss'), as the user
    writes it. Stricter than `meant` (no synonyms, a close spelling only): the step names results of its own
    (`val_auc`, `kl_loss`, `acc`), which are no typo. None: `key`, the record key the name reads, is known, or
    no known name is that close."""
    if key in known:
        return None
    head, tail = _prefixed(asked)
    plain = bool(head) and not any(n.startswith(head) for n in known)  # `val_` before one set's plain names
    for name in known:
        known_head, known_tail = (head, name) if plain else _prefixed(name)
        if known_head == head and _misspelt(tail, known_tail):
            return head + known_tail
    return None


def check_typo_before_run(lead: str, given: str, asked: str, key: str, default: Sequence[str],
                          sets: Optional[Sequence[str]], step: str, mode_unknown: str, fix) -> None:
    """With an overridden `step` (its result names are known only once it runs): a monitored name outside what
    the default step reports (`default`, plain names; each `<set>/` with several `sets`) yet a misspelling of one
    (probable_typo) is said as that, not as a mode to set: when mode=auto cannot judge the name (`mode_unknown`:
    the mode's name, `best_mode`; "": it can), as a ConfigError; else warned now, as its first event may be the
    run's end. `lead`: the setting and `given` name as the user gave them (as_given); `fix(what, value)`: the
    setting ('name', or 'mode') to `value`, as the user writes it."""
    train = step == "train_step"
    known = [f"train/{n}" for n in default] if train else [f"{s}/{n}" for s in sets for n in default] if sets \
        else list(default)
    close = probable_typo(asked, key, known)
    if close is None:
        return
    logs = "train logs" if train else "eval results"
    why = (f"{lead} is not among the {logs} the Trainer knows before its overridden {step} first runs, {known} "
           f"(did you mean {close!r}?)")
    if mode_unknown:
        raise ConfigError(f"{why}; and {mode_unknown}=auto cannot tell whether a larger {given!r} is better. "
                          f"Fix: {fix('name', close)}; or, if your {step} returns {given!r}, {fix('mode', 'min')} or "
                          f"{fix('mode', 'max')}.")
    log.warning("%s. It is checked at the first %s: a name they lack stops the run there. Fix: %s; nothing, if your "
                "%s returns %r.", why, "train log" if train else "evaluation", fix("name", close), step, given)


def close_hint(name: str, names: Sequence[str]) -> str:
    """" (did you mean 'x'?)" for the name `meant`, else ""."""
    found = meant(name, names)
    return f" (did you mean {found!r}?)" if found else ""


def single_set(name: str, metric_names: Optional[Sequence[str]], setting: str, say: bool = True,
               known: Optional[Sequence[str]] = None) -> str:
    """With one eval set (the recipe's split, fit's validation data) its results keep plain names, yet it is
    the set the docs call `val`, and named so beside a second one: `val/accuracy` and Keras' `val_accuracy`
    read its `accuracy`, so a monitor need not change when a set is added. That is said in the log unless
    `metric_names` (None: not known yet) lacks the name: a misspelt one (`val_acuracy`) is its caller's error, or
    `say` is false (a sweep's table reading the jobs' records). With `metric_names` None (an overridden step's,
    not known yet), nor when the name is a probable typo of a `known` one (`val_los`: its caller says so)."""
    name = name[len("eval/"):] if name.startswith("eval/") else name
    if metric_names is not None and name in metric_names:  # a step's own log named so
        return name
    for prefix in ("val/", "val_"):
        if name.startswith(prefix) and len(name) > len(prefix):
            plain = name[len(prefix):]
            known_name = plain in metric_names if metric_names is not None else not (
                known and probable_typo(name, plain, known))
            if say and known_name:
                log.info("%s=%r: the one eval set's %r (its results keep plain names).", setting, name, plain)
            return plain
    return name


def resolve(name: str, set_names: Optional[Sequence[str]], metric_names: Optional[Sequence[str]], setting: str,
            python: str = "", cli: bool = True, say: bool = True, known: Optional[Sequence[str]] = None) -> str:
    """The eval record key a monitored `name` reads: `val/accuracy` as given; a bare `accuracy` with several
    sets is the first set's (said in the log); Keras' `val_accuracy` is `val/accuracy`. `python`: the setting's
    Python form (`Trainer(best_metric=...)`), which an error's fix names when the user came from Python (`cli`
    false). An unknown set is an EvalSetError naming the available keys. `say`: as single_set's. `known`: with
    `metric_names` None, the names the default step would report (a name close to one is its caller's to say)."""
    name = name[len("eval/"):] if name.startswith("eval/") else name
    if not set_names:
        return single_set(name, metric_names, setting, say, known)
    if name.startswith("val_") and "val" in set_names and (metric_names is None or name not in metric_names):
        name = "val/" + name[len("val_"):]  # Keras' val_accuracy
    head, _, tail = name.partition("/")
    if tail and head in set_names and (metric_names is None or tail in metric_names):
        return name
    if tail:  # a set no set has (`vall/accuracy`), a metric its set lacks (`val/acc`)
        keys = [f"{s}/{m}" for s in set_names for m in (metric_names or [tail])]
        what = f"set {head!r} has no result {tail!r}" if head in set_names else f"no eval set is named {head!r}"
        raise EvalSetError(f"{as_given(setting, name, python, cli)}: {what}; the eval results are {keys}"
                           f"{close_hint(name, keys)}. Fix: {written(setting, '<one of them>', python, cli)} "
                           "(<set>/<metric>).")
    known_name = name in metric_names if metric_names is not None else not (
        known and probable_typo(name, name, known))
    if say and known_name:  # a misspelt name: the caller's error (or warning) says so
        log.info("%s=%r with the eval sets %s: judged on the first, %r (%s for another).", setting, name,
                 list(set_names), f"{set_names[0]}/{name}", written(setting, f"<set>/{name}", python, cli))
    return f"{set_names[0]}/{name}"


def guess_mode(mode: str, name: str) -> Optional[str]:
    """min or max for a monitored `name`; "auto" decides from the name (its last `/` part); None: it cannot tell
    (resolve_mode refuses it)."""
    if mode != "auto":
        return mode
    last = name.split("/")[-1].lower()
    if any(word in last for word in SMALLER_IS_BETTER):
        return "min"
    if any(word in last for word in LARGER_IS_BETTER):
        return "max"
    return None


def resolve_mode(mode: str, name: str, setting: str, python: str = "", cli: bool = True) -> str:
    """guess_mode, refusing a name it cannot judge (call it after the name is checked: a misspelt name is said as
    such, not as a mode to set). `setting`: the mode's key (`trainer.best_mode`), `python` its Python form
    (`Trainer(best_mode=...)`), which the fix names when the user came from Python (`cli` false)."""
    guessed = guess_mode(mode, name)
    if guessed is not None:
        return guessed
    raise ConfigError(f"{written(setting, 'auto', python, cli)} cannot tell whether a larger {name!r} is better. "
                      f"Fix: {written(setting, 'min', python, cli)} or {written(setting, 'max', python, cli)}.")
