"""Writes docs/reference/config.md from the structured-config dataclasses, so the reference cannot drift.

Every schema that `trainer.assemble.register_configs()` puts in Hydra's ConfigStore (trainer/config.py and
each recipe module's own) is listed with its fields' types, defaults and descriptions. A description is
the field's trailing `#` comment, or the `#` comment lines right above it, or (for an overriding field
with neither) the base class's. Fields of trainer/config.py that have no comment yet take theirs from
FALLBACK below; tests/test_docs.py fails when a field has no description or a fallback is stale.

The page is committed rather than generated at build time: it reads on GitHub without a build, its diff
shows in review beside the dataclass change that caused it, and `mkdocs build` needs no TensorFlow
import (the recipes' schemas import it). tests/test_docs.py fails when the committed page is stale.

Run: python scripts/config_reference.py          (writes the page)
     python scripts/config_reference.py --check  (exit 1 if the committed page is out of date)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import sys
import tokenize
from pathlib import Path
from typing import Dict, List, Optional, Tuple
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reference" / "config.md"

# Descriptions for trainer/config.py fields that have no comment there. trainer/ is being reorganised
# (the Trainer split), so these live here for now; once a comment is added in config.py, the entry
# here must go (the test says which).
FALLBACK: Dict[str, str] = {
    "TrainerConfig.checkpoint_every_secs": "seconds between checkpoints (as well as, or instead of, "
                                           "checkpoint_every); None: off",
    "TrainerConfig.keep_checkpoints": "how many of the newest checkpoints are kept in checkpoints/",
    "TrainerConfig.keep_best": "how many of the best checkpoints (by best_metric) are kept in "
                               "checkpoints/best/; 0: none",
    "TrainerConfig.tensorboard": "write TensorBoard scalars to the run folder's tensorboard/",
    "OptimizerConfig.lr": "learning rate (Keras' learning_rate), or a schedule's peak",
    "PrecisionConfig.initial_scale": "dynamic loss scaling: the scale a run starts from",
    "PrecisionConfig.growth_interval": "dynamic loss scaling: finite steps in a row before the scale doubles",
    "OptimizerConfig.warmup_steps": "linear warmup from 0 to lr over these first steps (any schedule)",
    "OptimizerConfig.decay_rate": "step schedule: the factor applied to lr at each boundary",
    "AdamConfig.beta_1": "Keras Adam's beta_1: decay of the first-moment estimate",
    "AdamConfig.beta_2": "Keras Adam's beta_2: decay of the second-moment estimate",
    "AdamConfig.epsilon": "Keras Adam's epsilon, added to the denominator",
    "AdamWConfig.weight_decay": "decoupled weight decay (Keras AdamW)",
    "AdamWConfig.epsilon": "Keras AdamW's epsilon, added to the denominator",
    "AdamWConfig.exclude_from_weight_decay": "variable-name substrings exempt from weight decay (applied through "
                                             "Keras' exclude_from_weight_decay)",
    "SGDConfig.lr": "learning rate (SGD's default is larger than Adam's)",
    "SGDConfig.momentum": "Keras SGD momentum",
    "SGDConfig.nesterov": "Nesterov momentum",
    "SGDConfig.weight_decay": "Keras SGD weight decay; None: none",
    "Config.data": "the data group's options (a schema below, chosen with data=...)",
    "Config.model": "the model group's options (a schema below, chosen with model=...)",
    "Config.optimizer": "the optimizer group's options (a schema below, chosen with optimizer=...)",
    "Config.loss": "a Keras loss, built with hydra.utils.instantiate",
    "Config.metrics": "name -> a Keras metric ({_target_: ...}); eval results use these names",
    "Config.finetune": "see finetune below",
    "Config.trainer": "see trainer below",
    "Config.precision": "see precision below",
    "Config.strategy": "see strategy below",
}
TARGET = "what hydra.utils.instantiate calls to build it"

# Config's nested sections (key, schema in trainer/config.py), then the groups, in page order.
SECTIONS = [("trainer", "TrainerConfig"), ("precision", "PrecisionConfig"), ("strategy", "StrategyConfig"),
            ("finetune", "FinetuneConfig")]
GROUPS = ["optimizer", "data", "model", "callbacks"]
CHOOSE = {"callbacks": "Choose several with `callbacks=[OPTION,...]` (docs/training-control.md); each option's keys "
                       "sit under `callbacks.OPTION.`."}


def registered_schemas() -> List[Tuple[Optional[str], str, type]]:
    """(group, name, dataclass) for everything register_configs() stores, recipes included."""
    import trainer.assemble
    import trainer.config

    stored = []

    class Recorder:
        def store(self, name, node, group=None, **_):
            stored.append((group, name, node))

    with mock.patch.object(trainer.config.ConfigStore, "instance", return_value=Recorder()):
        trainer.assemble.register_configs()
    return stored


@functools.lru_cache(maxsize=None)
def _comments(cls: type) -> Dict[str, str]:
    """field name -> its comment in cls's own body (trailing, else the comment lines right above)."""
    source = inspect.getsource(sys.modules[cls.__module__])
    by_line: Dict[int, str] = {}
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            code_lines.add(tok.start[0])
    node = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == cls.__name__)
    found = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        trailing = [by_line[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in by_line]
        above, n = [], stmt.lineno - 1
        while n in by_line and n not in code_lines:
            above.insert(0, by_line[n])
            n -= 1
        text = " ".join(trailing or above)
        if text:
            found[stmt.target.id] = text
    return found


def describe(cls: type, name: str) -> Tuple[Optional[str], str]:
    """(description, where it came from) for a field; None when there is none."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and name in _comments(klass):
            return _comments(klass)[name], f"{klass.__module__}.{klass.__name__}"
    for klass in cls.__mro__:
        key = f"{klass.__name__}.{name}"
        if key in FALLBACK:
            return FALLBACK[key], "FALLBACK"
    if name == "_target_":
        return TARGET, "generic"
    return None, ""


def _fmt(value) -> str:
    from omegaconf import MISSING

    if value is MISSING or value == "???":
        return "required"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    return f"`{_flow(value)}`"


def _flow(value) -> str:
    """A value as it would be written in YAML flow style on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(cls: type, prefix: str, skip=()) -> Tuple[List[str], List[str]]:
    """Markdown rows for cls's fields, and the keys that have no description."""
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    missing = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        text, _ = describe(cls, f.name)
        if text is None:
            missing.append(f"{cls.__name__}.{f.name}")
            text = ""
        ftype = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(f"| `{prefix}{f.name}` | `{_cell(ftype)}` | {_cell(_fmt(_default(f)))} | {_cell(text)} |")
    return rows, missing


def group_options(group: str) -> Dict[str, List[str]]:
    """schema name (base_...) -> the conf/<group>/*.yaml options that extend it."""
    import yaml

    options: Dict[str, List[str]] = {}
    for path in sorted((ROOT / "conf" / group).glob("*.yaml")):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
        for entry in defaults:
            if isinstance(entry, str) and entry.startswith("base_"):
                options.setdefault(entry, []).append(path.stem)
    return options


def render() -> Tuple[str, List[str]]:
    """The page's text, and every field that has no description."""
    from trainer.config import Config

    import trainer.config as tc

    stored = registered_schemas()

    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/config_reference.py from the dataclasses in trainer/config.py and",
        "     recipes/*.py. Do not edit: change the field's comment and run the script. -->",
        "",
        "Every key of `python -m trainer`'s config, generated from the typed schemas the YAML files under",
        "`conf/` extend. Set any of them on the command line (`trainer.max_steps=2000`);",
        "`python -m trainer --cfg job` prints the composed config of a run, with the values its recipe",
        "chose. `${...}` is an interpolation: the key follows another one. It prints the config as composed, before",
        "the run-length rule: `trainer.epochs=4` given without `trainer.max_steps` runs with max_steps null (and",
        "`trainer.max_steps` alone with epochs null), which `--cfg job` still shows as the recipe's value (the run",
        "logs the replacement; its `.hydra/config.yaml` holds what ran).",
        "",
        "Config groups (`GROUP=OPTION`, one YAML file each under `conf/GROUP/`):",
        "",
        *[f"- `{d.name}`: " + ", ".join(f"`{p.stem}`" for p in sorted(d.glob("*.yaml")))
          for d in sorted((ROOT / "conf").iterdir()) if d.is_dir() and any(d.glob("*.yaml"))],
        "",
        "## Top level",
        "",
    ]
    nested = {name for name, _ in SECTIONS}
    rows, missing = table(Config, "", skip=())
    lines += [r for r in rows if not any(r.startswith(f"| `{n}` ") for n in nested)]
    for name, cls_name in SECTIONS:
        cls = getattr(tc, cls_name)
        doc = inspect.getdoc(cls) or ""
        rows, miss = table(cls, f"{name}.")
        missing += miss
        lines += ["", f"## {name}", "", doc + f" Defined in `trainer/config.py` ({cls_name}).", "", *rows]
    for group in GROUPS:
        options = group_options(group)
        choose = CHOOSE.get(group, f"Choose one with `{group}=OPTION`; each option's YAML file sets the "
                                   "defaults its recipe needs.")
        lines += ["", f"## {group}", "", choose, ""]
        for g, schema_name, cls in stored:
            if g != group:
                continue
            opts = ", ".join(f"`{o}`" for o in options.get(schema_name, [])) or "none yet (extend it in your own YAML)"
            doc = inspect.getdoc(cls) or ""
            if doc.startswith(cls.__name__ + "("):  # dataclass' generated signature, not a docstring
                doc = ""
            where = cls.__module__.replace("trainer.recipes.", "recipes.").replace(".", "/") + ".py"
            lines += [f"### {cls.__name__}", "",
                      f"Options: {opts}. Defined in `{where}`." + (f" {doc}" if doc else ""), ""]
            chosen = "".join(f"{o}." for o in options.get(schema_name, [])[:1] if group in CHOOSE)
            rows, miss = table(cls, f"{group}.{chosen}")
            missing += miss
            lines += rows + [""]
    return "\n".join(lines).rstrip() + "\n", sorted(set(missing))


def stale_fallbacks() -> List[str]:
    """FALLBACK entries for fields that no longer exist or now have their own comment."""
    import trainer.config as tc

    stale = []
    for key in FALLBACK:
        cls_name, name = key.split(".")
        cls = getattr(tc, cls_name, None)
        if cls is None or name not in {f.name for f in dataclasses.fields(cls)} or name in _comments(cls):
            stale.append(key)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference/config.md is out of date")
    args = parser.parse_args()
    text, missing = render()
    if missing:
        print("fields without a description: " + ", ".join(missing), file=sys.stderr)
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        return 1 if missing else 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
