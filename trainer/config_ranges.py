"""What a config value may be: every numeric option declares its interval with `ranged(default, "[1, inf)")`,
a string option its choices with `chosen` (`meant_option`: the choice a user meant by another tool's name or a
close spelling), and one function checks them (`check_ranges`), for the CLI
(config_check.check_config, before any work) and for the schema dataclasses themselves
(`Checked.__post_init__`, so `Trainer(max_steps=-5)` fails as `trainer.max_steps=-5` does). OmegaConf ignores
a field's metadata and never calls __post_init__ while composing (it reads the fields' defaults), so the CLI
checks the composed values itself. ConfigError, what a value that cannot work raises, lives here with the
check; trainer.config (the schemas) re-exports all of these.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import re
from dataclasses import field
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

from omegaconf import MISSING

from trainer.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work (a model, optimizer or data option); the message names the key and
    the fix. The CLI exits 2 on it, without a traceback."""


MAX_STEPS = 2**63 - 1  # the step counter is an int64 (in every checkpoint): no run is longer
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])$")
_WHOLE = re.compile(r"(typing\.)?(Optional\[)?(List\[)?int\]*|<class 'int'>")  # an int field's (or int list's) type


# Other tools' names for options of a config group (lower case): Lightning's Trainer(precision=...,
# strategy="ddp"), Keras' dtype policies (the half-precision options here are the mixed ones), tf.distribute's classes.
OPTION_SYNONYMS = {
    "precision": {"bf16": "mixed_bfloat16", "bf16-mixed": "mixed_bfloat16", "bfloat16": "mixed_bfloat16",
                  "16": "mixed_float16", "16-mixed": "mixed_float16", "fp16": "mixed_float16",
                  "float16": "mixed_float16", "32": "float32", "32-true": "float32", "fp32": "float32"},
    "strategy": {"ddp": "mirrored", "mirroredstrategy": "mirrored", "multiworkermirroredstrategy": "multi_worker",
                 "onedevicestrategy": "one_device", "tpustrategy": "tpu"},
}


def meant_option(group: str, name: str, options: Sequence[str]) -> Optional[str]:
    """The option a user most likely meant by `name`: itself in another case (`optimizer=Adam`), another tool's
    name for it (OPTION_SYNONYMS), else the closest spelling; None when none is close."""
    import difflib

    by_lower = {option.lower(): option for option in options}
    name = name.lower()
    synonym = OPTION_SYNONYMS.get(group, {}).get(name)
    close = difflib.get_close_matches(name, list(by_lower), n=1)
    if name in by_lower:
        return by_lower[name]
    return synonym if synonym in options else (by_lower[close[0]] if close else None)


def ranged(default: Any = MISSING, interval: str = "", *, factory=None) -> Any:
    """A dataclass field whose value (or each element, for a list) must lie in `interval`, written as
    in mathematics: "[1, inf)", "(0, inf)", "[0, 1)". None (an unset Optional) is always allowed."""
    if not _INTERVAL.match(interval):
        raise ValueError(f"not an interval: {interval!r}")
    if factory is not None:
        return field(default_factory=factory, metadata={"range": interval})
    return field(default=default, metadata={"range": interval})


def chosen(default: Any, choices: str) -> Any:
    """A string field whose value must be one of `choices`, written "a|b|c"; checked with the ranges.
    On an `Any` field, "true|false" among the choices admit the booleans (OmegaConf has no Union type)."""
    return field(default=default, metadata={"choices": tuple(choices.split("|"))})


def combined(default: Any) -> Any:
    """A field whose values a schema's `check_combined` judges alone (neither a range nor choices fit it: an `Any`
    field that takes a bool or a whole number); the CLI's check hands it to check_combined too."""
    return field(default=default, metadata={"combined": True})


def written(key: str, value: Any, python: str = "", cli: bool = True) -> str:
    """Setting `key` to `value` as its user writes it, so an error's fix is in the form they came from: the CLI
    override (`trainer.fast_dev_run=true`), or from Python (`cli` false) the argument (`python`: its form with
    `...` for the value, `Trainer(fast_dev_run=...)` -> `Trainer(fast_dev_run=True)`). A string in <angle brackets>
    is a placeholder, written as is (`Trainer(best_metric=<one of them>)`)."""
    placeholder = isinstance(value, str) and value.startswith("<") and value.endswith(">")
    if python and not cli:
        return python.replace("...", value if placeholder else repr(value))
    return f"{key}={value if isinstance(value, str) else _cli_literal(value)}"


def as_given(key: str, value: Any, python: str = "", cli: bool = True, shown: Optional[str] = None) -> str:
    """A setting and its value as an error's lead-in names them, in the form its user gave them (as `written`
    writes the fix): the config key (`trainer.on_divergence='retry'`; `shown`: the value as written there, else its
    repr) or, from Python (`cli` false), the argument (`python`: `Trainer(on_divergence=...)` ->
    `Trainer(on_divergence='retry')`)."""
    if python and not cli:
        return python.replace("...", repr(value))
    return f"{key}={repr(value) if shown is None else shown}"


def _cli_literal(value: Any) -> str:
    """A value as an override types it: true, null, [10,20]."""
    if isinstance(value, (list, tuple)):
        return f"[{','.join(map(_cli_literal, value))}]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def python_forms(schema, call: str) -> Dict[str, str]:
    """Field name -> how Python sets it (`Trainer(max_steps=...)`) for every field of `schema`, set through `call`."""
    return {f.name: f"{call}({f.name}=...)" for f in dataclasses.fields(schema)}


_PYTHON_LITERALS = {"true": True, "false": False, "null": None}  # choices the CLI spells so (an `Any` field's)


def _as_choice(value: Any) -> Any:
    """A boolean as the CLI spells it ("true"/"false"), to compare with a field's choices."""
    return str(value).lower() if isinstance(value, bool) else value


def _bound(text: str):
    """An interval's bound, exactly: int64's limit as a float would round up and let 2**63 in."""
    return int(text) if re.fullmatch(r"-?\d+", text) else float(text)


def _inside(value: float, interval: str) -> bool:
    opening, lo, hi, closing = _INTERVAL.match(interval).groups()
    lo, hi = _bound(lo), _bound(hi)
    return (lo <= value if opening == "[" else lo < value) and (value <= hi if closing == "]" else value < hi)


def _describe(interval: str) -> str:
    opening, lo, hi, closing = _INTERVAL.match(interval).groups()
    if hi == "inf":
        return f"{'>=' if opening == '[' else '>'} {lo}"
    return f"in {interval}"


def check_ranges(schema, values: Mapping[str, Any], prefix: str, python: Optional[Mapping[str, str]] = None) -> None:
    """Raises ConfigError naming `prefix.key`, its value and its range for the first value out of range
    (or, for a `chosen` field, its choices for a value that is none of them; for an int field, not whole). The
    fix names the CLI override, or with `python` (field name -> its Python form, `Trainer(max_steps=...)`: the
    values came from Python) the argument to give.

    Strings are skipped: an unresolved `???` (reported by OmegaConf when it is used) or a wrong type
    (OmegaConf rejects those while composing); not in an int field (from Python: `Trainer(max_steps="5")`)."""
    for f in dataclasses.fields(schema):
        interval, choices = f.metadata.get("range"), f.metadata.get("choices")
        value = values.get(f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        form = (python or {}).get(f.name)
        fix = f"give {form}" if form else f"set {key} to"  # `give Trainer(max_steps=...) a value >= 1`
        setting = as_given(key, value, form or "", cli=not form)  # `trainer.max_steps=-1`, `Trainer(max_steps=-1)`
        items = value if isinstance(value, (list, tuple)) else [value]
        if value not in (None, MISSING) and _WHOLE.fullmatch(str(f.type)) and not all(
                isinstance(item, numbers.Integral) and not isinstance(item, bool) for item in items):
            raise ConfigError(f"{setting} is not a whole number. Fix: {fix} whole numbers.")
        if choices is not None and value is not None and _as_choice(value) not in choices:
            meant = meant_option(prefix, value, choices) if isinstance(value, str) else None
            # from Python, true/false/null are the literals: Trainer(jit_compile=True), not 'true'
            given = _PYTHON_LITERALS.get(meant, meant) if form else meant
            guess = f"did you mean {written(key, given, form or '', cli=not form)}? Else " if meant else ""
            raise ConfigError(f"{setting} is not one of {'|'.join(choices)}. Fix: {guess}{fix} one of them.")
        if interval is None or value is None:
            continue
        as_set = as_given(key, value, form or "", cli=not form, shown=str(value))
        for item in items:
            each = "each element " if isinstance(value, (list, tuple)) else ""
            if isinstance(item, float) and not math.isfinite(item):  # inf passes "(0, inf)"'s > 0; nan fails every test
                raise ConfigError(f"{as_set} is not a finite number: {each}must be finite and "
                                  f"{_describe(interval)}. Fix: {fix} "
                                  f"{'finite values' if each else 'a finite value'} {_describe(interval)}.")
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not _inside(item, interval):
                raise ConfigError(f"{as_set} is out of range: {each}must be {_describe(interval)}. "
                                  f"Fix: {fix} {'values' if each else 'a value'} {_describe(interval)}.")


class Checked:
    """Mixin for a schema dataclass: its ranges are checked on construction (see check_ranges), that is from
    Python (the CLI checks the composed values itself, config_check), so the fixes name the Python argument.
    `config_key` is where the schema sits in the whole config, for messages; `python_call` what Python users
    set its fields through (TrainerConfig's: `Trainer(max_steps=...)`), the class itself by default."""

    config_key: ClassVar[str] = ""
    python_call: ClassVar[str] = ""

    def __post_init__(self) -> None:
        python = python_forms(type(self), self.python_call or type(self).__name__)
        check_ranges(type(self), vars(self), self.config_key, python)
        if "python" in inspect.signature(self.check_combined).parameters:
            self.check_combined(vars(self), self.config_key, python)
        else:  # a schema of its own written before `python` (values, prefix)
            self.check_combined(vars(self), self.config_key)

    @staticmethod
    def check_combined(values: Mapping[str, Any], prefix: str, python: Optional[Mapping[str, str]] = None) -> None:
        """Rules across fields (a schema's own): raise ConfigError naming the keys and the fix (`python`: as in
        check_ranges; write a fix with `written`)."""


def round_interval(largest: int, steps_per_epoch: Optional[int]) -> Tuple[int, str]:
    """An interval of at most `largest` steps a person would pick: an epoch when that fits, else `largest` to one
    significant digit (449: 400), with what it is (" (an epoch)"), not the exact bound's odd number."""
    if steps_per_epoch and 1 <= steps_per_epoch <= largest:
        return steps_per_epoch, " (an epoch)"
    if largest < 10:
        return largest, ""
    unit = 10 ** (len(str(largest)) - 1)
    return largest // unit * unit, ""
