"""Teacher scores computed once, stored on disk, memory-mapped: later epochs and re-runs skip the teacher.

The teacher is the expensive part of distillation. For random negatives the candidate pools can be
fixed up front: every training image gets ``pool_size`` negative captions (never its own), and the
teacher scores them and every positive pair once. During training, each sample draws its K
candidates from its image's pool and reads the teacher logits from the cache.

Layout of the cache folder (written to a temporary folder and renamed into place, so a killed build
leaves nothing half-written)::

    header.json    what the cache was built from: teacher weights (sha256), split, sizes, seed
    pool.npy       int64   [num_images, pool_size]  negative caption indices
    scores.npy     float32 [num_images, pool_size]  teacher logits of (image, pool caption)
    positive.npy   float32 [num_captions]           teacher logit of (caption's image, caption)

:meth:`TeacherScoreCache.open` refuses a cache whose header does not match what the caller expects
(another teacher, split or pool size): a stale cache is an error naming the field, never silently used, and
never deleted (the folder is named by the cache's identity, :func:`dcd.pipeline.teacher_score_cache`).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from teachers.base import concat, to_device

from .out_of_fold import query_folds

__all__ = ["StaleCacheError", "TeacherScoreCache", "cache_header", "candidate_pools", "scoring_precision"]

FORMAT_VERSION = 2


class StaleCacheError(ValueError):
    """A score cache built for another teacher / split / pool than the one asked for."""


def scoring_precision(model: torch.nn.Module) -> str:
    """What ``model``'s scores are computed in: a :class:`teachers.Teacher`'s scoring precision, else fp32."""
    return getattr(model, "scoring_precision", "fp32")


def cache_header(teacher: torch.nn.Module, split, pool_size: int, seed: int, near: int) -> Dict[str, Any]:
    """What a cache built from ``teacher`` on ``split`` records, and what opening it expects to find."""
    from .stages import weights_sha256

    header = {
        "format": FORMAT_VERSION, "teacher": weights_sha256(teacher), "split": split.name,
        "source": str(split.source), "num_images": split.num_images, "num_captions": split.num_captions,
        "pool_size": pool_size, "seed": seed, "near": near,
    }
    precision = scoring_precision(teacher)
    if precision != "fp32":  # an fp32 cache keeps the header it had before precision was recorded
        header["precision"] = precision
    return header


def candidate_pools(split, pool_size: int, seed: int = 0, near: int = 0) -> Tensor:
    """``LongTensor [num_images, pool_size]``: each image's pool, ``near`` caption neighbours first, then random
    captions of other images; the same for the same split, size and seed, whatever the caller's RNG stream."""
    from dcd.candidates import neighbour_captions, random_captions

    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    everyone = torch.arange(split.num_images)
    pool = random_captions(everyone, split.caption_image_tensor(), pool_size - near)
    if near:
        pool = torch.cat([neighbour_captions(split, everyone, near), pool], dim=1)
    torch.random.set_rng_state(generator_state)
    return pool


class TeacherScoreCache:
    """Read side: ``lookup(image_index, caption_index, k)`` -> candidate captions and teacher logits."""

    def __init__(self, directory: Path, header: Dict[str, Any], pool: np.ndarray, scores: np.ndarray,
                 positive: np.ndarray):
        self.directory, self.header = Path(directory), header
        self.pool, self.scores, self.positive = pool, scores, positive

    @property
    def pool_size(self) -> int:
        return int(self.pool.shape[1])

    # ------------------------------------------------------------------ open / build
    @classmethod
    def open(cls, directory: str | Path, expect: Optional[Dict[str, Any]] = None) -> "TeacherScoreCache":
        directory = Path(directory)
        header_path = directory / "header.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"no teacher score cache at {directory} (missing header.json)")
        header = json.loads(header_path.read_text())
        expect = dict(expect or {})
        if expect:  # absent means fp32 (caches from before precision was recorded): never mix the two
            expect.setdefault("precision", "fp32")
        for key, value in expect.items():
            if key == "precision" and header.get(key, "fp32") == value:
                continue
            if header.get(key) != value:
                raise StaleCacheError(
                    f"teacher score cache {directory} is stale: header field {key!r} is {header.get(key)!r}, "
                    f"expected {value!r}; delete the folder to rebuild it"
                )
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("pool", "scores", "positive")}
        if arrays["pool"].shape != arrays["scores"].shape or arrays["positive"].shape != (header["num_captions"],):
            raise StaleCacheError(f"teacher score cache {directory}: array shapes disagree with header.json")
        return cls(directory, header, **arrays)

    @classmethod
    def build(cls, teacher, split, directory: str | Path, pool_size: int = 63, seed: int = 0, batch_size: int = 32,
              device: str | torch.device = "cpu", progress: bool = True,
              text_memory_bytes: int = 1 << 30, near: int = 0) -> "TeacherScoreCache":
        """Score every image's pool and every positive pair with ``teacher``; reuse a matching cache.

        ``near``: that many of each pool's captions come from the image's caption-word neighbours
        (:func:`~dcd.candidates.neighbour_captions`, where binding twins are), the rest at random; with
        random pools alone the teacher's "hardest" negatives are mostly easy ones.

        ``text_memory_bytes``: how much caption text-feature memory to keep so that a caption met in several
        pools is encoded once (past it, captions are re-encoded per batch: same scores, more time).
        """
        from dcd.data import EvalImages

        directory = Path(directory)
        header = cache_header(teacher, split, pool_size, seed, near)
        if (directory / "header.json").is_file():  # another teacher's cache here is an error, never deleted
            return cls.open(directory, expect=header)
        pool = candidate_pools(split, pool_size, seed, near)

        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            np.save(tmp / "pool.npy", pool.numpy())
            scores = np.lib.format.open_memmap(tmp / "scores.npy", mode="w+", dtype=np.float32, shape=tuple(pool.shape))
            positive = np.lib.format.open_memmap(tmp / "positive.npy", mode="w+", dtype=np.float32,
                                                 shape=(split.num_captions,))
            images = EvalImages(split, teacher.image_transform(False))
            own = split.image_to_captions()
            memo = _TextMemo(teacher, split, device, text_memory_bytes)
            bar = tqdm(total=split.num_images, desc="teacher score cache", disable=not progress, unit="img")
            with torch.inference_mode():
                for start in range(0, split.num_images, batch_size):
                    rows = list(range(start, min(start + batch_size, split.num_images)))
                    pixels = teacher.collate_images([images[i] for i in rows])
                    image_features = query_folds(teacher, teacher.encode_images(to_device(pixels, device)),
                                                 torch.tensor(rows))  # out-of-fold teachers: the image's fold
                    pool_scores, own_captions, own_scores = _score_rows(
                        teacher, split, image_features, rows, pool, own, device, memo)
                    scores[start:start + len(rows)] = pool_scores
                    positive[own_captions] = own_scores
                    bar.update(len(rows))
            bar.close()
            scores.flush(), positive.flush()
            del scores, positive
            (tmp / "header.json").write_text(json.dumps(header, indent=1))
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.open(directory, expect=header)

    # ------------------------------------------------------------------ read
    def lookup(self, image_index: Tensor, caption_index: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        """``(candidates [B, 1 + k], teacher logits [B, 1 + k])``: the positive, then k pool draws.

        The k pool columns are drawn without replacement with the global torch RNG.
        """
        if k > self.pool_size:
            raise ValueError(f"num_negatives={k} exceeds the cache's pool_size={self.pool_size} ({self.directory})")
        rows = image_index.cpu().numpy()
        columns = torch.rand(len(rows), self.pool_size).argsort(dim=1)[:, :k].numpy()
        negatives = np.take_along_axis(self.pool[rows], columns, axis=1)
        negative_scores = np.take_along_axis(self.scores[rows], columns, axis=1)
        positives = caption_index.cpu().numpy()
        candidates = torch.from_numpy(np.concatenate([positives[:, None], negatives], axis=1))
        logits = torch.from_numpy(np.concatenate([self.positive[positives][:, None], negative_scores], axis=1).copy())
        return candidates.to(image_index.device), logits.to(image_index.device)


class _TextMemo:
    """Teacher text features per caption, encoded once and kept while they fit in ``budget_bytes``.

    Random pools put ~``pool_size`` distinct captions in every image batch, so encoding per batch would
    run the text tower ``pool_size`` times per caption (with the MiniLM text tower of the embedded
    METER that tripled the build time); past the budget (COCO-size splits) captions are re-encoded.
    """

    def __init__(self, teacher, split, device, budget_bytes: int = 1 << 30, chunk: int = 256):
        self.teacher, self.split, self.device, self.chunk = teacher, split, device, chunk
        self.budget, self.used = budget_bytes, 0
        self.rows: Dict[int, Dict[str, Tensor]] = {}

    def features(self, captions):
        """Text features of ``captions`` (indices), in that order."""
        todo = [c for c in captions if c not in self.rows]
        fresh: Dict[int, Dict[str, Tensor]] = {}
        for i in range(0, len(todo), self.chunk):
            part = todo[i:i + self.chunk]
            tokens = self.teacher.tokenize([self.split.captions[c] for c in part])
            encoded = self.teacher.encode_texts(to_device(tokens, self.device))
            for j, c in enumerate(part):
                fresh[c] = {k: v[j:j + 1] for k, v in encoded.items()}
        for c, row in fresh.items():
            size = sum(v.numel() * v.element_size() for v in row.values())
            if self.used + size > self.budget:
                break
            self.rows[c] = {k: v.clone() for k, v in row.items()}  # not a view pinning the whole chunk
            self.used += size
        return concat([self.rows[c] if c in self.rows else fresh[c] for c in captions])


def _score_rows(teacher, split, image_features, rows, pool, own, device, memo: _TextMemo):
    """Teacher logits of ``rows``' pool captions [rows, pool] and of their own captions."""
    captions = sorted({int(c) for r in rows for c in pool[r].tolist()} | {c for r in rows for c in own[r]})
    position = {c: i for i, c in enumerate(captions)}
    text_features = memo.features(captions)
    pool_rows = pool[rows]
    image_rows = torch.arange(len(rows))[:, None].expand_as(pool_rows).reshape(-1)
    text_rows = torch.tensor([position[int(c)] for c in pool_rows.reshape(-1).tolist()])
    pool_scores = teacher.score_index_pairs(image_features, text_features, image_rows.to(device), text_rows.to(device))
    own_captions = [c for r in rows for c in own[r]]
    own_rows = torch.tensor([i for i, r in enumerate(rows) for _ in own[r]])
    own_text_rows = torch.tensor([position[c] for c in own_captions])
    own_scores = teacher.score_index_pairs(image_features, text_features, own_rows.to(device), own_text_rows.to(device))
    return pool_scores.float().view(len(rows), -1).cpu().numpy(), own_captions, own_scores.float().cpu().tolist()
