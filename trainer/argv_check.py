"""Command-line overrides Hydra rejects without saying the fix, checked before Hydra composes the config: each
exits 2 in one line naming the override and the fix, where Hydra prints several and exits 1. python -m trainer,
the doctor and lr_find call `problem_in`.

- Not an override: Hydra's grammar rejects it (`trainer.max_steps`, `logger=[jsonl`), an argparse flag
  (`--max_steps 5`: "Hydra overrides have no dashes"; a flag of the doctor or lr_find, `--set-auto`: that
  command's line, its flags read from its parser), `~logger` (a list group: `logger=[]`).
- A name its config group lacks (`recipe=nonexistent`, `precision=bf16`, `logger=[jsonl,cvs]`, `precision=null`):
  the group's options (not the base_* schemas stored beside them) and the one meant (trainer/groups.py).
- A key the config lacks: `max_steps=5` ("did you mean trainer.max_steps=5?", where Hydra says to add it with
  `+`, which nothing would read), `optimizer.learning_rate=1e-3` (optimizer.lr: config_check.close_keys), a key of
  another option of its group (`optimizer.momentum`: optimizer=sgd), a callback not chosen, a new entry of a
  free-form section without `+` (trainer/argv_keys.py).
- A value of the wrong type for a trainer/precision/strategy/finetune key (`trainer.max_steps=1.5`), one value for
  a list key (`trainer.profile_steps=5`).
- A key of a recipe's section or the top level (`data.batch_size=abc`, `seed=abc`), or an option the recipe's
  keys do not fit (`recipe=resnet optimizer=adam`): the config is composed as the run will have it, and for a
  sweep of keys each value's job is composed and checked as a job would be (`composition_problem`).

Ranges and intervals of a sweep are expanded by Hydra or the sweeper, and each job is checked as it starts. A
command line that points Hydra at other configs (`--config-dir`, `hydra.searchpath`) has its groups and keys
judged by Hydra alone; Hydra's shell completion (`-sc`) is left to Hydra.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence

from trainer.argv_keys import TYPED_SECTIONS, choices_of, first_job, lacks_key, typed_schema, unknown_key
from trainer.hydra_flags import commands_problem, hydra_args, other_configs, positionals
from trainer.groups import LIST_GROUPS, attempt, composed, group_options, meant_option
from trainer.loss_overrides import shorthand_problem

LIST_FIELDS = {"trainer.profile_steps": "trainer.profile_steps takes two steps: "
                                        "trainer.profile_steps=[N,M] (e.g. [10,20])"}
# Hydra's shell completion (`-sc install=bash`): its argument is no override.
SHELL_COMPLETION = ("-sc", "--shell-completion")
WORDS = {"Integer": "an integer", "Float": "a number", "Bool": "true or false", "String": "a string"}


def _group_problem(override, options: List[str]) -> Optional[str]:
    """`recipe=nonexistent`, `precision=bf16`, `logger=[jsonl,cvs]`, any choice of a sweep: the names the group
    lacks, its options and, when every such name has one close, the override with the names meant."""
    group, choices = override.key_or_group, choices_of(override.value())
    shown = [option for option in options if not option.startswith("base_")]  # schemas, not options
    if any(c is None or (isinstance(c, list) and None in c) for c in choices):  # precision=null, logger=[null]
        none = f", or none: {group}=[]" if group in LIST_GROUPS else ""
        return (f"{override.input_line}: {group} takes one of its options, not null. Fix: choose from "
                f"{', '.join(shown)} (conf/{group}/*.yaml){none}.")
    names = [n for c in choices for n in (c if isinstance(c, list) else [c]) if isinstance(n, (str, int, float))]
    unknown = list(dict.fromkeys(str(n) for n in names if str(n) not in options))
    if not unknown:
        return None
    meant = {name: meant_option(group, name, shown) for name in unknown}
    fix = f"choose from {', '.join(shown)} (conf/{group}/*.yaml)."
    if all(meant.values()):
        def text(value: Any) -> str:
            if isinstance(value, list):
                return f"[{','.join(map(text, value))}]"
            return "null" if value is None else meant.get(str(value), str(value))

        fix = f"did you mean {override.get_key_element()}={','.join(map(text, choices))}? Or {fix}"
    return f"{override.input_line}: no {group} named {', '.join(map(repr, unknown))}. Fix: {fix}"


def _type_problem(key: str, value: Any, given: str) -> Optional[str]:
    """`trainer.max_steps=1.5` as one line naming key, value and type (OmegaConf's text spans five lines)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError

    section, _, name = key.partition(".")
    schema = typed_schema(section)
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


def _blamed(where: str, jobs) -> Optional[str]:
    """The override (a line of `jobs`) an error at config path `where` is about: a key's override before a
    group's (`optimizer=sgd optimizer.lr=abc`: the second), the longest key first."""
    def about(key: str) -> bool:
        return where == key or where.startswith((f"{key}.", f"{key}[")) or key.startswith(f"{where}.")

    found = [(group_options(o.key_or_group) is not None, -len(o.key_or_group), line)
             for line, o in jobs.items() if about(o.key_or_group)]
    return min(found)[2] if found else None


def _composition_error(lines: List[str], jobs, overrides) -> Optional[str]:
    """What is wrong in the config `lines` compose, as one line naming the override of `jobs` (line -> parsed)
    it is about; None when they compose or Hydra's own message names it."""
    import re

    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    error = attempt(tuple(lines))[1]
    try:
        if error is not None:
            raise error
    except ConfigCompositionException as e:
        cause = e.__cause__
        if not isinstance(cause, (ValidationError, ConfigKeyError, ConfigAttributeError)):
            return _recipe_conflict(str(e), jobs)
        where = str(cause.full_key)
        given = _blamed(where, jobs)
        if given is None:
            return None
        key, _, value = given.lstrip("+~").partition("=")
        if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):  # wrong in every job: the sweep named
            return unknown_key(jobs[given].input_line, where, overrides)
        if "is not Optional" in str(cause):
            return _not_optional(given, key, cause)
        kind = re.search(r"could not be converted to (\w+)", str(cause))
        if "is not a ListConfig, list or tuple" in str(cause):  # model.hidden_units=16: one value for a list
            return f"{given}: {key} takes a list, not {value!r}. Fix: {key}=[{value}] (brackets: a list of one)."
        if not kind:
            return (f"{given}: {str(cause).splitlines()[0]}. Fix: give {key} a value of its type "
                    "(python -m trainer --cfg job shows the config).")
        words = WORDS.get(kind.group(1), kind.group(1))
        bad = re.search(r"Value '(.*?)' (?:of type \S+ )?could not be converted", str(cause))
        if value.strip().startswith("[") and bad:  # a list key (model.hidden_units=[64,abc]): one element is wrong
            return (f"{given}: {key} takes a list, and its element {bad.group(1)!r} is not {words}. "
                    f"Fix: make every element of {key} {words}.")
        return f"{given}: {key} takes {words}, not {value!r}. Fix: give {key} {words}."
    except Exception:  # noqa: BLE001 - anything else is the run's to report, as before
        return None
    return None


def _not_optional(given: str, key: str, cause) -> str:
    """`seed=null`: a key that takes no null, its type and default named (OmegaConf says "is not Optional")."""
    fields = {f.name: f for f in dataclasses.fields(cause.object_type)} if dataclasses.is_dataclass(
        cause.object_type) else {}
    field = fields.get(str(cause.key))
    kind = str(field.type).replace("typing.", "").replace("<class '", "").replace("'>", "") if field else ""
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(kind)
    default = field.default if field is not None else dataclasses.MISSING
    example = (f": {key}={str(default).lower() if isinstance(default, bool) else default}"
               if default is not dataclasses.MISSING and default is not None else "")
    return f"{given}: {key} takes {words or 'a value'}, not null. Fix: give {key} {words or 'a value'}{example}."


def _recipe_conflict(error: str, jobs) -> Optional[str]:
    """`recipe=resnet optimizer=adam`: the recipe sets a key of its own option (momentum, SGD's) that the option
    chosen lacks; Hydra prints OmegaConf's five lines and exits 1. None for any other error."""
    import re

    found = re.search(r"In '([\w/]+)': ConfigKeyError .*\nKey '(\w+)' not in '(\w+)'\n\s+full_key: (\S+)", error)
    if not found:
        return None
    where, section = found.group(1), found.group(4).partition(".")[0]
    given = next((line for line, o in jobs.items() if o.key_or_group == section), None)
    if given is None:
        return None
    cfg = composed(tuple(line for line, o in jobs.items()
                         if group_options(o.key_or_group) is not None and o.key_or_group != section))
    default = cfg.hydra.runtime.choices.get(section) if cfg is not None else None
    keep = f"keep the recipe's {section}={default}" if default else f"keep the recipe's {section}"
    return (f"{given}: {where} sets {found.group(4)}, a key {given} lacks ({found.group(3)}). Fix: {keep}, or "
            f"set that recipe's keys for {given} in a recipe of your own (--config-dir).")


def _sweep_problem(jobs, overrides) -> Optional[str]:
    """Each value of a sweep of keys (`-m trainer.max_steps=2,-1`), in the config of the first job with that
    value swapped in, checked as a job would be (type and range): before the first job, not at the failing one."""
    from trainer.config import ConfigError
    from trainer.config_check import check_config

    for line, o in jobs.items():
        if not (o.is_sweep_override() and o.is_choice_sweep()) or group_options(o.key_or_group) is not None:
            continue
        for value in o.sweep_string_iterator():
            job = f"{o.get_key_element()}={value}"
            lines = [job if other == line else other for other in jobs]
            problem = _composition_error(lines, {**{k: v for k, v in jobs.items() if k != line}, job: o}, overrides)
            if problem:
                return problem.replace(job, o.input_line, 1) if problem.startswith(job) else problem
            cfg = composed(tuple(lines))
            try:
                check_config(cfg, cfg.hydra.runtime.choices) if cfg is not None else None
            except ConfigError as e:
                return f"{o.input_line}: the job with {job}: {e}"
    return None


def composition_problem(overrides) -> Optional[str]:
    """A key of a recipe section or the top level with a value of the wrong type or a name its schema lacks, or
    a sweep value out of range, as one line (Hydra prints OmegaConf's five and exits 1). Composes the config as
    the run (a sweep: its first job, then each value of a sweep of keys) will, only when such a key is
    overridden. `overrides`: the command line's, parsed."""
    jobs = {line: o for o in overrides if not o.is_hydra_override() and (line := first_job(o))}
    keys = any(o.key_or_group.partition(".")[0] not in TYPED_SECTIONS and group_options(o.key_or_group) is None
               for o in jobs.values())
    recipe_parts = any(o.key_or_group not in (*TYPED_SECTIONS, *LIST_GROUPS, "recipe")
                       and group_options(o.key_or_group) is not None for o in jobs.values())  # optimizer=adam
    if not (keys or recipe_parts or any(o.is_sweep_override() for o in jobs.values())):
        return None
    return _composition_error(list(jobs), jobs, overrides) or _sweep_problem(jobs, overrides)


def _problem(override, overrides, ours: bool) -> Optional[str]:
    """What is wrong with one override of the command line, found without composing the config."""
    key, given = override.key_or_group, override.input_line
    options = group_options(key) if ours and not override.is_hydra_override() else None
    if options is not None:
        if override.is_delete() and key in LIST_GROUPS:  # Hydra: "Could not delete 'logger'", exit 1
            return f"{given}: {key} is a list of options, which Hydra cannot delete. Fix: {key}=[] (none of them)."
        return None if override.is_delete() else _group_problem(override, options)
    if lacks_key(override, ours):
        return unknown_key(given, key, overrides)
    if ours and key in ("loss", "metrics") and not override.is_hydra_override():
        shorthand = shorthand_problem(override)  # Keras' compile() forms: loss=mse, metrics=[accuracy]
        if shorthand:
            return shorthand
    if override.is_sweep_override() and not override.is_choice_sweep():
        return None  # range(...)/interval(...): Hydra and the sweeper expand them; each job is checked then
    for value in choices_of(override.value()):
        if key in LIST_FIELDS and value is not None and not isinstance(value, list):
            return f"{given}: {LIST_FIELDS[key]}."
        wrong_type = _type_problem(key, value, given) if not override.is_delete() else None
        if wrong_type:
            return wrong_type
    return None


# The commands that take python -m trainer's overrides and flags of their own (each module's make_parser()).
OTHER_COMMANDS = {"python -m trainer.doctor": "trainer.doctor.__main__", "python -m trainer.lr_find": "trainer.lr_find"}
# Another command's flag whose work python -m trainer does with a key of its own: the key, and what it is here.
OWN_WAY = {"--out": ("hydra.run.dir", "this command's run folder")}


def other_commands_flags() -> Dict[str, Dict[str, Any]]:
    """Command -> {flag: its argparse action} for OTHER_COMMANDS, read from their parsers (their import loads no
    TensorFlow: ~0.1 s, paid only for a dashed argument Hydra does not know)."""
    import importlib

    return {command: {flag: action for action in importlib.import_module(module).make_parser()._actions
                      for flag in action.option_strings if flag.startswith("--") and flag != "--help"}
            for command, module in OTHER_COMMANDS.items()}


def _command_line(command: str, own: Dict[str, Any], args: Sequence[str], unknown: set) -> str:
    """`command` with the overrides of `args` and the flags of `own` given there (with their values), plus the
    flags those need (the command module's NEEDS: the doctor's --set-auto needs --verify)."""
    import importlib
    import shlex

    words, taken = [], []
    for i, arg in enumerate(args):
        if arg not in unknown or arg.split("=", 1)[0] not in own:
            continue
        value = args[i + 1] if i + 1 < len(args) else None
        takes = own[arg.split("=", 1)[0]].nargs != 0 and "=" not in arg
        if takes and value is not None and not value.startswith("-") and "=" not in value:
            words, taken = [*words, arg, value], [*taken, value]
        else:
            words.append(arg)
    for name, need in getattr(importlib.import_module(OTHER_COMMANDS[command]), "NEEDS", {}).items():
        if name in words and need not in words:
            words.insert(words.index(name), need)
    overrides = list(positionals(args))
    for value in taken:  # a flag's value, not an override
        if value in overrides:
            overrides.remove(value)
    return " ".join([command, *map(shlex.quote, [*overrides, *words])])


def _other_command(flag: str, given: str, args: Sequence[str], unknown: set, meant: Optional[str]) -> Optional[str]:
    """`--set-auto` given to python -m trainer: a flag of the doctor (or lr_find), whose command line is the fix;
    first the override meant, when the flag is also a key here (`--steps 5`: trainer.max_steps=5)."""
    flags = other_commands_flags()
    commands = [command for command, own in flags.items() if flag in own]
    if not commands:
        return None
    fixes = [_command_line(command, flags[command], args, unknown) for command in commands]
    if meant:
        fixes.insert(0, f"did you mean {meant}?")
    elif flag in OWN_WAY:
        fixes.insert(0, f"{OWN_WAY[flag][0]}={given.split('=', 1)[-1].split(' ', 1)[-1]} ({OWN_WAY[flag][1]})")
    fix = fixes[0]
    for later in fixes[1:]:
        fix += f" Or {later}" if fix.endswith("?") else f", or {later}"
    return (f"{given}: a flag of {' and '.join(commands)}, not of python -m trainer (its arguments are Hydra "
            f"overrides, key=value). Fix: {fix}.")


def _dashed(args: Sequence[str]) -> Optional[str]:
    """`--max_steps 5`, `--trainer.max_steps=5`: an argparse habit Hydra answers with 8 lines of usage. The
    override meant, the key corrected as problem_in would (`max_steps=5`: trainer.max_steps=5); a flag of the
    doctor or lr_find (`--set-auto`), that command's line. Only what Hydra's parser leaves is looked at:
    `--multi` (--multirun abbreviated) is Hydra's."""
    import re

    parsed = hydra_args(args)
    unknown = set(parsed[1]) if parsed else set()
    for i, arg in enumerate(args):
        if arg not in unknown or not arg.startswith("--") or len(arg) == 2:
            continue
        key, eq, value = arg[2:].partition("=")
        given = arg
        following = args[i + 1] if i + 1 < len(args) else None
        if not eq and following is not None and not following.startswith("-") and "=" not in following:
            value, given = following, f"{arg} {following}"
        override = f"{key}={value if eq or value else 'true'}"  # a bare flag: argparse's store_true
        problem = problem_in([override])
        meant = re.search(r"did you mean (\S+?=\S*?)\?", problem or "")
        other = _other_command(f"--{key}", given, args, unknown, meant.group(1) if meant else None)
        if other:
            return other
        if problem and not meant:  # `--foo 5`: foo=5 is no override either (was: "did you mean foo=5?")
            return f"{given}: Hydra overrides have no dashes, and as one, {problem}"
        return (f"{given}: Hydra overrides have no dashes. Fix: did you mean "
                f"{meant.group(1) if meant else override}?")
    return None


def _syntax_problem(lines: Sequence[str]) -> Optional[str]:
    """The first override Hydra's grammar rejects (it exits 1 pointing at the grammar's docs), as one line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for line in lines:
        try:
            OverridesParser.create().parse_overrides([line])
        except Exception as e:  # noqa: BLE001 - OverrideParseException, and anything the grammar raises
            if "=" not in line:
                return f"{line}: an override is key=value. Fix: give it a value: {line}=VALUE."
            reason = str(e).strip().splitlines()[0]
            return (f"{line}: Hydra cannot read it ({reason}). Fix: key=value, a list as key=[a,b] with its "
                    "brackets closed, quoted for the shell: 'key=[a,b]'.")
    return None


def problem_in(args: Sequence[str]) -> Optional[str]:
    """The first override of `args` (the command line) that Hydra would reject without a fix, as a message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.split("=")[0] in SHELL_COMPLETION for a in args):
        return None
    dashed = _dashed(args) or commands_problem(args)
    if dashed:
        return dashed
    lines = positionals(args)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception:  # noqa: BLE001 - a syntax error: named below, one override at a time
        return _syntax_problem(lines)
    ours = not other_configs(args)  # only this package's conf/: its groups and keys
    for override in overrides:
        problem = _problem(override, overrides, ours)
        if problem:
            return problem
    return composition_problem(overrides) if ours else None
