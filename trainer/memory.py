"""Memory readings for the logs, the summary and the doctor: the host's resident set and, on a GPU, the
device's peak allocation. One place, so a train log line and `python -m trainer.doctor` read the same."""
from __future__ import annotations

import ctypes
import gc
import re
import resource
import sys
import threading
from typing import Dict, List

import psutil


def host_rss_mb() -> float:
    """This process's resident set now, in MiB."""
    return psutil.Process().memory_info().rss / 2**20


def host_peak_rss_mb() -> float:
    """This process's peak resident set since it started, in MiB (getrusage: KiB on Linux, bytes on macOS).
    It never goes down: to compare configurations, measure each in its own process."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def accelerators() -> List[str]:
    """The logical GPU devices ("GPU:0", ...): the ones `tf.config.experimental.get_memory_info` reads."""
    import tensorflow as tf

    return [d.name.replace("/device:", "") for d in tf.config.list_logical_devices("GPU")]


def device_peak_mb(reset: bool = False) -> Dict[str, float]:
    """Peak bytes allocated on each GPU since the last reset, in MiB; {} without a GPU (the CPU's memory
    is the host's: see host_peak_rss_mb). `reset=True` starts a new peak after reading."""
    import tensorflow as tf

    peaks = {}
    for device in accelerators():
        peaks[device] = tf.config.experimental.get_memory_info(device)["peak"] / 2**20
        if reset:
            tf.config.experimental.reset_memory_stats(device)
    return peaks


def memory_logs(reset_device_peak: bool = False) -> Dict[str, float]:
    """The memory fields of a log line: host_rss_mb, host_peak_rss_mb, and gpu<N>_peak_mb per GPU."""
    rss = host_rss_mb()
    logs = {"host_rss_mb": round(rss, 1), "host_peak_rss_mb": round(max(rss, host_peak_rss_mb()), 1)}
    for device, peak in device_peak_mb(reset=reset_device_peak).items():
        logs[f"{device.lower().replace(':', '')}_peak_mb"] = round(peak, 1)
    return logs


_FIELD = re.compile(r"^(host_rss_mb|host_peak_rss_mb|gpu\d+_peak_mb)$")


def is_memory_field(name: str) -> bool:
    """Whether a log key is one of memory_logs()'s."""
    return bool(_FIELD.match(name))


def memory_text(logs: Dict[str, float]) -> str:
    """The short form for a log line: `mem 612 MiB` (host RSS now) and each GPU's peak, `gpu0 1843 MiB peak`."""
    parts = [f"mem {logs['host_rss_mb']:.0f} MiB"] if "host_rss_mb" in logs else []
    parts += [f"{k[:-len('_peak_mb')]} {v:.0f} MiB peak" for k, v in logs.items()
              if k.startswith("gpu") and is_memory_field(k)]
    return ", ".join(parts)


def malloc_trim() -> None:
    """Returns freed heap pages to the OS (glibc), so an RSS delta shows new memory, not reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a block, for comparing configurations inside one process: on a GPU the
    allocator's peak (reset on entry) over the GPUs, on the CPU the process RSS sampled in a thread.

    Why sample: ru_maxrss is a lifetime high-water mark, so it cannot separate configurations in one
    process. `delta_mb` (peak minus the reading on entry) is what the block added; `kind` says which.
    """

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.devices = accelerators()

    def _device_bytes(self, key: str) -> int:
        import tensorflow as tf

        return sum(tf.config.experimental.get_memory_info(d)[key] for d in self.devices)

    def __enter__(self):
        if self.devices:
            import tensorflow as tf

            for device in self.devices:
                tf.config.experimental.reset_memory_stats(device)
            self.base = self._device_bytes("current")
            return self
        gc.collect()
        malloc_trim()
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        if self.devices:
            self.peak = self._device_bytes("peak")
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.proc.memory_info().rss)
        return False

    @property
    def kind(self) -> str:
        return "gpu_allocator_peak" if self.devices else "process_rss"

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20
