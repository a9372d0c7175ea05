"""The composed config, checked before any work (trainer/runlock.py and trainer/cli.py call it): keys a
typed section does not have (naming the key meant: `close_keys`, which trainer/argv_check.py shares), values
out of their schema's range, no run length, and a model option of another recipe (read from this package's
conf/ files). Below the commands, above the schemas (config.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from trainer.config import Checked, Config, ConfigError, check_ranges


def check_config(cfg, choices: Optional[Mapping[str, str]] = None) -> None:
    """Raises ConfigError for a model option foreign to the recipe, a key added to a typed section
    (`+trainer.foo=1`), a numeric option out of its range (every section whose schema declares ranges), or
    no run length. A missing or unresolvable value is left to the code that uses
    it, whose message can say more (the classes a data set was found to have).

    `choices` is Hydra's `runtime.choices` (group -> option picked), e.g. {"recipe": "mnist", "model": "resnet50"}.
    """
    from omegaconf import ListConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if choices:
        check_recipe_model(choices.get("recipe"), choices.get("model"))
    _check_top_level_keys(cfg)
    for key, node in _sections(cfg):
        schema = OmegaConf.get_type(node) if key else Config  # the top level: seed
        if not (schema and dataclasses.is_dataclass(schema)):
            continue
        if key:
            _check_known_keys(schema, node, key, cfg)
        values = {}
        for f in dataclasses.fields(schema):
            if ("range" in f.metadata or "choices" in f.metadata or "combined" in f.metadata) and f.name in node:
                try:
                    value = node[f.name]
                except OmegaConfBaseException:
                    continue
                values[f.name] = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
        check_ranges(schema, values, key)
        if issubclass(schema, Checked):
            schema.check_combined(values, key)
    trainer = cfg.get("trainer")
    if trainer is not None and _unset(trainer, "max_steps") and _unset(trainer, "epochs"):
        raise ConfigError("no run length: trainer.max_steps and trainer.epochs are both null. Fix: set one of them "
                          "(e.g. trainer.max_steps=1000 or trainer.epochs=3); with both, the shorter wins.")


def _unset(node, name: str) -> bool:
    """The key is null; one that does not resolve yet (`${oc.env:...}`) is not judged here."""
    try:
        return node.get(name) is None
    except Exception:  # noqa: BLE001 - OmegaConf's interpolation errors: composition reports them itself
        return False


def _sections(cfg) -> List[Tuple[str, Any]]:
    """('', the config), each section (`trainer`, `data`, ...) and each chosen callback (`callbacks.early_stopping`,
    typed by its schema in conf/callbacks/): the nodes whose keys a schema fixes."""
    from omegaconf import DictConfig

    sections = [("", cfg)]
    sections += [(str(k), cfg.get(k)) for k in cfg if k != "hydra" and isinstance(cfg.get(k), DictConfig)]
    callbacks = cfg.get("callbacks")
    if isinstance(callbacks, DictConfig):
        sections += [(f"callbacks.{k}", callbacks.get(k)) for k in callbacks
                     if isinstance(callbacks.get(k), DictConfig)]
    return sections


def keys_by_section(cfg) -> Dict[str, List[str]]:
    """'' -> the top-level keys of a composed config, each section (`trainer`, `callbacks.early_stopping`) -> its
    keys; Hydra's node and special keys (`_target_`) left out."""
    return {key: [str(k) for k in node if k != "hydra" and not str(k).startswith("_")] for key, node in _sections(cfg)}


# What users of Keras, Lightning and tf.train call keys of this config: name -> the key meant ('' section: top level).
KEY_SYNONYMS = {
    "learning_rate": "optimizer.lr",  # Keras' optimizers
    "global_clipnorm": "optimizer.clipnorm",  # Keras: optimizer.clipnorm clips the global norm
    "gradient_clip_val": "optimizer.clipnorm",  # Lightning's Trainer (its default algorithm: the norm)
    "eps": "optimizer.epsilon",  # PyTorch's optimizers, in Lightning modules
    "gradient_accumulation_steps": "trainer.grad_accum_steps",  # Keras' optimizers
    "accumulate_grad_batches": "trainer.grad_accum_steps",  # Lightning's Trainer
    "max_epochs": "trainer.epochs",  # Lightning's Trainer
    "log_every_n_steps": "trainer.log_every",  # Lightning's Trainer
    "val_check_interval": "trainer.eval_every",  # Lightning's Trainer (a whole number: training batches)
    "limit_val_batches": "trainer.limit_eval_batches",  # Lightning's Trainer
    "validation_steps": "trainer.eval_steps",  # Keras' fit
    "steps_per_execution": "trainer.steps_per_loop",  # Keras' compile
    "max_to_keep": "trainer.keep_checkpoints",  # tf.train.CheckpointManager
    "seed_everything": "seed",  # LightningCLI
    "dtype_policy": "precision.policy",  # Keras 3
    "ckpt_path": "trainer.resume_from",  # Lightning's fit(ckpt_path=): resumes the whole training state
    "validation_freq": "trainer.eval_every",  # Keras' fit (epochs there, steps here)
    "eval_freq": "trainer.eval_every",  # research code's (Stable-Baselines3's EvalCallback)
    "steps": "trainer.max_steps",  # the Trainer's own fit(steps=)
    "train_steps": "trainer.max_steps",  # TF Model Garden's trainer config, as the four below
    "validation_interval": "trainer.eval_every",
    "summary_interval": "trainer.log_every",
    "checkpoint_interval": "trainer.checkpoint_every",
    "best_checkpoint_eval_metric": "trainer.best_metric",
    "log_freq": "trainer.log_every",  # research code's, as the three below
    "log_frequency": "trainer.log_every",
    "log_interval": "trainer.log_every",
    "logging_steps": "trainer.log_every",  # Hugging Face's TrainingArguments, as the two below
    "save_steps": "trainer.checkpoint_every",
    "max_iters": "trainer.max_steps",
    "eval_frequency": "trainer.eval_every",
    "eval_interval": "trainer.eval_every",
    "save_every": "trainer.checkpoint_every",
    "save_freq": "trainer.checkpoint_every",  # Keras' ModelCheckpoint
    "num_steps": "trainer.max_steps",
    "total_steps": "trainer.max_steps",
    "num_train_steps": "trainer.max_steps",
    "training_steps": "trainer.max_steps",
    "max_iterations": "trainer.max_steps",
    "num_epochs": "trainer.epochs",
    "n_epochs": "trainer.epochs",
    "num_train_epochs": "trainer.epochs",  # Hugging Face's TrainingArguments
}


def close_keys(name: str, section: str, keys: Mapping[str, List[str]], free_form=()) -> List[str]:
    """The keys a user most likely meant by `section.name` (section '': a top-level key), which the config lacks,
    best first: the key Keras or Lightning users know by that name (KEY_SYNONYMS), else the same name in
    other sections (`max_steps` -> trainer.max_steps) but the free-form ones (`free_form`: eval_sets, whose
    keys are the user's names), else close spellings in `section` (another section's would be a guess: model.arch
    is no data.cache); [] for none. `keys`: keys_by_section of the config."""
    import difflib

    def full(home: str, key: str) -> str:
        return f"{home}.{key}" if home else key

    home, _, key = KEY_SYNONYMS.get(name.lower(), "").rpartition(".")
    if key and key in keys.get(home, ()):
        return [full(home, key)]
    elsewhere = [full(other, name) for other in keys
                 if other != section and other not in free_form and name in keys[other]]
    if elsewhere:
        return elsewhere[:3]
    own = difflib.get_close_matches(name, [k for k in keys.get(section, []) if k != name], n=3, cutoff=0.75)
    return [full(section, k) for k in own]


def missing_key_problem(given: str, cfg, what: str = "the run's config") -> str:
    """`given` (key=value) sets a key `cfg` lacks: the message as python -m trainer says it, with the key meant (a
    synonym or a close spelling, close_keys) and the section's keys. For the commands that take overrides of a
    run's recorded config (trainer.evaluate), which python -m trainer's check cannot judge (it composes a recipe's)."""
    key = given.lstrip("+~").partition("=")[0]
    section, _, name = key.rpartition(".")
    keys = keys_by_section(cfg)
    if section not in keys:
        return f"{given}: {key} is not a key of {what}. Fix: check the name (its sections: {', '.join(keys[''])})."
    meant = " or ".join(f"{k}={given.partition('=')[2]}" for k in close_keys(name, section, keys,
                                                                           free_form_sections(cfg)))
    fix = f"did you mean {meant}?" if meant else "use one of its keys:"
    return f"{given}: {section} has no key {name!r}. Fix: {fix} ({', '.join(keys[section])})"


def free_form_sections(cfg) -> List[str]:
    """The sections without a schema, whose keys are names the user picks (eval_sets.<name>, logger, loss)."""
    from omegaconf import DictConfig, OmegaConf

    return [str(k) for k in cfg if k != "hydra" and isinstance(cfg.get(k), DictConfig)
            and not dataclasses.is_dataclass(OmegaConf.get_type(cfg.get(k)))]


def _check_known_keys(schema, node, key: str, cfg) -> None:
    """A key the schema lacks, added with Hydra's `+` (`+trainer.foo=1`), reached the dataclass as an unexpected
    argument."""
    known = [f.name for f in dataclasses.fields(schema)]
    unknown = _unknown_keys(node, known)
    if unknown:
        shown = ", ".join(k for k in known if not k.startswith("_"))
        meant = close_keys(unknown[0], key, keys_by_section(cfg), free_form_sections(cfg))
        fix = (f"did you mean {' or '.join(meant)}? Else drop {key}.{unknown[0]}." if meant
               else f"drop {key}.{unknown[0]}, or correct its spelling to one of those keys.")
        raise ConfigError(f"{key}.{unknown[0]} is not a key of {key} (its schema {schema.__name__} has: {shown}). "
                          f"Fix: {fix}")


def _check_top_level_keys(cfg) -> None:
    """A top-level key the run does not have (`+max_steps=5`; `max_steps=5` is refused before Hydra runs,
    trainer/argv_check.py) would be ignored by every part of the run: refused, naming the key meant."""
    known = {f.name for f in dataclasses.fields(Config)} | {"hydra"}
    unknown = _unknown_keys(cfg, known)
    if not unknown:
        return
    name = unknown[0]
    meant = close_keys(name, "", keys_by_section(cfg), free_form_sections(cfg))
    hint = (f"did you mean {' or '.join(meant)}?" if meant
            else "drop it, or put it under its section (trainer., data., ...)")
    raise ConfigError(f"{name} is not a key of the run's config, so nothing would read it (its keys: "
                      f"{', '.join(sorted(known - {'hydra'}))}). Fix: {hint}")


def _unknown_keys(node, known) -> List[str]:
    """The node's keys its schema lacks; Hydra's own special keys (`_partial_`, `_convert_`) are left to it."""
    return [k for k in node if k not in known and not str(k).startswith("_")]


def conf_dir() -> Path:
    """The package's conf/ folder, where its config groups' yaml files are (trainer.groups reads it too)."""
    import trainer.conf

    return Path(list(trainer.conf.__path__)[0])


def _defaults(path) -> List[Any]:
    from omegaconf import OmegaConf

    return list(OmegaConf.load(path).get("defaults", [])) if path.is_file() else []


def _recipe_model(recipe: str) -> Optional[str]:
    """The model option conf/recipe/<recipe>.yaml picks, following the recipes it extends."""
    picked = None
    for entry in _defaults(conf_dir() / "recipe" / f"{recipe}.yaml"):
        if isinstance(entry, str) and entry != "_self_":
            picked = _recipe_model(entry) or picked
        elif not isinstance(entry, str):
            picked = entry.get("/model", entry.get("model", picked))
    return picked


def _model_schema(model: str) -> Optional[str]:
    """The schema (base_*) that conf/model/<model>.yaml extends."""
    return next((e for e in _defaults(conf_dir() / "model" / f"{model}.yaml")
                 if isinstance(e, str) and e.startswith("base_")), None)


def check_recipe_model(recipe: Optional[str], model: Optional[str]) -> None:
    """A model option of another recipe (model=resnet50 recipe=mnist) is a ConfigError listing the
    recipe's models. Options outside this package's conf/ (a user's search path) are not judged."""
    default = _recipe_model(recipe) if recipe else None
    if not (default and model) or model == default:
        return
    schema, wanted = _model_schema(model), _model_schema(default)
    if schema is None or wanted is None or schema == wanted:
        return
    models = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml") if _model_schema(p.stem) == wanted)
    takers = sorted(p.stem for p in (conf_dir() / "recipe").glob("*.yaml")
                    if _model_schema(_recipe_model(p.stem) or "") == schema)
    raise ConfigError(
        f"model={model} is not a model of recipe={recipe}; its models are {models}. Fix: pick one of them"
        + (f", or a recipe that takes {model}: {takers}." if takers else ".")
    )
