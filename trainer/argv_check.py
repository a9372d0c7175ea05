"""Command-line overrides Hydra rejects without saying the fix, checked before Hydra composes the config.

A value of the wrong type for a trainer/precision/strategy/finetune key (`trainer.max_steps=1.5`) exits 2 in
one line naming key, value and type.

`trainer.profile_steps=5` (Hydra: "int is not a ListConfig") and a misspelt name in a list-valued config
group such as `logger=[jsonl,cvs]` (Hydra: "Could not load 'logger/cvs'", no options) exit 2 with the fix.
"""
from __future__ import annotations

import importlib.resources
from typing import Any, List, Optional, Sequence

LIST_FIELDS = {"trainer.profile_steps": "trainer.profile_steps takes two steps: trainer.profile_steps=[N,M] (e.g. [10,20])"}


def _options(group: str) -> Optional[List[str]]:
    """The names conf/<group>/*.yaml offers, or None when `group` is no config group of ours."""
    folder = importlib.resources.files("trainer.conf") / group
    if "/" in group or "." in group or not folder.is_dir():
        return None
    return sorted(p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _choices(value: Any) -> List[Any]:
    """A sweep's choices (logger=jsonl,csv), or the value itself."""
    return list(value.list) if hasattr(value, "list") else [value]


TYPED_SECTIONS = ("trainer", "precision", "strategy", "finetune")  # their schemas are the same in every recipe


def _type_problem(key: str, value: Any, given: str) -> Optional[str]:
    """`trainer.max_steps=1.5` as one line naming key, value and type (OmegaConf's text spans five lines)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    from trainer import config

    section, _, name = key.partition(".")
    schema = {"trainer": config.TrainerConfig, "precision": config.PrecisionConfig, "strategy": config.StrategyConfig,
              "finetune": config.FinetuneConfig}.get(section)
    fields = {f.name: f for f in config.dataclasses.fields(schema)} if schema else {}
    if name not in fields or (isinstance(value, str) and "${" in value):
        return None
    try:
        setattr(OmegaConf.structured(schema), name, value)
    except ValidationError:
        kind = str(fields[name].type).replace("typing.", "")
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, kind)
        return f"{given}: {key} takes {words}{' (or null)' if optional else ''}, not {value!r}. Fix: give {key} {words}."
    return None


def problem_in(args: Sequence[str]) -> Optional[str]:
    """The first override of `args` (the command line) that Hydra would reject without a fix, as a message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides_given = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(overrides_given)
    except Exception:  # a syntax error: Hydra's own message names it
        return None
    for override in overrides:
        key, given = override.key_or_group, override.input_line
        options = _options(key)
        if override.is_sweep_override() and not override.is_choice_sweep():
            continue  # range(...)/interval(...): Hydra and the sweeper expand them; each job is checked then
        for value in _choices(override.value()):
            if key in LIST_FIELDS and value is not None and not isinstance(value, list):
                return f"{given}: {LIST_FIELDS[key]}."
            wrong_type = _type_problem(key, value, given) if key.startswith(TYPED_SECTIONS) and not override.is_delete() else None
            if wrong_type:
                return wrong_type
            unknown = [v for v in value if v not in options] if options and isinstance(value, list) else []
            if unknown:
                return (f"{given}: no {key} named {', '.join(map(repr, unknown))}. "
                        f"Fix: choose from {', '.join(options)} (conf/{key}/*.yaml).")
    return None
