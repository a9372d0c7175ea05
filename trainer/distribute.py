"""tf.distribute strategies from config. TensorFlow is the distributed engine; this only picks one."""
from __future__ import annotations

import json
import logging
import os
import weakref
from typing import Any, Mapping, Optional

import tensorflow as tf

from trainer.config import StrategyConfig
from trainer.errors import UserError

log = logging.getLogger(__name__)

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
_said: "weakref.WeakSet" = weakref.WeakSet()  # strategies whose `Strategy: ...` line was logged


class StrategyError(UserError, RuntimeError):
    """The requested strategy cannot run here; the message says why and what to do."""


def split_cpu(n: int, where: Optional[str] = None) -> None:
    """Splits the CPU into `n` logical devices (before TensorFlow initializes its devices). `where`: the Python
    argument that asked for it, for the error (else the CLI's strategy.logical_cpus)."""
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError as e:
        fix = (f"make the Trainer before any TensorFlow op runs (before making a dataset or tensor), or split the "
               f"CPU first thing in the script: from trainer.distribute import split_cpu; split_cpu({n})" if where
               else "choose the strategy before any TensorFlow op runs")
        raise StrategyError(
            f"{where or f'strategy.logical_cpus={n}'}: TensorFlow's devices were already initialized ({e}). Fix: {fix}."
        ) from None


def _logical_cpus() -> int:
    """How many logical devices the CPU is split into (0: not split), without initializing TensorFlow's devices."""
    return len(tf.config.get_logical_device_configuration(tf.config.list_physical_devices("CPU")[0]) or [])


def strategy_argument(value: Any) -> Optional[tf.distribute.Strategy]:
    """Trainer(strategy=...): a tf.distribute.Strategy as it is; the CLI's names (STRATEGIES: "mirrored"), a
    StrategyConfig or a dict of its fields ({"name": "mirrored", "logical_cpus": 2}: 2 replicas on the CPU) made as
    the CLI makes them; None and "default": None (TensorFlow's current strategy). Anything else is a StrategyError
    naming what it takes (a name used to fail on `'str' object has no attribute 'scope'`)."""
    if value is None or isinstance(value, tf.distribute.Strategy):
        return value
    takes = (f"a tf.distribute.Strategy, a name ({', '.join(STRATEGIES)}), a trainer.config.StrategyConfig or a dict "
             "of its fields. Fix: e.g. Trainer(strategy=\"mirrored\") (all GPUs), or "
             "Trainer(strategy={\"name\": \"mirrored\", \"logical_cpus\": 2}) (2 replicas on the CPU)")
    given = dict(value) if isinstance(value, Mapping) else value  # as the user wrote it, for an error
    if isinstance(value, str):
        if value not in STRATEGIES:
            import difflib

            close = difflib.get_close_matches(value, STRATEGIES, n=1)
            raise StrategyError(f"Trainer(strategy={value!r}): "
                                + (f"did you mean {close[0]!r}? " if close else "") + f"It takes {takes}.")
        value = StrategyConfig(name=value)
    elif isinstance(value, Mapping):
        fields = list(StrategyConfig.__dataclass_fields__)
        unknown = [key for key in value if key not in fields]
        if unknown:
            raise StrategyError(f"Trainer(strategy={dict(value)!r}): {unknown[0]!r} is no field of StrategyConfig "
                                f"(its fields: {', '.join(fields)}). It takes {takes}.")
        value = StrategyConfig(**value)
    elif not isinstance(value, StrategyConfig):
        raise StrategyError(f"Trainer(strategy={value!r}) ({type(value).__name__}): it takes {takes}.")
    check_fields_used(value, where=f"Trainer(strategy={given!r})")
    return None if value.name == "default" else make_strategy(value, where="Trainer(strategy=...)")


_FIELDS_OF = {"device": ("one_device",), "devices": ("mirrored",), "logical_cpus": ("mirrored", "multi_worker"),
              "tpu": ("tpu",), "communication": ("multi_worker",)}  # StrategyConfig's, by the strategies using them


def check_fields_used(cfg: StrategyConfig, where: Optional[str] = None) -> None:
    """A field the named strategy does not use (strategy.logical_cpus=2 without strategy=mirrored, a dict without a
    name: the default strategy) is a StrategyError naming the strategy it belongs to, where it ran 1 replica,
    silently. `where`: the Python argument as given (else the CLI's keys)."""
    unused = {f: getattr(cfg, f) for f, users in _FIELDS_OF.items()
              if cfg.name not in users and getattr(cfg, f) not in (None, "auto")}
    if not unused:
        return
    field, owner = next(iter(unused)), _FIELDS_OF[next(iter(unused))]
    if where:
        asked, fix = where, f"Trainer(strategy={ {'name': owner[0], **unused}!r})"
    else:
        keys = [f"strategy.{f}=" + (f"[{','.join(map(str, v))}]" if isinstance(v, (list, tuple)) else str(v))
                for f, v in unused.items()]
        asked, fix = " ".join([f"strategy={cfg.name}"] + keys), " ".join([f"strategy={owner[0]}"] + keys)
    raise StrategyError(f"{asked}: {field} is a field of the {' or '.join(owner)} strategy, and the {cfg.name} "
                        f"strategy{' (one device)' if cfg.name == 'default' else ''} would ignore it. Fix: {fix}.")


def _check_device_exists(device: str, key: str = "strategy.device", given: Any = None) -> None:
    """OneDeviceStrategy takes any device name and falls back to the CPU without a word; MirroredStrategy over
    absent GPUs waits forever at its first step, deaf to SIGTERM and Ctrl-C (over one, it falls back to the CPU).
    `key`, `given`: the setting as the user wrote it (strategy.devices=[...])."""
    shown = f"{key}={device!r}" if given is None else f"{key}={given} ({device!r})"
    try:
        spec = tf.DeviceSpec.from_string(device)
    except ValueError as e:
        raise StrategyError(f"{shown} is not a device name (like /gpu:0 or /cpu:0): {e}") from None
    kind = (spec.device_type or "").upper()
    present = tf.config.list_physical_devices(kind) if kind else []
    count = max(len(present), _logical_cpus()) if kind == "CPU" else len(present)  # a split CPU: its logical ones
    if not kind or (spec.device_index or 0) >= count:
        none_here = (" (no GPU is visible to TensorFlow: this machine has none, or this TensorFlow build or its "
                     "CUDA drivers cannot reach it)" if kind == "GPU" and not present else "")
        raise StrategyError(
            f"{shown}: this machine has {count if kind else 'no such'} {kind or 'device'} "
            f"device(s) ({[d.name for d in present]}){none_here}. Fix: "
            + ("name one of them, or " if count else "") + f"drop {key} (the "
            f"{'first GPU' if key == 'strategy.device' else 'GPUs'}, else the CPU"
            + ("; strategy.logical_cpus=N splits the CPU into N replicas, for testing)." if key != "strategy.device"
               and kind == "GPU" else ")."))


def make_strategy(cfg: StrategyConfig, where: Optional[str] = None) -> tf.distribute.Strategy:
    """Builds the strategy named by `cfg.name`, logging what it runs on. `where`: the Python argument it came from
    (strategy_argument), for an error's fix."""
    check_fields_used(cfg, where)
    name = cfg.name
    gpus = tf.config.list_physical_devices("GPU")
    if name == "default":
        strategy = tf.distribute.get_strategy()
        log.info("Strategy: default (one device: %s)", "GPU:0" if gpus else "CPU")
    elif name == "one_device":
        device = cfg.device or ("/gpu:0" if gpus else "/cpu:0")
        _check_device_exists(device)
        strategy = tf.distribute.OneDeviceStrategy(device)
        log.info("Strategy: one_device on %s", device)
    elif name == "mirrored":
        if cfg.devices:
            devices = list(cfg.devices)
            for device in devices:
                _check_device_exists(device, "strategy.devices", "[" + ",".join(map(str, devices)) + "]")
        elif gpus:
            devices = [f"/gpu:{i}" for i in range(len(gpus))]
        elif (cfg.logical_cpus or 0) > 1:
            split_cpu(cfg.logical_cpus, where and f"Trainer(strategy={{'name': 'mirrored', 'logical_cpus': "
                                                  f"{cfg.logical_cpus}}})")
            devices = [f"/cpu:{i}" for i in range(cfg.logical_cpus)]
        elif cfg.logical_cpus is None and _logical_cpus() > 1:  # split by the user (split_cpu, tf.config)
            devices = [f"/cpu:{i}" for i in range(_logical_cpus())]
        else:
            devices = ["/cpu:0"]
            log.warning(
                "strategy=mirrored: no GPU found, so one replica on the CPU; %s splits the CPU into N replicas (for "
                "testing multi-replica code)", "Trainer(strategy={'name': 'mirrored', 'logical_cpus': N})" if where
                else "strategy.logical_cpus=N")
        cross = None
        if all(d.lower().startswith("/cpu") for d in devices):
            cross = tf.distribute.ReductionToOneDevice()  # NCCL is GPU-only
        strategy = tf.distribute.MirroredStrategy(devices, cross_device_ops=cross)
        replicas = strategy.num_replicas_in_sync
        log.info("Strategy: mirrored over %s (%d replica%s)", devices, replicas, "" if replicas == 1 else "s")
    elif name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise StrategyError(
                "strategy=multi_worker needs TF_CONFIG (cluster and this worker's task) in the environment. Fix: "
                "start the workers with python -m trainer.launch --workers N -- OVERRIDES (it writes TF_CONFIG; "
                "docs/concepts/distribution.md#the-launcher-python-m-trainerlaunch)"
            )
        impl = {
            "auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
            "ring": tf.distribute.experimental.CommunicationImplementation.RING,
            "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL,
        }
        if cfg.communication not in impl:
            raise StrategyError(f"strategy.communication={cfg.communication!r} is not one of {list(impl)}")
        if (cfg.logical_cpus or 0) > 1:
            split_cpu(cfg.logical_cpus)
        options = tf.distribute.experimental.CommunicationOptions(implementation=impl[cfg.communication])
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        task = json.loads(os.environ["TF_CONFIG"]).get("task", {})
        log.info(
            "Strategy: multi_worker, task %s/%s, %d replicas in sync",
            task.get("type"),
            task.get("index"),
            strategy.num_replicas_in_sync,
        )
    elif name == "tpu":
        strategy = _tpu_strategy(cfg.tpu)
    else:
        raise StrategyError(f"strategy.name={name!r} is not one of {list(STRATEGIES)}")
    _said.add(strategy)
    return strategy


def say_strategy_once(strategy: tf.distribute.Strategy) -> None:
    """The `Strategy: ...` line for a strategy given from Python (make_strategy logs the CLI's): the log then says
    how many replicas trained. Once per strategy object."""
    if strategy in _said:
        return
    _said.add(strategy)
    try:
        devices = list(strategy.extended.worker_devices)
    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
        devices = []
    replicas = strategy.num_replicas_in_sync
    log.info("Strategy: %s over %s (%d replica%s)", type(strategy).__name__.lstrip("_"),
             devices or "the default device", replicas, "" if replicas == 1 else "s")


TPU_CONNECT_TIMEOUT_S = 120


def _probe_grpc(address: str, timeout: float = 10.0) -> None:
    """A TCP connect to grpc://host:port, so an unreachable TPU is an error in seconds, not a hang."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 8470), timeout=timeout).close()
    except OSError as e:
        raise StrategyError(f"strategy=tpu: {address} is not reachable ({e}); check strategy.tpu") from None


def _tpu_strategy(tpu: str | None) -> tf.distribute.Strategy:
    import threading

    if tpu and tpu.startswith("grpc://"):
        _probe_grpc(tpu)
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    except Exception as e:  # noqa: BLE001 - ValueError, URLError (no GCE metadata server), ...
        raise StrategyError(
            f"strategy=tpu: no TPU reachable ({type(e).__name__}: {e}). Run on a TPU VM, or set "
            "strategy.tpu to the TPU's name or grpc:// address; on other machines use strategy=default or mirrored."
        ) from None

    def give_up():  # TensorFlow's TPU initialization cannot be interrupted: end the process
        log.error("strategy=tpu: the TPU system did not initialize within %ds; giving up", TPU_CONNECT_TIMEOUT_S)
        logging.shutdown()
        os._exit(StrategyError.exit_code)

    watchdog = threading.Timer(TPU_CONNECT_TIMEOUT_S, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as e:  # noqa: BLE001
        raise StrategyError(f"strategy=tpu: could not initialize the TPU system at {tpu!r}: {e}") from None
    finally:
        watchdog.cancel()
    strategy = tf.distribute.TPUStrategy(resolver)
    log.info("Strategy: tpu (%d cores)", strategy.num_replicas_in_sync)
    return strategy


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Only the chief writes the real checkpoints, metrics and TensorBoard files."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(strategy.extended, "_in_multi_worker_mode", lambda: False)():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type in (None, "chief") or (
        task_type == "worker" and task_id == 0 and "chief" not in resolver.cluster_spec().as_dict()
    )


def input_pipelines(strategy: tf.distribute.Strategy) -> int:
    """The input pipelines a distributed data set is read by, each its own shard in its own shuffled order (the
    InputContext's num_input_pipelines, trainer/data.py): the workers of a multi_worker run (chief included); 1
    for a strategy in one process. Another count reads other examples at the same position (data_position.py)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or strategy.cluster_resolver is None:
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("worker", [])) + len(cluster.get("chief", [])))
