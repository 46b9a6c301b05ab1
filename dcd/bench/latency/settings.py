"""The benchmark's command line and settings: ``parse_args`` -> ``make_settings`` -> :class:`Settings`."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

import teachers

__all__ = ["BenchError", "Settings", "log", "make_settings", "parse_args"]


class BenchError(Exception):
    """A user-facing error: ``main`` exits with its message (status 1) and no traceback."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Settings:
    device: torch.device
    precision: str  # the one being timed
    precisions: Tuple[str, ...]  # every one the run times, in turn
    batch_size: int
    repeats: int
    warmup: int
    k: int
    quick: bool
    full: bool
    sim_chunk: int

    @property
    def full_dual(self) -> bool:
        """The dual student's encodings run in full on CUDA and with --full; sampled on CPU otherwise."""
        return self.full or self.device.type == "cuda"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/latency.py",
        description="Retrieval latency of cross-encoder teachers and distilled students at COCO 5K / Flickr30K 1K sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--teacher", choices=(*teachers.list_teachers(), "all"), default="all",
                   help="a registered teacher family, or all of them")
    p.add_argument("--dataset", choices=("coco", "flickr30k", "all"), default="all")
    p.add_argument("--teacher-checkpoint", default=None, help="teacher weights (needs --teacher meter or vilt)")
    p.add_argument(
        "--student-checkpoint", action="append", default=[], metavar="DIR",
        help="a saved student (dir with config.json, family 'dual' or 'fusion'), or a run directory holding "
             "several; repeatable. Without one, students are built at their real sizes with random weights",
    )
    p.add_argument("--precision", default=None, metavar="P[,P]",
                   help="autocast precision(s) to time, comma-separated of fp32, bf16, fp16; default: fp16 on CUDA, "
                        "fp32 and bf16 on a CPU with bf16 units (AMX / AVX512-BF16), fp32 on other CPUs")
    p.add_argument("--k", type=int, default=16, help="re-ranking depth: candidates per query from the dual student")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items or pairs per call, the same for every model (default: 64 CUDA, 8 CPU, 4 --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per stage (default: 10 CUDA, 3 CPU, 2 --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: 3 CUDA, 1 CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model presets and small samples (CI smoke run, ~1 min on CPU)")
    p.add_argument("--full", action="store_true",
                   help="run every linear stage in full (encodings, re-ranking); only strategies 1-3 stay extrapolated")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own, all cores; --quick: 1, steadier on a shared machine)")
    p.add_argument("--out", default="runs/latency", help="directory for latency.json and latency_vs_corpus.png")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    from teachers.precision import bf16_is_fast

    default = "fp16" if cuda else "fp32,bf16" if bf16_is_fast(device) else "fp32"
    precisions = tuple(p.strip() for p in (args.precision or default).split(",") if p.strip())
    unknown = [p for p in precisions if p not in ("fp32", "bf16", "fp16")]
    if unknown or not precisions:
        raise BenchError(f"--precision takes fp32, bf16 or fp16 (comma-separated), got {args.precision!r}")
    if "fp16" in precisions and not cuda:
        raise BenchError("--precision fp16 needs --device cuda; on a CPU use fp32 or bf16")
    batch = args.batch_size or (64 if cuda else 4 if args.quick else 8)
    repeats = args.repeats or (10 if cuda else 2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    for name, value, low in (("--k", args.k, 1), ("--batch-size", batch, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}")
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if args.teacher_checkpoint and args.teacher == "all":
        raise BenchError("--teacher-checkpoint needs one teacher family: add "
                         + " or ".join(f"--teacher {f}" for f in teachers.list_teachers()))
    return Settings(
        device=device, precision=precisions[0], precisions=precisions, batch_size=batch, repeats=repeats, warmup=warmup, k=args.k,
        quick=args.quick, full=args.full, sim_chunk=2048 if cuda else 512,
    )
