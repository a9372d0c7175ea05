"""precision=auto's cache: ~/.cache/trainer/precision_auto.json ($TRAINER_CACHE_DIR overrides the folder)
holds, per machine, the matmul probe's results and the doctor's stored answers (trainer/auto_precision.py
decides with them). Read with checks, since a hand-edited or foreign file must not crash a run; written
atomically and on a best-effort basis: an unwritable cache costs a probe per run, not the run."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from trainer.precision import POLICIES

log = logging.getLogger("trainer.auto_precision")  # its lines are precision=auto's

CACHE_FILE = "precision_auto.json"


def cache_path() -> Path:
    return Path(os.environ.get("TRAINER_CACHE_DIR") or Path.home() / ".cache" / "trainer") / CACHE_FILE


_DOCTOR_KEYS, _PROBE_KEYS = {"policy", "command", "speedup", "when"}, {"speedup", "side", "float32_gflops",
                                                                         "reduced_gflops", "when"}
BY_MODEL = "doctor_by_model"  # machine -> model key -> the doctor's answer ("doctor": one per machine, before)


def _well_formed(cache) -> bool:
    """The file's shape as write_cache writes it: a hand-edited or foreign file must not crash a run
    (the doctor's answers inside are checked one by one: _drop_malformed_answers)."""
    if not isinstance(cache, dict):
        return False
    for entry in cache.values():
        if not isinstance(entry, dict):
            return False
        probes, by_model = entry.get("probe", {}), entry.get(BY_MODEL, {})
        if not isinstance(by_model, dict):
            return False
        if not isinstance(probes, dict) or not all(isinstance(p, dict) and _PROBE_KEYS <= p.keys()
                                                   for p in probes.values()):
            return False
    return True


def _answer_problem(answer) -> Optional[str]:
    """What is wrong with a stored doctor answer, or None: its keys and their values, as
    auto_precision.choose() uses them."""
    if not isinstance(answer, dict):
        return "not a mapping"
    if not _DOCTOR_KEYS <= answer.keys():
        return f"missing {', '.join(sorted(_DOCTOR_KEYS - answer.keys()))}"
    speedup, xla = answer["speedup"], answer.get("jit_compile")
    if answer["policy"] not in POLICIES:
        return f"policy {answer['policy']!r} is not one of {', '.join(POLICIES)}"
    if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or speedup != speedup:
        return f"speedup {speedup!r} is not a number"
    if not isinstance(xla, (bool, type(None))):
        return f"jit_compile {xla!r} is not true, false or null"
    batch = answer.get("batch")
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int)):
        return f"batch {batch!r} is not a whole number"
    return None


def _drop_malformed_answers(cache: dict) -> None:
    """Leaves out (in place) the doctor answers auto_precision.choose() cannot follow, with one warning for all."""
    dropped = []
    for entry in cache.values():
        problem = _answer_problem(entry["doctor"]) if "doctor" in entry else None
        if problem:
            dropped.append(f"the one stored before answers were kept per model ({problem})")
            del entry["doctor"]
        answers = entry.get(BY_MODEL, {})
        for key in list(answers):
            problem = _answer_problem(answers[key])
            if problem:
                label = answers[key].get("model", key) if isinstance(answers[key], dict) else key
                dropped.append(f"{label} ({problem})")
                del answers[key]
    if dropped:
        log.warning("precision=auto: a doctor answer in its cache %s is not in the expected form (edited by hand?): "
                    "%s; ignoring it (python -m trainer.doctor --verify --set-auto stores it again)", cache_path(),
                    "; ".join(dropped))


def read_cache() -> dict:
    try:
        cache = json.loads(cache_path().read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("precision=auto: its cache %s cannot be read (%s); ignoring it", cache_path(), e)
        return {}
    if not _well_formed(cache):
        log.warning("precision=auto: its cache %s is not in the expected shape (edited by hand?); ignoring it, "
                    "and the next answer replaces it", cache_path())
        return {}
    _drop_malformed_answers(cache)
    return cache


def write_cache(key: str, entry: dict, cache: Optional[dict] = None, drop: Sequence[str] = ()) -> None:
    """Best effort: an unwritable cache costs a probe per run, not the run. Atomic: a reader in another
    process never sees half a file. `cache`: as read already; `drop`: keys of the machine's entry to remove."""
    cache = read_cache() if cache is None else cache
    cache[key] = {k: v for k, v in {**cache.get(key, {}), **entry}.items() if k not in drop}
    try:
        write_json_atomically(cache_path(), cache)
    except OSError as e:
        log.warning("precision=auto: could not write its cache %s (%s); the probe runs again next time",
                    cache_path(), e.strerror or e)


def write_json_atomically(path: Path, value) -> None:
    """A temporary file beside `path`, then os.replace: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(value, indent=1))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
