"""A Trainer from a composed config: the one place that turns the config's nodes into the Trainer's parts.

`python -m trainer` (trainer/cli.py) trains with them, the doctor measures them at several batch sizes and
precisions, evaluate and predict hold a run's trained model in them. Each takes `parts_of(cfg)` and
changes what it needs (a restored model, no optimizer state), so a new Trainer argument is wired once.
The run's eval data comes from the config here too: the recipe's split and the named `eval_sets`
(`check_eval_sets` before anything is built, `eval_data_of`). Below the commands, above the library: it
imports no command module.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Set

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.config import ConfigError, PrecisionConfig, StrategyConfig, TrainerConfig, register_schemas

DEFAULT_TRAINER_CLASS = "trainer.trainer.Trainer"
log = logging.getLogger(__name__)


def register_configs() -> None:
    """Hydra's ConfigStore gets the framework's schemas (trainer/config.py), then each recipe's.

    The recipe contract: a module of trainer.recipes (recipes/*.py) may define `register_configs(cs)`, which
    stores the schemas of its data and model options (`cs.store(group="data", name="base_mnist", node=...)`)
    for its YAML files under conf/ to extend. Every CLI start imports each recipe module, a config error and
    `--cfg job` included, so a recipe module loads no TensorFlow or Keras when imported: it binds them with
    trainer.lazy.lazy_module, and a class whose base needs them (a Trainer subclass, a Callback, a Keras
    loss) lives in a module whose name starts with `_` (not a recipe: skipped here), named through the recipe
    module's `__getattr__` (recipes/gan.py). A recipe that does load TensorFlow still works, only slower to
    answer. This lives here, above the recipes, and not in trainer.config."""
    import importlib
    import pkgutil

    from hydra.core.config_store import ConfigStore

    import trainer.recipes

    cs = ConfigStore.instance()
    register_schemas(cs)
    for info in pkgutil.iter_modules(trainer.recipes.__path__):
        if info.name.startswith("_"):  # a recipe's private part (recipes/_gan_trainer.py), imported by a run
            continue
        try:
            module = importlib.import_module(f"trainer.recipes.{info.name}")
        except Exception as e:  # noqa: BLE001 - one broken recipe must not take the others down
            log.warning("recipe module trainer.recipes.%s failed to import (%s: %s); its "
                        "config options are unavailable", info.name, type(e).__name__, e)
            continue
        if hasattr(module, "register_configs"):
            module.register_configs(cs)


def compose(overrides, with_hydra: bool = False) -> DictConfig:
    """The config `python -m trainer OVERRIDES` composes, unchecked; `with_hydra`: with Hydra's node (its
    runtime.choices: the options the groups got). Hydra's and OmegaConf's errors pass through."""
    from hydra import compose as hydra_compose, initialize_config_module

    register_configs()  # the recipes' schemas (the CLI has stored them already; storing again replaces them)
    with initialize_config_module("trainer.conf", version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)


def compose_config(overrides, error: type = ConfigError) -> DictConfig:
    """The config `python -m trainer OVERRIDES` would run, checked the same way, without Hydra's own node
    (for the commands that take a run's overrides: the doctor, lr_find), its run length as the command line
    sets it (run_length_of_command_line: `trainer.epochs=1` replaces a recipe's max_steps, as in the run).
    Overrides that do not compose raise `error`."""
    from hydra.errors import HydraException
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config_check import check_config
    from trainer.sweep import register_resolver

    register_resolver()
    try:
        cfg = compose(overrides, with_hydra=True)
    except (HydraException, OmegaConfBaseException) as e:
        raise error(f"the overrides do not compose: {e}") from None
    check_config(cfg, cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own settings: not the run's
    # as trainer/cli.py does to the run's config; its line is not logged: the doctor and lr_find train their own steps
    run_length_of_command_line(cfg, overrides)
    return cfg


def schema(cls, node: DictConfig):
    """The typed config `cls` (TrainerConfig, PrecisionConfig, ...) of a config node, resolved."""
    return cls(**OmegaConf.to_container(node, resolve=True))


def keys_given(overrides: Sequence[str]) -> Set[str]:
    """The config keys a command line's overrides set (`+trainer.x=1`, `~key=`: trainer.x, key)."""
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def run_length_of_command_line(cfg: DictConfig, overrides) -> Optional[str]:
    """The command line's run length replaces the recipe's: `trainer.epochs=4` given without trainer.max_steps
    sets the recipe's max_steps (1500 for mnist) to null, where it would have cut the 4 epochs (1872 steps)
    silently, and `trainer.max_steps` alone drops a recipe's epochs; as Lightning's max_epochs runs its epochs
    with max_steps left at its default (unlimited). Both given on the command line, or both in the config
    files: they stand, and the smaller wins (a warning says so when it cuts epochs: inputs.warn_if_epochs_cut).
    Changes `cfg` (the run's record then holds what ran); returns the line that says so, or None.
    `overrides`: the command line's (Hydra's overrides.task)."""
    from omegaconf import open_dict

    given = keys_given(overrides)
    for kept, dropped in (("epochs", "max_steps"), ("max_steps", "epochs")):
        value = cfg.trainer.get(dropped)
        if f"trainer.{kept}" in given and f"trainer.{dropped}" not in given and cfg.trainer.get(kept) is not None \
                and value is not None:
            with open_dict(cfg):
                cfg.trainer[dropped] = None
            return (f"Run length: trainer.{kept}={cfg.trainer[kept]} from the command line replaces the config's "
                    f"trainer.{dropped}={value} (now null). To stop at whichever comes first, give "
                    f"trainer.{dropped} on the command line too.")
    return None


def trainer_class(path: str, base: Optional[type] = None) -> type:
    """trainer_class=module.Class: the Trainer subclass whose step a recipe brings (recipe=gan)."""
    from hydra.utils import get_class

    if base is None:
        from trainer.trainer import Trainer as base
    try:
        cls = get_class(path)
    except Exception as e:  # noqa: BLE001 - hydra raises ImportError or ValueError, wrapped
        raise ConfigError(f"trainer_class={path!r} cannot be imported ({e}); give module.Class of a "
                          "Trainer subclass") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"trainer_class={path!r} is not a subclass of trainer.Trainer")
    return cls


@dataclass
class Parts:
    """What a composed config says a Trainer is made of; each builder is called by the Trainer, under its
    strategy's scope (a model, an optimizer and metrics must be made there)."""

    model: Callable[[], Any]
    loss: Any
    optimizer: Callable[[], Any]
    metrics: Dict[str, Callable[[], Any]]
    precision: PrecisionConfig
    config: TrainerConfig
    trainer_class: type
    seed: int
    clipnorm: Optional[float]
    from_cli: bool = False  # from a command line's config (parts_of): the Trainer's errors name its overrides
    best_metric_given: bool = False  # trainer.best_metric=... on the command line: asked for, even if the default's

    def build(self, **rest):
        """The Trainer of these parts; `rest`: strategy, run_dir, callbacks, loggers, is_chief."""
        asked = {"best_metric": self.config.best_metric} if self.best_metric_given else {}  # as Trainer(best_metric=)
        trainer = self.trainer_class(model=self.model, loss=self.loss, optimizer=self.optimizer, metrics=self.metrics,
                                     precision=self.precision, config=self.config, seed=self.seed,
                                     clipnorm=self.clipnorm, **asked, **rest)
        trainer.from_cli = self.from_cli
        return trainer

    def replace(self, **changes) -> "Parts":
        return dataclasses.replace(self, **changes)


def parts_of(cfg: DictConfig, total_steps: Optional[int] = None, overrides: Sequence[str] = ()) -> Parts:
    """The Trainer's parts a composed config (or a run's .hydra/config.yaml) names, for the command line's entry
    points (python -m trainer, the doctor, lr_find, evaluate, predict): its Trainer is `from_cli`. `total_steps`:
    the optimizer's schedule length (its decay ends there). `overrides`: the command line's (Hydra's
    overrides.task): a trainer.best_metric given there is asked for, as Trainer(best_metric=...) is."""
    from trainer.loss_overrides import check_targets
    from trainer.optim import build_optimizer

    check_targets(cfg)  # a misspelt class or an argument it lacks: one line, not Hydra's error or a traceback
    return Parts(
        model=functools.partial(instantiate, cfg.model, _convert_="all"),
        loss=instantiate(cfg.loss) if cfg.get("loss") is not None else None,
        optimizer=functools.partial(build_optimizer, cfg.optimizer, total_steps),
        metrics={name: functools.partial(instantiate, m) for name, m in (cfg.get("metrics") or {}).items()},
        precision=schema(PrecisionConfig, cfg.precision),
        config=schema(TrainerConfig, cfg.trainer),
        trainer_class=trainer_class(cfg.get("trainer_class", DEFAULT_TRAINER_CLASS)),
        seed=cfg.seed,
        clipnorm=cfg.optimizer.get("clipnorm"),
        from_cli=True,
        best_metric_given="trainer.best_metric" in keys_given(overrides),
    )


def strategy_of(cfg: DictConfig):
    """The tf.distribute strategy cfg.strategy names; call it before TensorFlow initializes its devices."""
    from trainer.distribute import make_strategy

    return make_strategy(schema(StrategyConfig, cfg.strategy))


def trainer_for(checkpoint, strategy=None, model=None, policy: str = None):
    """A Trainer holding a run's trained model (restored from `checkpoint`, a trainer.runs.RunCheckpoint, or
    `model` when given) with the recipe's loss and metrics, its precision (or `policy`: `model`'s) and its
    trainer settings; it writes nothing (no run_dir) and trains nothing."""
    import keras

    parts = parts_of(checkpoint.cfg)
    precision = parts.precision if policy is None else dataclasses.replace(parts.precision, policy=policy)
    return parts.replace(
        model=model or (lambda: checkpoint.load_model(precision.policy)[0]),  # names the one loaded (rotation)
        optimizer=keras.optimizers.SGD,  # nothing trains: build() wants one to make its slots
        precision=precision,
        clipnorm=None,
    ).build(strategy=strategy)


def check_eval_sets(cfg: DictConfig) -> None:
    """Each of `eval_sets` (name -> the data.* keys that differ) merged into cfg.data as its schema allows
    (struct mode: no new key, each value of its type), before anything is built: a ConfigError naming the keys."""
    import copy

    from omegaconf.errors import OmegaConfBaseException

    from trainer.data import FRAMEWORK_KEYS

    for name, keys in (cfg.get("eval_sets") or {}).items():
        valid = ", ".join(str(k) for k in cfg.data if k not in FRAMEWORK_KEYS and not str(k).startswith("_"))
        fix = f"Fix: +eval_sets.{name}.<key>=<value> with a key of data: {valid}."
        if keys is not None and not isinstance(keys, DictConfig):
            raise ConfigError(f"eval_sets.{name}={keys}: an eval set is the data.* keys that differ, not a "
                              f"value. {fix}")
        data = copy.deepcopy(cfg.data)  # a copy of the typed node, closed to new keys as cfg.data is
        OmegaConf.set_struct(data, True)
        try:
            OmegaConf.merge(data, keys or {})
        except OmegaConfBaseException as error:
            why = str(error).splitlines()[0]
            raise ConfigError(f"eval_sets.{name}: {why}. {fix}") from None


def eval_data_of(cfg: DictConfig, data):
    """The run's eval data: the recipe's eval split; with `eval_sets` (name -> the data.* keys that differ),
    a dict of named sets, the recipe's own split first as "val" (trainer/evalsets.py)."""
    from trainer.data import DataError, build_data

    if not cfg.get("eval_sets"):
        return data.eval
    sets = {} if data.eval is None else {"val": data.eval}
    for name, keys in cfg.eval_sets.items():
        if name in sets:
            raise DataError(f"eval_sets.{name}: 'val' is the recipe's own eval split. Fix: another name.")
        other = build_data(cfg.data, OmegaConf.to_container(keys, resolve=True) if keys is not None else {})
        if other.eval is None:
            raise DataError(f"eval_sets.{name}: the data with {OmegaConf.to_container(keys)} has no eval split. Fix: "
                            "the data.* keys that give one (an eval file, a path with a test split).")
        sets[name] = other.eval
    return sets
