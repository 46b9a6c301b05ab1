"""Timing the stages: per-unit costs on samples, the dual student's similarity + top-k and other stages in full."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..timing import PeakMemory, Timing, autocast, synchronizer, time_call
from .inputs import image_hw, synthetic_images, synthetic_texts
from .models import Models
from .settings import BenchError, Settings, log
from .strategies import Workload

__all__ = ["Bench", "Cost", "Measured", "encode_all", "measure_costs", "measure_full", "measure_similarity",
           "pair_block", "rerank", "similarity_topk"]


@dataclass
class Cost:
    """One stage's measured cost per unit (an image, a caption, a pair) and how it was measured."""

    per_unit: Timing  # seconds per unit
    unit: str  # "image", "caption", "pair"
    sample: int  # units per timed call
    repeats: int
    peak_mb: float
    memory_kind: str
    increase_mb: float = 0.0  # the peak above the memory in use when the stage started

    def describe(self) -> str:
        return f"sample of {self.sample} {self.unit}s x {self.repeats} rep{'s' * (self.repeats != 1)}"

    def to_json(self) -> Dict:
        return {
            "seconds_per_unit": self.per_unit.summary(), "unit": self.unit, "sample": self.sample,
            "repeats": self.repeats, "peak_memory_mb": round(self.peak_mb, 1),
            "peak_increase_mb": round(self.increase_mb, 1), "memory_kind": self.memory_kind,
        }


@dataclass
class Measured:
    """A stage run in full for one workload (its whole count), replacing the extrapolation."""

    timing: Timing
    peak_mb: float
    memory_kind: str
    increase_mb: float = 0.0
    note: str = "full"


class Bench:
    """Times calls under inference mode and the chosen autocast, with warm-up, sync and peak memory."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.sync = synchronizer(settings.device)

    def time(self, fn: Callable[[], object], warmup: Optional[int] = None) -> Tuple[Timing, PeakMemory]:
        def call():
            with torch.inference_mode(), autocast(self.s.device, self.s.precision):
                return fn()

        try:
            with PeakMemory(self.s.device) as mem:
                timing = time_call(call, self.s.repeats, self.s.warmup if warmup is None else warmup, self.sync)
        except torch.cuda.OutOfMemoryError as err:
            raise BenchError(
                f"out of GPU memory at --batch-size {self.s.batch_size} ({err}); try a smaller --batch-size"
            ) from None
        return timing, mem

    def per_unit(self, fn: Callable[[], object], sample: int, unit: str) -> Cost:
        timing, mem = self.time(fn)
        return Cost(timing.scaled(1.0 / sample), unit, sample, timing.repeats, mem.peak_mb, mem.kind, mem.increase_mb)


def pair_block(n_pool: int, batch: int) -> Tuple[int, int]:
    """An (images x captions) block of ``batch`` pairs for timing ``score_features`` (captions first)."""
    n_txt = min(batch, n_pool)
    return max(1, batch // n_txt), n_txt


def measure_costs(models: Models, bench: Bench) -> Dict[str, Cost]:
    """Per-unit costs of every stage of every strategy, for one teacher and its students."""
    s = bench.s
    b = s.batch_size
    costs: Dict[str, Cost] = {}

    teacher_hw = image_hw(models.teacher)
    images = synthetic_images(teacher_hw, b, s.device, seed=1)
    texts = synthetic_texts(models.teacher, b, s.device, seed=2)

    log(f"  [{models.family}] teacher, naive: {b} pairs per call")
    costs["naive_pair"] = bench.per_unit(lambda: models.teacher.score_pairs_naive(images, texts), b, "pair")

    for role, scorer in (("teacher", models.teacher), ("fusion", models.fusion)):
        hw = image_hw(scorer)
        imgs = images if hw == teacher_hw else synthetic_images(hw, b, s.device, seed=1)
        txts = synthetic_texts(scorer, b, s.device, seed=2)
        log(f"  [{models.family}] {role}: encode {b} images, {b} captions; fuse {b} pairs")
        costs[f"{role}_image"] = bench.per_unit(lambda: scorer.encode_images(imgs), b, "image")
        costs[f"{role}_text"] = bench.per_unit(lambda: scorer.encode_texts(txts), b, "caption")
        with torch.inference_mode(), autocast(s.device, s.precision):
            img_feats, txt_feats = scorer.encode_images(imgs), scorer.encode_texts(txts)
        # exhaustive: score_features on a block of 1 image x b captions (a model may share per-item work
        # across a block, as METER does for its first co-attention layer; that share is charged to the pairs)
        n_img, n_txt = pair_block(b, b)
        img_block = {k: v[:n_img] for k, v in img_feats.items()}
        costs[f"{role}_pair"] = bench.per_unit(lambda: scorer.score_features(img_block, txt_feats), n_img * n_txt, "pair")
        # re-ranking: b gathered (query, candidate) pairs through score_feature_pairs, as rerank() runs them
        candidates = torch.randint(0, b, (1, b), generator=torch.Generator().manual_seed(3)).to(s.device)
        costs[f"{role}_rerank_pair"] = bench.per_unit(
            lambda: rerank(scorer, img_feats, txt_feats, candidates, b, query_is_image=True), b, "pair")

    hw = image_hw(models.dual)
    imgs, txts = synthetic_images(hw, b, s.device, seed=1), synthetic_texts(models.dual, b, s.device, seed=2)
    log(f"  [{models.family}] dual student: encode {b} images, {b} captions")
    costs["dual_image"] = bench.per_unit(lambda: models.dual.encode_images(imgs), b, "image")
    costs["dual_text"] = bench.per_unit(lambda: models.dual.encode_texts(txts), b, "caption")
    return costs


def similarity_topk(image_emb: Tensor, text_emb: Tensor, k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """Top-k both ways from the full similarity matrix, computed ``chunk`` image rows at a time.

    Returns (i2t [n_images, k] caption indices, t2i [n_texts, k] image indices), best first. One pass:
    each row block gives its images' top-k captions and is merged into a running top-k per caption.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    i2t: List[Tensor] = []
    best = image_emb.new_full((0, n_txt), -math.inf)
    best_idx = torch.zeros(0, n_txt, dtype=torch.long, device=image_emb.device)
    for start in range(0, n_img, chunk):
        sim = image_emb[start:start + chunk] @ text_emb.T  # [c, n_txt]
        i2t.append(sim.topk(k_i2t, dim=1).indices)
        top = sim.topk(min(k_t2i, sim.shape[0]), dim=0)
        merged, merged_idx = torch.cat([best, top.values]), torch.cat([best_idx, top.indices + start])
        keep = merged.topk(min(k_t2i, merged.shape[0]), dim=0)
        best, best_idx = keep.values, merged_idx.gather(0, keep.indices)
    return torch.cat(i2t), best_idx.T.contiguous()


def _embedding_dim(dual: nn.Module, bench: Bench) -> Tuple[int, torch.dtype]:
    s = bench.s
    txts = synthetic_texts(dual, 2, s.device)
    with torch.inference_mode(), autocast(s.device, s.precision):
        emb = dual.encode_texts(txts)["embedding"]
    return emb.shape[-1], emb.dtype


def measure_similarity(dual: nn.Module, workload: Workload, bench: Bench) -> Tuple[Measured, Tensor, Tensor]:
    """The dual student's full similarity matrix + top-k both ways, at the workload's real size."""
    s = bench.s
    dim, dtype = _embedding_dim(dual, bench)
    g = torch.Generator().manual_seed(0)
    img = nn.functional.normalize(torch.randn(workload.n_images, dim, generator=g), dim=-1).to(s.device, dtype)
    txt = nn.functional.normalize(torch.randn(workload.n_texts, dim, generator=g), dim=-1).to(s.device, dtype)
    result: List[Tuple[Tensor, Tensor]] = []
    timing, mem = bench.time(lambda: result.append(similarity_topk(img, txt, s.k, s.sim_chunk)))
    return Measured(timing, mem.peak_mb, mem.kind, mem.increase_mb), *result[-1]


def encode_all(scorer: nn.Module, inputs: Dict[str, Tensor], count: int, batch: int, method: str) -> None:
    """Run ``scorer.<method>`` over ``count`` items in batches (the synthetic batch ``inputs`` re-used)."""
    fn = getattr(scorer, method)
    for start in range(0, count, batch):
        n = min(batch, count - start)
        fn({k: v[:n] for k, v in inputs.items()})


def rerank(scorer: nn.Module, query_feats: Dict[str, Tensor], gallery_feats: Dict[str, Tensor],
           candidates: Tensor, batch: int, query_is_image: bool) -> None:
    """Score every query with its k candidates (features cached per item), ``batch`` pairs per call.

    ``candidates`` [n_queries, k] index the gallery; indices are taken modulo the cached feature pools
    (synthetic items: the values do not change the latency, and the gather and fusion are the real ones).
    """
    n_q, k = candidates.shape
    query_idx = torch.arange(n_q, device=candidates.device).repeat_interleave(k)
    gallery_idx = candidates.reshape(-1)
    n_query_pool = next(iter(query_feats.values())).shape[0]
    n_gallery_pool = next(iter(gallery_feats.values())).shape[0]
    for start in range(0, len(query_idx), batch):
        qi = query_idx[start:start + batch] % n_query_pool
        gi = gallery_idx[start:start + batch] % n_gallery_pool
        q = {name: v[qi] for name, v in query_feats.items()}
        g = {name: v[gi] for name, v in gallery_feats.items()}
        if query_is_image:
            scorer.score_feature_pairs(q, g)
        else:
            scorer.score_feature_pairs(g, q)


def measure_full(models: Models, workload: Workload, bench: Bench, i2t: Tensor, t2i: Tensor) -> Dict[Tuple[str, str], Measured]:
    """Linear stages run in full for this workload: the dual's encodings (CUDA / --full), and with
    --full the re-rankers' encodings and the re-ranking of every query's k candidates."""
    s = bench.s
    b = s.batch_size
    out: Dict[Tuple[str, str], Measured] = {}
    encoders = [("dual", models.dual)] if s.full_dual else []
    if s.full:
        encoders += [("teacher", models.teacher), ("fusion", models.fusion)]
    for role, scorer in encoders:
        hw = image_hw(scorer)
        imgs, txts = synthetic_images(hw, b, s.device, seed=1), synthetic_texts(scorer, b, s.device, seed=2)
        log(f"  [{models.family}/{workload.name}] {role}: encoding all {workload.n_images:,} images and {workload.n_texts:,} captions")
        t, m = bench.time(lambda: encode_all(scorer, imgs, workload.n_images, b, "encode_images"), warmup=0)
        out[(f"{role}_image", "images")] = Measured(t, m.peak_mb, m.kind, m.increase_mb)
        t, m = bench.time(lambda: encode_all(scorer, txts, workload.n_texts, b, "encode_texts"), warmup=0)
        out[(f"{role}_text", "texts")] = Measured(t, m.peak_mb, m.kind, m.increase_mb)
        if role == "dual":
            continue
        with torch.inference_mode(), autocast(s.device, s.precision):
            img_feats, txt_feats = scorer.encode_images(imgs), scorer.encode_texts(txts)
        n_pairs = (workload.n_images + workload.n_texts) * s.k
        log(f"  [{models.family}/{workload.name}] {role}: re-ranking {n_pairs:,} candidate pairs")

        def both_directions():
            rerank(scorer, img_feats, txt_feats, i2t, b, query_is_image=True)
            rerank(scorer, txt_feats, img_feats, t2i, b, query_is_image=False)

        t, m = bench.time(both_directions, warmup=0)
        out[(f"{role}_rerank_pair", "candidates")] = Measured(
            t, m.peak_mb, m.kind, m.increase_mb, note="full (features cached for a pool of items, indices modulo the pool)"
        )
    return out
