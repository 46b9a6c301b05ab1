"""Timing, extrapolation and peak-memory helpers of the benchmarks (``benchmarks/latency.py``, ``benchmarks/index.py``).

Method (as timm's ``benchmark.py``): ``warmup`` untimed calls, then ``repeats`` timed calls, each
bracketed by a device synchronisation so that queued CUDA kernels are charged to the call that
launched them. A :class:`Timing` keeps every repetition and reports the median with its spread
(min / max and the interquartile range). Extrapolation is plain proportionality, done on every
statistic: a stage measured on ``measured`` units and charged for ``target`` units is the timing
multiplied by ``target / measured`` (per-item and per-pair costs are linear in the count).
"""
from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

STATS = ("median", "min", "max", "q1", "q3")


@dataclass(frozen=True)
class Timing:
    """Seconds of every timed repetition of one call (or a scaled / summed version of it)."""

    times: tuple

    def __post_init__(self) -> None:
        if not self.times:
            raise ValueError("a Timing needs at least one repetition")
        object.__setattr__(self, "times", tuple(float(t) for t in self.times))

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def max(self) -> float:
        return max(self.times)

    @property
    def q1(self) -> float:
        return _quantile(self.times, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.times, 0.75)

    @property
    def repeats(self) -> int:
        return len(self.times)

    def scaled(self, factor: float) -> "Timing":
        """Every repetition multiplied by ``factor`` (cost per unit -> cost of ``factor`` units)."""
        return Timing(tuple(t * factor for t in self.times))

    def summary(self) -> Dict[str, float]:
        return {name: getattr(self, name) for name in STATS}

    def __add__(self, other: "Timing") -> "Timing":
        """Stages run one after the other: add repetition-wise sorted times, so min+min, median+median, max+max."""
        a, b = sorted(self.times), sorted(other.times)
        if len(a) != len(b):  # different repetition counts: align on the quantiles of the shorter one
            n = min(len(a), len(b))
            a, b = _resample(a, n), _resample(b, n)
        return Timing(tuple(x + y for x, y in zip(a, b)))

    def __radd__(self, other):  # so that sum([...]) works
        if other == 0:
            return self
        return NotImplemented


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), without numpy."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _resample(sorted_values: List[float], n: int) -> List[float]:
    if n == 1:
        return [statistics.median(sorted_values)]
    return [_quantile(sorted_values, i / (n - 1)) for i in range(n)]


def extrapolate(timing: Timing, measured: float, target: float) -> Timing:
    """A stage timed on ``measured`` units (items or pairs), charged for ``target`` units."""
    if measured <= 0:
        raise ValueError(f"cannot extrapolate from {measured} measured units")
    if target < 0:
        raise ValueError(f"cannot extrapolate to {target} units")
    return timing.scaled(target / measured)


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_call(
    fn: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
    timer: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times, each synchronised and timed."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = timer()
        fn()
        sync()
        times.append(timer() - start)
    return Timing(tuple(times))


# --------------------------------------------------------------------------------------------- memory
_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_bytes(field_name: str) -> Optional[int]:
    """A memory field of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS) in bytes; None off Linux."""
    try:
        with open(_STATUS, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_hwm_bytes() -> Optional[int]:
    return _status_bytes("VmHWM")


def _reset_rss_peak() -> bool:
    """Linux: writing "5" to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


@dataclass
class PeakMemory:
    """Peak memory of the code run inside ``with PeakMemory(device) as mem:``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the
    caching allocator's reserve). CPU: the process's peak resident set size, reset on entry through
    ``/proc/self/clear_refs`` where Linux allows it (otherwise the process-lifetime ``ru_maxrss``, and
    ``kind`` says so). CPU figures include every model loaded in the process.
    """

    device: torch.device | str
    peak_bytes: int = 0
    start_bytes: int = 0  # allocated (CUDA) / resident (CPU) on entry: the peak minus this is the stage's own
    kind: str = ""
    _reset_ok: bool = field(default=False, repr=False)

    def __enter__(self) -> "PeakMemory":
        self.device = torch.device(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
            self.kind = "CUDA max allocated"
        else:
            self.start_bytes = _status_bytes("VmRSS") or 0
            self._reset_ok = _reset_rss_peak() and _vm_hwm_bytes() is not None
            self.kind = "process peak RSS" if self._reset_ok else "process peak RSS (lifetime, could not reset)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self.peak_bytes = int(_vm_hwm_bytes() if self._reset_ok else _ru_maxrss_bytes())

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20

    @property
    def increase_mb(self) -> float:
        return max(0, self.peak_bytes - self.start_bytes) / 2**20


def autocast(device: torch.device | str, precision: str):
    """fp32: no autocast; fp16 / bf16: ``torch.autocast`` on the device (weights stay fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
