"""Command-line overrides Hydra rejects without saying the fix, checked before Hydra composes the config: each
exits 2 in one line naming the override and the fix, where Hydra prints several and exits 1.

- A name its config group lacks (`recipe=nonexistent`, `precision=bf16`, `logger=[jsonl,cvs]`): the group's
  options (not the base_* schemas stored beside them) and the one meant, when one is close or is another tool's
  name for it (Lightning's `bf16` is mixed_bfloat16 here).
- A key the config lacks: `max_steps=5` ("did you mean trainer.max_steps=5?", where Hydra says to add it with
  `+`, which nothing would read), `optimizer.learning_rate=1e-3` (optimizer.lr): config_check.close_keys.
- A value of the wrong type for a trainer/precision/strategy/finetune key (`trainer.max_steps=1.5`), one value for
  a list key (`trainer.profile_steps=5`).
- A key of a recipe's model/data/optimizer section, whose schema depends on the config groups chosen: the config
  is composed once, as the run (a sweep: its first job) will have it (`composition_problem`).

Each choice of a sweep (`-m recipe=mnist,resnt`) is checked; ranges and intervals are expanded by Hydra or the
sweeper, and each job is checked as it starts. A command line that points Hydra at other configs (`--config-dir`,
`hydra.searchpath`) has its groups and top-level keys judged by Hydra alone.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from typing import Any, Dict, List, Optional, Sequence

LIST_FIELDS = {"trainer.profile_steps": "trainer.profile_steps takes two steps: "
                                        "trainer.profile_steps=[N,M] (e.g. [10,20])"}
TYPED_SECTIONS = ("trainer", "precision", "strategy", "finetune")  # their schemas are the same in every recipe
# Flags and overrides that make Hydra read configs besides this package's conf/.
OTHER_CONFIGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "hydra.searchpath",
                 "+hydra.searchpath", "++hydra.searchpath")
# Other tools' names for options of a config group (lower case): Lightning's Trainer(precision=...,
# strategy="ddp"), Keras' dtype policies (the half-precision options here are the mixed ones), tf.distribute's classes.
OPTION_SYNONYMS = {
    "precision": {"bf16": "mixed_bfloat16", "bf16-mixed": "mixed_bfloat16", "bfloat16": "mixed_bfloat16",
                  "16": "mixed_float16", "16-mixed": "mixed_float16", "fp16": "mixed_float16",
                  "float16": "mixed_float16", "32": "float32", "32-true": "float32", "fp32": "float32"},
    "strategy": {"ddp": "mirrored", "mirroredstrategy": "mirrored", "multiworkermirroredstrategy": "multi_worker",
                 "onedevicestrategy": "one_device", "tpustrategy": "tpu"},
}
WORDS = {"Integer": "an integer", "Float": "a number", "Bool": "true or false", "String": "a string"}


def group_options(group: str) -> Optional[List[str]]:
    """The options of config group `group` as Hydra finds them here: conf/<group>/*.yaml and the schemas stored
    in its ConfigStore (trainer.config's and the recipes' base_*); None when `group` is no config group."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.object_type import ObjectType

    if not group or "/" in group or "." in group or group == "hydra":
        return None
    folder = importlib.resources.files("trainer.conf") / group
    names = {p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")} if folder.is_dir() else set()
    store = ConfigStore.instance()
    if store.get_type(group) == ObjectType.GROUP:
        names.update(name[:-len(".yaml")] if name.endswith(".yaml") else name for name in store.list(group))
    return sorted(names) if names or folder.is_dir() else None


def config_groups() -> List[str]:
    """The config groups (conf/'s folders, the ConfigStore's groups), Hydra's own (hydra/...) left out."""
    from hydra.core.config_store import ConfigStore

    folders = [p.name for p in importlib.resources.files("trainer.conf").iterdir() if p.is_dir()]
    names = {*folders, *ConfigStore.instance().list("")} - {"hydra"}
    return sorted(name for name in names if not name.startswith("_") and group_options(name) is not None)


def _choices(value: Any) -> List[Any]:
    """A sweep's choices (logger=jsonl,csv), or the value itself."""
    return list(value.list) if hasattr(value, "list") else [value]


def _meant(group: str, name: str, options: Sequence[str]) -> Optional[str]:
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


def _group_problem(override, options: List[str]) -> Optional[str]:
    """`recipe=nonexistent`, `precision=bf16`, `logger=[jsonl,cvs]`, any choice of a sweep: the names the group
    lacks, its options and, when every such name has one close, the override with the names meant."""
    group, choices = override.key_or_group, _choices(override.value())
    names = [n for c in choices for n in (c if isinstance(c, list) else [c]) if isinstance(n, (str, int, float))]
    unknown = list(dict.fromkeys(str(n) for n in names if str(n) not in options))
    if not unknown:
        return None
    shown = [option for option in options if not option.startswith("base_")]  # schemas, not options
    meant = {name: _meant(group, name, shown) for name in unknown}
    fix = f"choose from {', '.join(shown)} (conf/{group}/*.yaml)."
    if all(meant.values()):
        def text(value: Any) -> str:
            if isinstance(value, list):
                return f"[{','.join(map(text, value))}]"
            return "null" if value is None else meant.get(str(value), str(value))

        fix = f"did you mean {override.get_key_element()}={','.join(map(text, choices))}? Or {fix}"
    return f"{override.input_line}: no {group} named {', '.join(map(repr, unknown))}. Fix: {fix}"


def _typed_schema(section: str) -> Optional[type]:
    from trainer import config

    return {"trainer": config.TrainerConfig, "precision": config.PrecisionConfig, "strategy": config.StrategyConfig,
            "finetune": config.FinetuneConfig}.get(section)


def _lacks_key(override, ours: bool) -> bool:
    """A plain override (no +, ++ or ~) of a key the config lacks whatever the groups chosen: a top-level key
    neither the config's nor a group's (`max_steps=5`), or a key a trainer/precision/strategy/finetune schema lacks."""
    from trainer.config import Config

    if override.is_add() or override.is_force_add() or override.is_delete() or override.is_hydra_override():
        return False
    section, _, name = override.key_or_group.partition(".")
    if not name:
        top = {f.name for f in dataclasses.fields(Config)} | {"hydra"}
        return ours and section not in top and group_options(section) is None
    schema = _typed_schema(section)
    return schema is not None and "." not in name and name not in {f.name for f in dataclasses.fields(schema)}


def _type_problem(key: str, value: Any, given: str) -> Optional[str]:
    """`trainer.max_steps=1.5` as one line naming key, value and type (OmegaConf's text spans five lines)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    section, _, name = key.partition(".")
    schema = _typed_schema(section)
    fields = {f.name: f for f in dataclasses.fields(schema)} if schema else {}
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


def _first_job(override) -> Optional[str]:
    """The override as a sweep's first job has it (`optimizer.lr=1e-3,1e-4`: `optimizer.lr=1e-3`); None for an
    interval or a glob, which only the sweeper expands."""
    from hydra.core.override_parser.types import Glob

    if not override.is_sweep_override():
        return override.input_line
    if override.is_interval_sweep() or isinstance(override.value(), Glob):
        return None
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def compose_overrides(overrides: List[str], with_hydra: bool = False):
    """The config `python -m trainer OVERRIDES` composes; `with_hydra`: with Hydra's node (its overrides applied)."""
    from hydra import compose, initialize_config_module

    from trainer.assemble import register_configs

    register_configs()  # the recipes' schemas (the CLI has stored them already; storing again replaces them)
    with initialize_config_module("trainer.conf", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=with_hydra)


def _keys(overrides) -> Dict[str, List[str]]:
    """Section -> its keys ('' the top level) of the config the command's group choices compose (a sweep's
    first job), the recipe's sections included; without them, when that fails, the typed sections'."""
    from trainer.config import Config
    from trainer.config_check import keys_by_section

    groups = [_first_job(o) for o in overrides if group_options(o.key_or_group) is not None and not o.is_delete()]
    try:
        return keys_by_section(compose_overrides([line for line in groups if line]))
    except Exception:  # noqa: BLE001 - the hint only: Hydra reports what does not compose when the run starts
        keys = {section: [f.name for f in dataclasses.fields(_typed_schema(section))] for section in TYPED_SECTIONS}
        return {"": [f.name for f in dataclasses.fields(Config)], **keys}


def _unknown_key(given: str, key: str, overrides) -> str:
    """The message for the override `given`, whose `key` (itself, or the part of it that exists not) the config
    lacks: the keys most likely meant (config_check.close_keys), as overrides of the same value."""
    from trainer.config_check import close_keys

    keys = _keys(overrides)
    section, _, name = key.rpartition(".")
    path, _, value = given.lstrip("+~").partition("=")
    below = path[len(key):] if path.startswith(key) else ""  # `trainr.max_steps=5`: trainr lacks, .max_steps below
    meant = " or ".join(f"{k}{below}={value}" for k in close_keys(name, section, keys) if not below or k in keys)
    if name in (group_options(section) or []) and section in keys:  # callbacks.early_stopping.patience=5, not chosen
        chosen = ",".join([*keys[section], name])
        return (f"{given}: {section}={name} is not chosen, so {key} has no options to set. Fix: choose it in the "
                f"same command: {section}=[{chosen}]")
    if not section:
        return (f"{name} is not a top-level key; did you mean {meant}?" if meant else
                f"{given}: {name} is not a key of the run's config (its keys: {', '.join(keys[''])}). Fix: put it "
                "under its section (trainer., data., ...): python -m trainer <your config groups> --cfg job lists "
                "them.")
    if section not in keys:
        return (f"{given}: {key} is not a key of the run's config. Fix: check the name (python -m trainer "
                "<your config groups> --cfg job lists the keys).")
    fix = f"did you mean {meant}?" if meant else "use one of its keys:"
    return f"{given}: {section} has no key {name!r}. Fix: {fix} ({', '.join(keys[section])})"


def composition_problem(overrides) -> Optional[str]:
    """A recipe section's key with a value of the wrong type or a name its schema lacks, as one line (Hydra
    prints OmegaConf's five and exits 1). Composes the config as the run (a sweep: its first job) will, only
    when such a key is overridden. `overrides`: the command line's, parsed."""
    import re

    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    jobs = {line: o for o in overrides if not o.is_hydra_override() and (line := _first_job(o))}
    if not any("." in o.key_or_group and o.key_or_group.partition(".")[0] not in TYPED_SECTIONS for o in jobs.values()):
        return None
    try:
        compose_overrides(list(jobs))
    except ConfigCompositionException as e:
        cause = e.__cause__
        if not isinstance(cause, (ValidationError, ConfigKeyError, ConfigAttributeError)):
            return None  # Hydra's own message names it
        where = str(cause.full_key)
        given = next((line for line, o in jobs.items()
                      if where == o.key_or_group or where.startswith((f"{o.key_or_group}.", f"{o.key_or_group}["))
                      or o.key_or_group.startswith(f"{where}.")), None)
        if given is None:
            return None
        key, _, value = given.lstrip("+~").partition("=")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):  # wrong in every job: the sweep named
            return _unknown_key(jobs[given].input_line, where, overrides)
        kind = re.search(r"could not be converted to (\w+)", str(cause))
        if not kind:
            return f"{given}: {str(cause).splitlines()[0]}"
        words = WORDS.get(kind.group(1), kind.group(1))
        bad = re.search(r"Value '(.*?)' (?:of type \S+ )?could not be converted", str(cause))
        if value.strip().startswith("[") and bad:  # a list key (model.hidden_units=[64,abc]): one element is wrong
            return (f"{given}: {key} takes a list, and its element {bad.group(1)!r} is not {words}. "
                    f"Fix: make every element of {key} {words}.")
        return f"{given}: {key} takes {words}, not {value!r}. Fix: give {key} {words}."
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as before
        return None
    return None


def _problem(override, overrides, ours: bool) -> Optional[str]:
    """What is wrong with one override of the command line, found without composing the config."""
    key, given = override.key_or_group, override.input_line
    options = group_options(key) if ours and not override.is_hydra_override() else None
    if options is not None:
        return None if override.is_delete() else _group_problem(override, options)
    if _lacks_key(override, ours):
        return _unknown_key(given, key, overrides)
    if override.is_sweep_override() and not override.is_choice_sweep():
        return None  # range(...)/interval(...): Hydra and the sweeper expand them; each job is checked then
    for value in _choices(override.value()):
        if key in LIST_FIELDS and value is not None and not isinstance(value, list):
            return f"{given}: {LIST_FIELDS[key]}."
        wrong_type = _type_problem(key, value, given) if not override.is_delete() else None
        if wrong_type:
            return wrong_type
    return None


def problem_in(args: Sequence[str]) -> Optional[str]:
    """The first override of `args` (the command line) that Hydra would reject without a fix, as a message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's own message names it
        return None
    ours = not any(a.startswith(OTHER_CONFIGS) for a in args)  # only this package's conf/: its groups and keys
    for override in overrides:
        problem = _problem(override, overrides, ours)
        if problem:
            return problem
    return composition_problem(overrides) if ours else None
