"""The keys of a command line (for trainer/argv_check.py): which schema types a section, which override names a
key the config lacks whatever the groups chosen, and the message naming the key most likely meant
(`max_steps=5`: trainer.max_steps=5; `optimizer.momentum` with adam: optimizer=sgd; a callback not chosen; a new
entry of a free-form section without `+`). The config is composed, as the command's run (a sweep: its first job)
will have it, only to find the keys of a key's section."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

from trainer.groups import as_group_choice, composed, group_options, meant_option, option_with_key

TYPED_SECTIONS = ("trainer", "precision", "strategy", "finetune")  # their schemas are the same in every recipe


def choices_of(value: Any) -> List[Any]:
    """A sweep's choices (logger=jsonl,csv), or the value itself."""
    return list(value.list) if hasattr(value, "list") else [value]


def typed_schema(section: str) -> Optional[type]:
    from trainer import config

    return {"trainer": config.TrainerConfig, "precision": config.PrecisionConfig, "strategy": config.StrategyConfig,
            "finetune": config.FinetuneConfig}.get(section)


def lacks_key(override, ours: bool) -> bool:
    """A plain override (no +, ++ or ~) of a key the config lacks whatever the groups chosen: a top-level key
    neither the config's nor a group's (`max_steps=5`), or a key a trainer/precision/strategy/finetune schema lacks."""
    from trainer.config import Config

    if override.is_add() or override.is_force_add() or override.is_delete() or override.is_hydra_override():
        return False
    section, _, name = override.key_or_group.partition(".")
    if not name:
        top = {f.name for f in dataclasses.fields(Config)} | {"hydra"}
        return ours and section not in top and group_options(section) is None
    schema = typed_schema(section)
    return schema is not None and "." not in name and name not in {f.name for f in dataclasses.fields(schema)}


def first_job(override) -> Optional[str]:
    """The override as a sweep's first job has it (`optimizer.lr=1e-3,1e-4`: `optimizer.lr=1e-3`); None for an
    interval or a glob, which only the sweeper expands."""
    from hydra.core.override_parser.types import Glob

    if not override.is_sweep_override():
        return override.input_line
    if override.is_interval_sweep() or isinstance(override.value(), Glob):
        return None
    return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"


def group_lines(overrides) -> tuple:
    """The command's group choices as its run (a sweep: the first job) makes them."""
    groups = [first_job(o) for o in overrides if group_options(o.key_or_group) is not None and not o.is_delete()]
    return tuple(line for line in groups if line)


def _keys(cfg) -> Dict[str, List[str]]:
    """Section -> its keys ('' the top level) of `cfg`, the recipe's sections included; without it (the groups
    chosen do not compose), the typed sections'."""
    from trainer.config import Config
    from trainer.config_check import keys_by_section

    if cfg is not None:
        return keys_by_section(cfg)
    keys = {section: [f.name for f in dataclasses.fields(typed_schema(section))] for section in TYPED_SECTIONS}
    return {"": [f.name for f in dataclasses.fields(Config)], **keys}


def _entry_problem(given: str, section: str, name: str, overrides, keys) -> Optional[str]:
    """`callbacks.early_stopping.patience=5` with early_stopping not chosen, or misspelt (early_stoping): the
    group's options are its entries, chosen on the command line (`callbacks=[...]`)."""
    shown = [o for o in group_options(section) or [] if not o.startswith("base_")]
    entry = name if name in shown else meant_option(section, name, shown)
    if entry is None or section not in keys:
        return None
    chosen = next((c for o in overrides if o.key_or_group == section and not o.is_delete()
                   for c in choices_of(o.value())[:1]), [])
    chosen = [str(c) for c in (chosen if isinstance(chosen, list) else [chosen]) if c is not None]
    fixed = f"{section}.{entry}{given.lstrip('+')[len(section) + 1 + len(name):]}"
    if entry not in chosen:
        fixed = f"{section}=[{','.join([*chosen, entry])}] {fixed}"
    if entry == name:
        return (f"{given}: {section}={name} is not chosen, so {section}.{name} has no options to set. Fix: choose "
                f"it in the same command: {fixed}")
    return f"{given}: {section} has no entry {name!r}. Fix: did you mean {fixed}?"


def unknown_key(given: str, key: str, overrides) -> str:
    """The message for the override `given`, whose `key` (itself, or the part of it that exists not) the config
    lacks: the keys most likely meant (config_check.close_keys), as overrides of the same value."""
    from trainer.config_check import KEY_SYNONYMS, close_keys, free_form_sections

    cfg = composed(group_lines(overrides))
    keys, free = _keys(cfg), (free_form_sections(cfg) if cfg is not None else [])
    section, _, name = key.rpartition(".")
    path, _, value = given.lstrip("+~").partition("=")
    below = path[len(key):] if path.startswith(key) else ""  # `trainr.max_steps=5`: trainr lacks, .max_steps below
    options = group_options(section) or []
    if options and (section in free or section not in keys):  # callbacks: its entries are the group's options
        entry = _entry_problem(given, section, name, overrides, keys)
        if entry:
            return entry
    if section in free:  # eval_sets.ood.path=x: a new entry of a free-form section
        return f"{given}: {section}.{name} is a new entry of {section}. Fix: add it with +: +{given.lstrip('+~')}"
    keras_way = _keras_argument(cfg, overrides, section, name, value) if not below else None
    if keras_way:  # callbacks.early_stopping.restore_best_weights=true: the Trainer's way
        return f"{given}: {section} has no key {name!r}. Fix: {keras_way}."
    if options and value in options and not below:  # optimizer.name=sgd
        return f"{given}: {section} has no key {name!r}. Fix: did you mean {section}={value}?"
    other = (option_with_key(section, name, group_lines(overrides))
             if options and name.lower() not in KEY_SYNONYMS else None)
    if other:
        return f"{given}: {key} is a key of {other}, not of the {section} chosen. Fix: did you mean {other} {given}?"
    meant = [as_group_choice(f"{k}{below}", value) for k in close_keys(name, section, keys, free)
             if not below or k in keys]
    meant = " or ".join(m for m in meant if m)
    if not section:
        return (f"{given}: {name} is not a top-level key. Fix: did you mean {meant}?" if meant else
                f"{given}: {name} is not a key of the run's config (its keys: {', '.join(keys[''])}). Fix: put it "
                "under its section (trainer., data., ...): python -m trainer <your config groups> --cfg job lists "
                "them.")
    if section not in keys:
        return (f"{given}: {key} is not a key of the run's config. Fix: check the name (python -m trainer "
                "<your config groups> --cfg job lists the keys).")
    fix = f"did you mean {meant}?" if meant else "use one of its keys:"
    return f"{given}: {section} has no key {name!r}. Fix: {fix} ({', '.join(keys[section])})"


def _keras_argument(cfg, overrides, section: str, name: str, value: str) -> Optional[str]:
    """The Trainer's way for an argument of Keras' callback of the same name (EarlyStopping's restore_best_weights,
    verbose, start_from_epoch; ReduceLROnPlateau's epsilon) under a chosen callback of the group; None else. Its
    monitor and mode as the command line (else the config) sets them."""
    from omegaconf import DictConfig, OmegaConf

    from trainer.other_tools import keras_argument_fix

    node = OmegaConf.select(cfg, section) if cfg is not None and section.startswith("callbacks.") else None
    call = getattr(OmegaConf.get_type(node), "python_call", "") if isinstance(node, DictConfig) else ""
    if not call:
        return None
    given = {o.key_or_group: o.value() for o in overrides if not o.is_delete() and not o.is_sweep_override()}
    monitor = given.get(f"{section}.monitor", node.get("monitor", "loss"))
    mode = given.get(f"{section}.mode", node.get("mode", "auto"))
    return keras_argument_fix(call, section, name, value, monitor, None if mode == "auto" else mode, cli=True)
