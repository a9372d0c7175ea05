"""The config groups (conf/<group>/ and the ConfigStore's schemas) and their options: which a name is, which
option a user meant by another tool's name, which option has a key. trainer/argv_check.py and trainer/cli_help.py
read them before Hydra runs; composing goes through trainer.assemble.compose."""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

from trainer.config_check import conf_dir
# defined beside the choices they check (PrecisionConfig's check names the option meant too); argv_check reads them here
from trainer.config_ranges import OPTION_SYNONYMS, meant_option  # noqa: F401

LIST_GROUPS = ("logger", "callbacks")  # several options at once (conf/config.yaml's defaults)


def group_options(group: str) -> Optional[List[str]]:
    """The options of config group `group` as Hydra finds them here: conf/<group>/*.yaml and the schemas stored
    in its ConfigStore (trainer.config's and the recipes' base_*); None when `group` is no config group."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.object_type import ObjectType

    if not group or "/" in group or "." in group or group == "hydra":
        return None
    folder = conf_dir() / group
    names = {p.name[:-len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml")} if folder.is_dir() else set()
    store = ConfigStore.instance()
    if store.get_type(group) == ObjectType.GROUP:
        names.update(name[:-len(".yaml")] if name.endswith(".yaml") else name for name in store.list(group))
    return sorted(names) if names or folder.is_dir() else None


def config_groups() -> List[str]:
    """The config groups (conf/'s folders, the ConfigStore's groups), Hydra's own (hydra/...) left out."""
    from hydra.core.config_store import ConfigStore

    folders = [p.name for p in conf_dir().iterdir() if p.is_dir()]
    names = {*folders, *ConfigStore.instance().list("")} - {"hydra"}
    return sorted(name for name in names if not name.startswith("_") and group_options(name) is not None)


@functools.lru_cache(maxsize=32)
def attempt(lines: tuple) -> tuple:
    """(the config `lines` compose with Hydra's node and its runtime.choices, None) or (None, the error):
    composed once for every check of the same lines (a sweep's jobs, the hints)."""
    from trainer.assemble import compose

    try:
        return compose(lines, with_hydra=True), None
    except Exception as e:  # noqa: BLE001 - the caller says what it makes of it
        return None, e


def composed(lines: tuple):
    """The config `lines` compose; None when they do not (Hydra reports it when the run starts)."""
    return attempt(tuple(lines))[0]


def _option_keys(group: str, option: str, depth: int = 0) -> Optional[set]:
    """The keys option `option` of `group` gives its section, read from conf/<group>/<option>.yaml and the
    schemas its defaults list names (ConfigStore), without composing; None when they cannot be told so."""
    import yaml
    from hydra.core.config_store import ConfigStore

    path = conf_dir() / group / f"{option}.yaml"
    if path.is_file():
        text = path.read_text()
        if depth > 4 or "@package" in text:
            return None
        node = yaml.safe_load(text) or {}
        if not isinstance(node, dict):
            return None
        keys = set(node) - {"defaults"}
        for entry in node.get("defaults", []):
            if entry == "_self_":
                continue
            more = _option_keys(group, entry, depth + 1) if isinstance(entry, str) and "/" not in entry else None
            if more is None:
                return None
            keys |= more
        return keys
    try:
        return set(ConfigStore.instance().load(f"{group}/{option}.yaml").node)
    except Exception:  # noqa: BLE001 - neither a yaml nor a stored schema: composing tells
        return None


def option_with_key(section: str, name: str, lines: Sequence[str]) -> Optional[str]:
    """`group=option` for the option of group `section`, not the one `lines` (group choices) choose, whose
    section has key `name` (optimizer.momentum: sgd's), the option nearest the chosen one's name first (adam:
    adamw before sgd); None for none. An option's yaml and schemas are read first: only one that may have the
    key is composed to be sure."""
    import difflib

    cfg = composed(tuple(lines))
    current = cfg.hydra.runtime.choices.get(section) if cfg is not None else None
    if current is None:
        return None
    shown = [o for o in group_options(section) or [] if not o.startswith("base_") and o != current]
    others = tuple(line for line in lines if not line.startswith(f"{section}="))
    for option in sorted(shown, key=lambda o: -difflib.SequenceMatcher(None, current, o).ratio()):
        keys = _option_keys(section, option)
        if keys is not None and name not in keys:
            continue
        cfg = composed((*others, f"{section}={option}"))
        if cfg is not None and name in cfg.get(section, {}):
            return f"{section}={option}"
    return None


def as_group_choice(key: str, value: str) -> Optional[str]:
    """`precision=bf16-mixed` as the override meant when `key` is a config group: its value translated to the
    option (`precision=mixed_bfloat16`); None when no option is meant."""
    options = group_options(key)
    if options is None:
        return f"{key}={value}"
    shown = [o for o in options if not o.startswith("base_")]
    meant = value if value in shown else meant_option(key, value, shown)
    return f"{key}={meant}" if meant else None


