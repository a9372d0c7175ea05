"""`precision=auto`: the dtype policy this machine runs fast, without a doctor run.

The hardware proposes a candidate (bfloat16 on TPUs, GPUs of compute capability >= 8.0 and CPUs with AMX;
float16 on GPUs of 7.x; float32 elsewhere, CPUs with AVX-512 BF16 but no AMX included: what bfloat16 gains on
those depends on the CPU and the model, and their matmul speed-up lies around the probe's threshold, so a
probe would flip between runs; docs/concepts/precision.md has the figures), and a short matmul probe (the
candidate's dtype against float32, interleaved rounds) must confirm it: a flag says an instruction exists, not
that TensorFlow's kernels use it well. The start-up log names the doctor command (with the run's overrides)
that measures the model itself. The probe's answer is cached per machine (CPU model and flags, devices,
TensorFlow version) in ~/.cache/trainer/precision_auto.json ($TRAINER_CACHE_DIR overrides the folder;
trainer/precision_cache.py), so it is paid once. `python -m trainer.doctor --set-auto` stores the doctor's
measured answer there too, for that machine AND that recipe and model config (model_identity): auto follows it
for runs of the same model only (a step's gain from bfloat16 depends on the model: 1.1x for a small MLP, 2.35x
for a wide one); a run of another model, or a Trainer built from Python (no recipe), gets the probe's rule,
and the start-up log says why. The stored answer's XLA setting (what --verify trained) applies where
trainer.jit_compile was left at its default (xla_applies, decided in resolve_run, which records the setting it
applied). An explicit precision=... always wins. A --set-auto whose measurement ruled out a gain over the run's
policy stores that too: auto then follows the measurement (that policy) for that model; an inconclusive
one stores nothing.

A run keeps what auto chose for it: the choice is recorded in its run folder (precision_auto.json), and a
resume (checkpoints present) computes in the recorded policy (and XLA setting, if the choice had one),
whatever the cache says now; the weights and optimizer state of those checkpoints were trained in it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import time
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, Tuple

import tensorflow as tf

from trainer.precision import cpu_flags, cpu_model, precision_config
from trainer.precision_cache import BY_MODEL, cache_path, read_cache, write_cache, write_json_atomically

log = logging.getLogger(__name__)

AUTO = "auto"
# A matmul speed-up the step can use: a step is matmuls plus elementwise work, the update and input, so a
# small matmul gain is lost (issue 31: 3.4x matmuls gave the recipes 1.1x).
LEAST_MATMUL_SPEEDUP = 2.0
PROBE_SIDE, PROBE_ROUNDS = 1024, 5
RUN_RECORD = "precision_auto.json"  # in a run folder: the policy auto chose for that run
DTYPE_OF = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}
NO_GAIN = "no gain"  # an answer's verdict: the doctor's interval excluded a gain over what ran (decide.excludes_gain)
# what an older doctor stored for "no significant difference", inconclusive measurements (an interval too wide
# to tell) included: followed, with the advice to measure again
OLD_NO_GAIN = "no significant difference"


def _gpu_capabilities() -> list:
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        caps.append(tuple(cc) if cc else None)
    return caps


def machine(strategy=None) -> dict:
    """What decides the candidate: the device kind, GPU compute capabilities, the CPU's model and flags."""
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return {"kind": "TPU"}
    caps = _gpu_capabilities()
    if caps:
        return {"kind": "GPU", "compute_capabilities": caps}
    return {"kind": "CPU", "cpu": cpu_model(),
            "flags": sorted(cpu_flags() & {"amx_bf16", "avx512_bf16", "avx512_fp16"})}


def machine_key(hardware: dict) -> str:
    """The cache key: the hardware description (all CPU flags, not just the bf16 ones) and TensorFlow's version."""
    described = {**hardware, "all_flags": sorted(cpu_flags()), "tensorflow": tf.__version__}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(recipe: Optional[str], model: Mapping) -> dict:
    """What a stored doctor answer is for: the recipe and its model config (every key: another width or
    depth is another model). {"key": a hash of both, "label": what the log shows}."""
    described = json.dumps({"recipe": recipe, "model": dict(model)}, sort_keys=True, default=str)
    shown = " ".join(f"{k}={v}" for k, v in model.items() if not str(k).startswith("_"))
    label = f"recipe={recipe}" + (f" ({shown[:100]}{'...' if len(shown) > 100 else ''})" if shown else "")
    return {"key": hashlib.sha256(described.encode()).hexdigest()[:16], "label": label}


def model_identity_of(cfg) -> dict:
    """model_identity of a composed config (`python -m trainer`'s, the doctor's, a run's recorded one)."""
    from omegaconf import OmegaConf

    model = cfg.get("model")
    described = OmegaConf.to_container(model, resolve=True) if model is not None else {}
    identity = model_identity(cfg.get("recipe"), described)
    batch = (cfg.get("data") or {}).get("batch_size")
    return {**identity, "batch": batch} if isinstance(batch, int) else identity  # not in the key: said if it differs


def xla_applies(jit_compile, overrides: Sequence[str] = ()) -> bool:
    """A stored answer's XLA setting applies where trainer.jit_compile was left at its default: null (auto,
    the schema's default, which conf/trainer/default.yaml and the recipes keep) and not given as an override."""
    given = any(o.split("=", 1)[0].lstrip("+~") == "trainer.jit_compile" for o in overrides)
    return jit_compile is None and not given


def candidate(hardware: dict) -> Tuple[str, str]:
    """(policy, why) from the hardware alone: what the probe then confirms or turns down."""
    if hardware["kind"] == "TPU":
        return "mixed_bfloat16", "a TPU: bfloat16 is its native matmul type"
    if hardware["kind"] == "GPU":
        caps = hardware["compute_capabilities"]
        if any(cc is None for cc in caps):
            return "float32", "a GPU of unknown compute capability"
        low = min(caps)
        text = f"GPU compute capability {low[0]}.{low[1]}"
        if low >= (8, 0):
            return "mixed_bfloat16", f"{text} (>= 8.0: bfloat16 Tensor Cores, no loss scaling)"
        if low >= (7, 0):
            return "mixed_float16", f"{text} (7.x: float16 Tensor Cores, no fast bfloat16)"
        return "float32", f"{text} (< 7.0: no Tensor Cores)"
    flags = set(hardware.get("flags", ()))
    if "amx_bf16" in flags:
        return "mixed_bfloat16", "a CPU with AMX (amx_bf16)"
    if "avx512_bf16" in flags:  # faster on some CPUs and models, slower on others (docs/concepts/precision.md)
        return "float32", ("a CPU with AVX-512 BF16 but no AMX: whether bfloat16 trains faster than float32 on such "
                           "CPUs depends on the CPU and the model, so auto does not choose it without a measurement "
                           "of this model")
    return "float32", "a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated, float16 is slow"


def measure_speedup(policy: str, rounds: int = PROBE_ROUNDS, side: int = PROBE_SIDE) -> dict:
    """The candidate's matmul speed over float32's: median of `rounds` interleaved rounds of one
    side x side matmul each, XLA off (as the Trainer runs by default)."""
    from trainer.timing import interleaved_seconds, median_seconds

    def call_of(dtype: str) -> Callable[[], None]:
        a = tf.cast(tf.random.stateless_normal((side, side), seed=(1, 2)), dtype)
        b = tf.cast(tf.random.stateless_normal((side, side), seed=(3, 4)), dtype)
        matmul = tf.function(lambda: tf.matmul(a, b)[0, 0], autograph=False)
        return lambda: matmul().numpy()

    seconds = interleaved_seconds({"float32": call_of("float32"), "reduced": call_of(DTYPE_OF[policy])},
                                  rounds=rounds, warmup=1)
    ratios = sorted(f / r for f, r in zip(seconds["float32"], seconds["reduced"]))
    medians = median_seconds(seconds)
    return {"speedup": ratios[len(ratios) // 2], "rounds": rounds, "side": side,
            "float32_gflops": 2 * side**3 / medians["float32"] / 1e9,
            "reduced_gflops": 2 * side**3 / medians["reduced"] / 1e9, "when": time.strftime("%Y-%m-%d %H:%M")}


def save_doctor_answer(policy: str, command: str, speedup: float, strategy=None, *, model: dict,
                       jit_compile: Optional[bool] = None, batch: Optional[int] = None,
                       verdict: str = "faster", interval: Optional[Sequence[float]] = None) -> Path:
    """What `python -m trainer.doctor --set-auto` stores: precision=auto follows it on this machine for
    runs of `model` (model_identity), with `jit_compile` (the verified configuration's XLA setting where
    it differs from the run's, None: none) where trainer.jit_compile was left at its default. `batch`: the
    batch size it was measured at; `verdict` NO_GAIN: the doctor's interval excluded a gain over `policy`,
    what the run used; `interval`: the speed-up's 95% interval. The answer of before answers were kept per
    model is dropped."""
    hardware = machine(strategy)
    key = machine_key(hardware)
    cache = read_cache()
    answers = {**cache.get(key, {}).get(BY_MODEL, {})}
    answers[model["key"]] = {"policy": policy, "command": command, "speedup": speedup, "jit_compile": jit_compile,
                             "batch": batch, "verdict": verdict, "model": model["label"],
                             "interval": None if interval is None else [float(x) for x in interval],
                             "when": time.strftime("%Y-%m-%d %H:%M")}
    write_cache(key, {BY_MODEL: answers}, cache, drop=("doctor",))
    return cache_path()


class Choice(NamedTuple):
    """precision=auto's answer: the policy, why, the XLA setting of a stored doctor answer (None: none), and
    whether it is the doctor's measured answer for this model (else the hardware rule and the probe's)."""

    policy: str
    why: str
    jit_compile: Optional[bool] = None
    measured: bool = False


def stored_answer(model: dict, strategy=None) -> Optional[dict]:
    """The doctor's answer stored on this machine for `model` (model_identity), or None."""
    return read_cache().get(machine_key(machine(strategy)), {}).get(BY_MODEL, {}).get(model["key"])


def _doctor_answer(entry: dict, model: Optional[dict]) -> Tuple[Optional[dict], str]:
    """(this model's stored doctor answer or None, why the others do not apply: '' when there are none)."""
    answers = entry.get(BY_MODEL, {})
    if model is not None and model["key"] in answers:
        return answers[model["key"]], ""
    others = sorted({a.get("model", "?") for a in answers.values()})
    if entry.get("doctor"):
        others.append("one stored before answers were kept per model (run the doctor with --verify --set-auto again)")
    if not others:
        return None, ""
    this = model["label"] if model is not None else "a Trainer built from Python names no recipe"
    return None, (f"the doctor's stored answers on this machine are for other models ({'; '.join(others)}), not "
                  f"this one ({this}): the hardware rule decides; ")


def _followed(doctor: dict, model: Optional[dict] = None) -> Choice:
    """The Choice of a stored doctor answer for this model, and why (what was measured, when, at which batch;
    a run of another batch size is told the gain was measured at the stored one)."""
    xla, batch = doctor.get("jit_compile"), doctor.get("batch")
    at = f"{doctor['when']}{'' if batch is None else f', batch {batch}'}"
    forget = f"delete {cache_path()} to forget it"
    ours = (model or {}).get("batch")
    if batch is not None and ours is not None and ours != batch:
        forget += (f". It was measured at batch {batch}; this run's batch is {ours}, where the gain may differ: "
                   f"the doctor with this run's overrides (data.batch_size={ours}) and --verify --set-auto "
                   "measures it there")
    if doctor.get("verdict") == NO_GAIN:
        return Choice(doctor["policy"], (
            f"the doctor measured no faster alternative to {doctor['policy']} for this model (python -m "
            f"trainer.doctor --set-auto on this machine, {at}); {forget}"), xla, measured=True)
    if doctor.get("verdict") == OLD_NO_GAIN:  # maybe an inconclusive measurement: followed, not called measured
        return Choice(doctor["policy"], (
            f"an earlier doctor stored \"no significant gain\" for this model over {doctor['policy']} (python -m "
            f"trainer.doctor --set-auto on this machine, {at}), which that doctor also stored for a measurement too "
            f"wide to tell; {forget}"), xla)
    return Choice(doctor["policy"], (
        f"python -m trainer.doctor --set-auto measured it on this machine for this model ({at}: "
        f"{doctor['command']}, {doctor['speedup']:.2f}x{'' if xla is None else ', XLA ' + ('on' if xla else 'off')}); "
        f"{forget}"), xla, measured=True)


def choose(strategy=None, measure: Optional[Callable[[str], dict]] = None, model: Optional[dict] = None) -> Choice:
    """precision=auto's Choice on this machine for `model` (model_identity; see the module docstring)."""
    hardware = machine(strategy)
    policy, why = candidate(hardware)
    key = machine_key(hardware)
    entry = read_cache().get(key, {})
    doctor, not_ours = _doctor_answer(entry, model)
    if doctor:
        return _followed(doctor, model)
    if policy == "float32":
        return Choice(policy, not_ours + why)
    probe = entry.get("probe", {}).get(policy)
    cached = probe is not None
    if not cached:
        probe = (measure or measure_speedup)(policy)
        write_cache(key, {"probe": {**entry.get("probe", {}), policy: probe}})
    measured = (f"{DTYPE_OF[policy]} matmuls measured {probe['speedup']:.2f}x float32 ({probe['reduced_gflops']:.0f} "
                f"vs {probe['float32_gflops']:.0f} GFLOP/s, {probe['side']}x{probe['side']}, "
                f"{probe['when']}{', cached in ' + str(cache_path()) if cached else ''})")
    if probe["speedup"] >= LEAST_MATMUL_SPEEDUP:
        return Choice(policy, f"{not_ours}{why}; {measured}, at least the "
                              f"{LEAST_MATMUL_SPEEDUP:g}x a step needs to gain")
    return Choice("float32", f"{not_ours}{why}, but {measured}, under the "
                             f"{LEAST_MATMUL_SPEEDUP:g}x a step needs to gain")


def decide(strategy=None, measure: Optional[Callable[[str], dict]] = None,
           model: Optional[dict] = None) -> Tuple[str, str]:
    """(policy, why) for precision=auto on this machine (choose() without the XLA part)."""
    return tuple(choose(strategy, measure, model)[:2])


def _recorded_choice(run_dir) -> Optional[Choice]:
    """What auto chose for the run in `run_dir` (its policy, and its XLA setting if it had one) when that
    run has checkpoints to resume, else None."""
    from trainer.checkpoint_files import list_checkpoints

    if run_dir is None or not list_checkpoints(Path(run_dir) / "checkpoints"):
        return None
    record = Path(run_dir) / RUN_RECORD
    try:
        recorded = json.loads(record.read_text())
        policy, xla = recorded.get("policy"), recorded.get("jit_compile")
    except (OSError, ValueError, AttributeError):
        policy = xla = None
    if policy not in DTYPE_OF and policy != "float32":
        log.warning("precision=auto: %s holds checkpoints but no readable record of the policy auto chose for it "
                    "(%s); deciding again. If the run trained in another policy, pass it: precision=<policy>.",
                    run_dir, record)
        return None
    return Choice(policy, f"recorded in {record}", xla if isinstance(xla, bool) else None)


def _applied_xla(xla: Optional[bool], jit_compile, overrides: Optional[Sequence[str]], source: str) -> Optional[bool]:
    """The XLA setting that comes with auto's policy and applies to this run (xla_applies), logged either way;
    `overrides` None: the caller applies none (a Trainer from Python: its config says)."""
    if xla is None or overrides is None:
        return None
    if xla_applies(jit_compile, overrides):
        log.info("precision=auto: trainer.jit_compile=%s with it (%s; trainer.jit_compile was left at its default)",
                 json.dumps(xla), source)
        return xla
    log.info("precision=auto: %s has XLA %s; trainer.jit_compile=%s, as set, is kept", source, "on" if xla else "off",
             json.dumps(jit_compile))
    return None


# a run's length and output: the doctor trains its own count of steps, and a max_steps copied into its command
# only misleads (a max_steps=10 warmup warning while it trains 99 steps). eval_every, log_every and checkpoint_every
# stay: the doctor's timed windows end at those events (loop.steps_to_next_event), as the run's do.
RUN_ONLY_KEYS = {"trainer.max_steps", "trainer.epochs", "trainer.progress_bar", "trainer.resume"}


def _run_only(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key in RUN_ONLY_KEYS or key.startswith("hydra.")


def doctor_command(overrides: Sequence[str]) -> str:
    """The doctor command that measures the model of a run with these overrides and stores its answer for
    precision=auto (`python -m trainer.doctor <overrides> --verify --set-auto`), without the run-only keys."""
    kept = [o for o in overrides if not _run_only(o)]
    return " ".join(["python -m trainer.doctor", *map(shlex.quote, kept), "--verify", "--set-auto"])


def next_step(choice: Choice, overrides: Optional[Sequence[str]]) -> str:
    """What the start-up log adds after auto's reason: how to measure this model (the doctor command with the
    run's `overrides`; None: a Trainer from Python, which follows no stored answer), unless the choice is
    already the doctor's measurement; and how to override it."""
    override = "an explicit precision=... overrides it."
    if choice.measured:
        return override
    if overrides is None:
        return ("From Python, trainer.doctor.diagnose(...) measures this model (docs/doctor.md); give the policy it "
                f"finds as Trainer(precision=...). {override}")
    return (f"`{doctor_command(overrides)}` measures this model on this machine and stores the answer, which "
            f"precision=auto then follows for it; {override}")


def resolve_run(precision, strategy=None, measure: Optional[Callable[[str], dict]] = None, run_dir=None,
                model: Optional[dict] = None, jit_compile=None, overrides: Optional[Sequence[str]] = ()):
    """(`precision` with policy auto replaced by choose()'s answer for `model`, logged with its reason;
    the XLA setting to apply with it, or None). `jit_compile` and `overrides`: the run's configured
    trainer.jit_compile and its command-line overrides; a stored answer's XLA setting applies only where
    it was left at its default (xla_applies): the one place that decides, and records in `run_dir` what
    it applied. Any other policy is returned as it is, with None. With a `run_dir` that holds
    checkpoints, auto keeps what was recorded for that run (a resume must compute in what trained)."""
    return resolve_run_with_reason(precision, strategy, measure, run_dir, model, jit_compile, overrides)[:2]


def resolve_run_with_reason(precision, strategy=None, measure: Optional[Callable[[str], dict]] = None, run_dir=None,
                            model: Optional[dict] = None, jit_compile=None, overrides: Optional[Sequence[str]] = ()):
    """resolve_run's (precision, XLA setting) and why auto chose that policy ("" for any other policy): the
    doctor says it in its report."""
    if precision.policy != AUTO:
        return precision, None, ""
    kept = _recorded_choice(run_dir)
    if kept is not None:
        log.info("precision=auto kept %s: the run in %s trained in it (recorded in %s) and resumes from its "
                 "checkpoints; this machine's current answer is not asked. precision=<policy> changes it.",
                 kept.policy, run_dir, Path(run_dir) / RUN_RECORD)
        xla = _applied_xla(kept.jit_compile, jit_compile, overrides, f"the run's record {Path(run_dir) / RUN_RECORD}")
        return dataclasses.replace(precision, policy=kept.policy), xla, f"the run in {run_dir} trained in it"
    choice = choose(strategy, measure, model)
    log.info("precision=auto chose %s: %s. %s", choice.policy, choice.why, next_step(choice, overrides))
    xla = _applied_xla(choice.jit_compile, jit_compile, overrides, "the doctor's verified answer")
    if run_dir is not None:
        try:
            write_json_atomically(Path(run_dir) / RUN_RECORD, {"policy": choice.policy, "why": choice.why,
                                                                "jit_compile": xla})
        except OSError as e:
            log.warning("precision=auto: could not record its choice in %s (%s): a resume will decide again",
                        run_dir, e.strerror or e)
    return dataclasses.replace(precision, policy=choice.policy), xla, choice.why


def resolve(precision, strategy=None, measure: Optional[Callable[[str], dict]] = None, run_dir=None):
    """resolve_run's precision, for a run that names no model (a Trainer from Python, whose `precision`
    argument may be any form precision.precision_config takes: a Keras dtype policy, a dict...): a doctor
    answer, stored per recipe and model, does not apply; the probe's rule decides. (A resume's recorded
    XLA setting is the CLI's: a Trainer's config says its own, and none is applied or recorded.)"""
    return resolve_run(precision_config(precision), strategy, measure, run_dir, overrides=None)[0]
