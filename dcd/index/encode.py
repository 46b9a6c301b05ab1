"""Encode a corpus with a dual student in chunks that survive a kill, sharded across torchrun ranks.

The corpus is cut into chunks of ``chunk_size`` items; chunk ``c`` covers items ``[c * chunk_size,
(c + 1) * chunk_size)`` and is written, once encoded, as ``chunk-<c>.npz`` (atomically: a killed run
leaves whole chunks only). A rerun encodes only the chunks that are missing. With ``world_size``
ranks, rank ``r`` encodes chunks ``r, r + world_size, ...``; :func:`merge_chunks` (rank 0, after every
rank is done) concatenates them in corpus order. Chunk boundaries do not depend on the number of
ranks, so a run may resume with another rank count and gives the same vectors.

An image that cannot be read or decoded is skipped with its reason; every other item is kept.
Embeddings are the student's ``"embedding"`` feature, L2-normalised (again) in float32 here, for the
corpus and for queries alike (:func:`encode_texts`, :func:`encode_images`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from teachers.base import Features, Scorer
from teachers.files import save_array

from .. import retrieval
from ..data import DataError, load_image
from .corpus import Corpus

__all__ = ["Encoded", "chunk_path", "encode_chunks", "encode_images", "encode_texts", "merge_chunks", "num_chunks"]


# ------------------------------------------------------------------------------------ one batch of embeddings
def _embeddings(features: List[Features], student: Scorer) -> np.ndarray:
    if "embedding" not in features[0]:
        raise DataError(f"a {getattr(student, 'family', type(student).__name__)!r} model has no per-item 'embedding' "
                        "to index: dcd index needs a dual student")
    rows = torch.cat([f["embedding"] for f in features]).float()
    return F.normalize(rows, dim=-1).cpu().numpy()


def encode_texts(student: Scorer, captions: Sequence[str], batch_size: int = 256,
                 device: Optional[torch.device | str] = None) -> np.ndarray:
    """float32 ``[len(captions), dim]`` unit rows."""
    return _embeddings(retrieval.encode_texts(student, list(captions), batch_size, device), student)


def encode_images(student: Scorer, images: Sequence[Tensor], batch_size: int = 64,
                  device: Optional[torch.device | str] = None) -> np.ndarray:
    """Transformed image tensors (``student.image_transform(False)``) -> float32 ``[len(images), dim]`` unit rows."""
    batches = (student.collate_images(list(images[s:s + batch_size])) for s in range(0, len(images), batch_size))
    return _embeddings(retrieval.encode_images(student, batches, batch_size, device), student)


class _ImageFiles(Dataset):
    """``(tensor, None)`` for a readable image, ``(None, reason)`` for one that is not."""

    def __init__(self, paths: Sequence[str], transform):
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[Optional[Tensor], Optional[str]]:
        try:
            return self.transform(load_image(self.paths[i])), None
        except DataError as exc:
            return None, str(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # decoded, but the transform refused it
            return None, f"cannot transform image {self.paths[i]}: {type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------ chunks
def num_chunks(num_items: int, chunk_size: int) -> int:
    return -(-num_items // chunk_size)


def chunk_path(chunk_dir: Path, chunk: int) -> Path:
    return Path(chunk_dir) / f"chunk-{chunk:06d}.npz"


def _encode_chunk(student: Scorer, corpus: Corpus, start: int, stop: int, batch_size: int, device,
                  num_workers: int) -> dict:
    values = corpus.values[start:stop]
    if corpus.modality == "texts":
        return {"vectors": encode_texts(student, values, batch_size, device), "rows": np.arange(start, stop),
                "skipped": np.zeros(0, dtype=np.int64), "reasons": np.zeros(0, dtype=str)}
    loader = DataLoader(_ImageFiles(values, student.image_transform(False)), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=list)
    tensors, rows, skipped, reasons = [], [], [], []
    position = start
    for batch in loader:
        for tensor, reason in batch:
            if tensor is None:
                skipped.append(position)
                reasons.append(reason)
            else:
                tensors.append(tensor)
                rows.append(position)
            position += 1
    vectors = encode_images(student, tensors, batch_size, device) if tensors else np.zeros((0, 0), np.float32)
    return {"vectors": vectors, "rows": np.asarray(rows, dtype=np.int64),
            "skipped": np.asarray(skipped, dtype=np.int64), "reasons": np.asarray(reasons, dtype=str)}


def encode_chunks(student: Scorer, corpus: Corpus, chunk_dir: Path, chunk_size: int = 1024, batch_size: int = 64,
                  device: Optional[torch.device | str] = None, rank: int = 0, world_size: int = 1,
                  num_workers: int = 0, progress: bool = True) -> int:
    """Encode this rank's missing chunks of ``corpus`` into ``chunk_dir``; returns how many were encoded now."""
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk size and batch size must be >= 1, got {chunk_size} and {batch_size}")
    n = len(corpus)
    mine = list(range(rank, num_chunks(n, chunk_size), world_size))
    sizes = {c: min(chunk_size, n - c * chunk_size) for c in mine}
    todo = [c for c in mine if not chunk_path(chunk_dir, c).is_file()]
    label = f"encode {corpus.modality}" + (f" (rank {rank}/{world_size})" if world_size > 1 else "")
    bar = tqdm(total=sum(sizes.values()), initial=sum(sizes.values()) - sum(sizes[c] for c in todo), desc=label,
               unit="item", disable=not progress, dynamic_ncols=True, position=rank if world_size > 1 else None)
    was_training = student.training
    student.eval()
    try:
        for c in todo:
            start = c * chunk_size
            arrays = _encode_chunk(student, corpus, start, start + sizes[c], batch_size, device, num_workers)
            save_array(chunk_path(chunk_dir, c), arrays)
            bar.update(sizes[c])
    finally:
        student.train(was_training)
        bar.close()
    return len(todo)


@dataclass
class Encoded:
    """Merged chunks: ``vectors[i]`` is corpus item ``rows[i]``; ``skipped`` holds ``(item, reason)``."""

    vectors: np.ndarray
    rows: np.ndarray
    skipped: List[Tuple[int, str]]


def merge_chunks(chunk_dir: Path, corpus: Corpus, chunk_size: int) -> Encoded:
    """Concatenate every chunk in corpus order (all ranks must be done)."""
    vectors, rows, skipped = [], [], []
    total = num_chunks(len(corpus), chunk_size)
    for c in range(total):
        path = chunk_path(chunk_dir, c)
        if not path.is_file():
            raise DataError(f"{path} is missing: chunk {c} of {total} was not encoded (did a rank stop early?)")
        with np.load(path, allow_pickle=False) as data:
            if len(data["rows"]):
                vectors.append(data["vectors"])
                rows.append(data["rows"])
            skipped += [(int(i), str(r)) for i, r in zip(data["skipped"], data["reasons"])]
    if not vectors:
        raise DataError(f"none of the {len(corpus)} {corpus.modality} of {corpus.source} could be read; "
                        f"first failure: {skipped[0][1] if skipped else '?'}")
    return Encoded(np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32), np.concatenate(rows), skipped)
