"""Numeric precision, chosen per stage by what pays on the hardware, and the autocast that applies it.

bf16 halves the bytes of every matrix and, where the hardware has bf16 units (CUDA from Ampere; x86
CPUs with AMX-BF16 or AVX512-BF16), multiplies matmul throughput: measured on a 2-core CPU with
AVX512-BF16, a 2048x384 @ 384x1536 matmul runs 2.8x an fp32 one, on one with AMX 12x. Whether a
*stage* gains depends on its matrices (``benchmarks/throughput.py`` measures each):

* ``scoring`` -- a cross-encoder's inference (exhaustive teacher passes, the score cache, DCD's online
  teacher scoring, re-ranking): many pairs, big matrices, 2-2.5x faster in bf16 on such CPUs at a
  logit difference of about 0.002 and the same top-1 rankings. ``auto``: bf16 wherever bf16 is fast.
* ``dual`` -- training a dual encoder: smaller matrices, where autocast's casts eat part of the gain.
  Measured on the 2-core AVX512-BF16 machine, a whole step of the embedded dual student (data, forward,
  backward, AdamW) takes 253 ms in bf16 against 304 ms in fp32 on 2 threads (406 against 621 on one).
  ``auto``: bf16 wherever bf16 is fast.
* ``cross`` -- training a cross-encoder (the embedded teacher, the fusion students): bigger matrices
  (every pair's tokens). ``auto``: bf16 wherever bf16 is fast.

Where bf16 is emulated (no bf16 units) every stage runs fp32: emulated bf16 is slower than fp32.

``auto`` is resolved once per run into a :class:`PrecisionPlan` (recorded in the run's recipe and in
every stage identity: a bf16 score cache is never reused as an fp32 one). ``DCD_CPU_BF16=0`` (or 1)
overrides the CPU detection, e.g. to reproduce fp32 figures on a bf16 machine.

This module lives in ``teachers/`` because the frozen :class:`~teachers.base.Teacher` view applies the
scoring precision itself; ``dcd`` and the students import it from here.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict, dataclass
from typing import Any, Dict, Tuple

import torch

__all__ = ["PRECISIONS", "STAGES", "PrecisionPlan", "autocast", "bf16_is_fast", "choose", "cpu_bf16_flags", "plan"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
STAGES = ("scoring", "dual", "cross")
#: the CPU flags that mean bf16 matmuls run on bf16 units (oneDNN dispatches to them)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> Tuple[str, ...]:
    """The bf16 CPU flags this machine reports (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    except OSError:
        pass
    return ()


def bf16_is_fast(device: torch.device | str) -> bool:
    """Whether bf16 matmuls run on bf16 units on ``device`` (not emulated, which is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        override = os.environ.get("DCD_CPU_BF16")
        if override is not None:
            return override.strip().lower() not in ("0", "false", "no", "")
        return bool(cpu_bf16_flags())
    return False


def choose(requested: str, device: torch.device | str, stage: str) -> str:
    """The precision ``stage`` runs at: ``requested`` itself, or for ``auto`` what pays on ``device``."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {requested!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    device = torch.device(device)
    if requested != "auto":
        if requested == "fp16" and device.type != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device (this run's device is {device}); use bf16 or fp32")
        return requested
    return "bf16" if bf16_is_fast(device) else "fp32"


@dataclass(frozen=True)
class PrecisionPlan:
    """What one run's stages compute in: the resolved form of ``--precision``."""

    requested: str
    scoring: str
    dual: str
    cross: str

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def training(self, family: str) -> str:
        """The precision to train a model of ``family`` at: a dual encoder's, or a cross-encoder's."""
        return self.dual if family == "dual" else self.cross

    def describe(self) -> str:
        return (f"precision {self.requested}: scoring {self.scoring}, dual training {self.dual}, "
                f"cross-encoder training {self.cross}")


def plan(requested: str, device: torch.device | str) -> PrecisionPlan:
    """Resolve ``requested`` (``auto`` or one precision for every stage) for ``device``."""
    return PrecisionPlan(requested, *(choose(requested, device, stage) for stage in STAGES))


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` on ``device`` at ``precision`` (bf16 / fp16); fp32: no autocast (a no-op context).

    Weights stay fp32; matmuls run in the low precision, reductions (softmax, layer norm) in fp32.
    """
    if precision in ("fp32", None):
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    if dtype is None:
        raise ValueError(f"autocast needs fp32, bf16 or fp16 (resolve 'auto' with choose()), not {precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
