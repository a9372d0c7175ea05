"""Command-line overrides Hydra rejects without saying the fix, checked before Hydra composes the config.

A value of the wrong type for a trainer/precision/strategy/finetune key (`trainer.max_steps=1.5`) exits 2 in
one line naming key, value and type; for a key of a recipe's model/data/optimizer (`optimizer.lr=abc`), whose
schema depends on the config groups chosen, the config is composed once first (`composition_problem`).

`trainer.profile_steps=5` (Hydra: "int is not a ListConfig") and a misspelt name in a list-valued config
group such as `logger=[jsonl,cvs]` (Hydra: "Could not load 'logger/cvs'", no options) exit 2 with the fix.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any, List, Optional, Sequence

LIST_FIELDS = {"trainer.profile_steps": "trainer.profile_steps takes two steps: "
                                        "trainer.profile_steps=[N,M] (e.g. [10,20])"}


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
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
    if schema and name and "." not in name and name not in fields and not given.startswith(("+", "~")):
        import difflib

        close = difflib.get_close_matches(name, fields, n=3)
        hint = f"did you mean {', '.join(f'{section}.{c}' for c in close)}?" if close else "use one of its keys:"
        return f"{given}: {section} has no key {name!r}. Fix: {hint} ({', '.join(sorted(fields))})"
    if name not in fields or (isinstance(value, str) and "${" in value):
        return None
    try:
        setattr(OmegaConf.structured(schema), name, value)
    except ValidationError:
        kind = str(fields[name].type).replace("typing.", "")
        optional = kind.startswith("Optional[")
        kind = kind[len("Optional["):-1] if optional else kind
        words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind, kind)
        return (f"{given}: {key} takes {words}{' (or null)' if optional else ''}, not {value!r}. "
                f"Fix: give {key} {words}.")
    return None


WORDS = {"Integer": "an integer", "Float": "a number", "Bool": "true or false", "String": "a string"}


def composition_problem(args: Sequence[str], sweep: bool) -> Optional[str]:
    """A recipe section's key with a value of the wrong type or a name its schema lacks, as one line (Hydra
    prints OmegaConf's five and exits 1). Composes the config as the run will, only when such a key is
    overridden and no sweep is asked (each sweep job is checked as it starts)."""
    import re

    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    overrides = [a for a in args if "=" in a and not a.startswith(("-", "hydra.", "+hydra.", "~hydra."))]
    section_keys = [a for a in overrides if "." in a.split("=")[0] and not a.lstrip("+~").startswith(TYPED_SECTIONS)]
    if not section_keys or sweep or any(a.startswith(("-m", "--multirun")) for a in args):
        return None
    from trainer.assemble import register_configs

    register_configs()  # the recipes' schemas (the CLI has stored them already; storing again replaces them)
    try:
        with initialize_config_module("trainer.conf", version_base="1.3"):
            compose("config", overrides=overrides)
    except ConfigCompositionException as e:
        given = next((a for a in section_keys if f"override {a}" in str(e) or f"'{a.split('=')[0]}'" in str(e)), None)
        if given is None or not isinstance(e.__cause__, (ValidationError, ConfigKeyError, ConfigAttributeError)):
            return None  # Hydra's own message names it
        key, _, value = given.lstrip("+~").partition("=")
        if isinstance(e.__cause__, (ConfigKeyError, ConfigAttributeError)):
            return (f"{given}: {str(e.__cause__).splitlines()[0]}. Fix: check the name "
                    "(python -m trainer <your config groups> --cfg job lists the keys).")
        kind = re.search(r"could not be converted to (\w+)", str(e.__cause__))
        if not kind:
            return f"{given}: {str(e.__cause__).splitlines()[0]}"
        words = WORDS.get(kind.group(1), kind.group(1))
        bad = re.search(r"Value '(.*?)' (?:of type \S+ )?could not be converted", str(e.__cause__))
        if value.strip().startswith("[") and bad:  # a list key (model.hidden_units=[64,abc]): one element is wrong
            return (f"{given}: {key} takes a list, and its element {bad.group(1)!r} is not {words}. "
                    f"Fix: make every element of {key} {words}.")
        return f"{given}: {key} takes {words}, not {value!r}. Fix: give {key} {words}."
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as before
        return None
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
            wrong_type = (_type_problem(key, value, given)
                          if key.startswith(TYPED_SECTIONS) and not override.is_delete() else None)
            if wrong_type:
                return wrong_type
            unknown = [v for v in value if v not in options] if options and isinstance(value, list) else []
            if unknown:
                return (f"{given}: no {key} named {', '.join(map(repr, unknown))}. "
                        f"Fix: choose from {', '.join(options)} (conf/{key}/*.yaml).")
    return composition_problem(args, sweep=any(o.is_sweep_override() for o in overrides))
