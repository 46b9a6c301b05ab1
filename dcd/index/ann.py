"""The FAISS index over a corpus's unit vectors (inner product = cosine): which kind, built how, searched how.

* ``flat`` -- ``IndexFlatIP``: exact; the automatic choice up to ``flat_max`` vectors.
* ``hnsw`` -- ``IndexHNSWFlat`` (graph of ``m`` links per node, built with ``ef_construction``,
  searched with ``ef_search``): the automatic choice up to ``hnsw_max`` vectors. Holds the vectors
  plus the graph in memory.
* ``ivfpq`` -- ``IVF<nlist>,PQ<pq_bytes>``: ``nlist`` k-means cells of which ``nprobe`` are visited,
  vectors compressed to ``pq_bytes`` bytes; the choice above ``hnsw_max``. The best ``refine * k``
  candidates are re-scored exactly against the stored full vectors (memory-mapped from disk), which
  gives back the recall the compression costs.

A resolved *spec* is a plain dict (``{"type": "hnsw", "m": 32, ...}``) recorded in ``index.json``;
the search-time knobs (``ef_search``, ``nprobe``, ``refine``) may be overridden per query.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
from tqdm.auto import tqdm

__all__ = ["AnnParams", "INDEX_TYPES", "build", "configure", "search", "with_overrides"]

log = logging.getLogger("dcd.index")

INDEX_TYPES = ("auto", "flat", "hnsw", "ivfpq")
SEARCH_KNOBS = {"hnsw": ("ef_search",), "ivfpq": ("nprobe", "refine"), "flat": ()}
ADD_BLOCK = 50_000  # vectors added per call (a progress bar tick)


@dataclass
class AnnParams:
    """How to index: ``index_type`` (auto | flat | hnsw | ivfpq) and each kind's knobs (None: a default from n, d)."""

    index_type: str = "auto"
    flat_max: int = 100_000
    hnsw_max: int = 10_000_000
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: Optional[int] = None  # default sqrt(n), at most n / 39 (FAISS's k-means wants 39 points a cell)
    nprobe: int = 128
    pq_bytes: Optional[int] = None  # default: the largest divisor of d at most d / 8 (4-d sub-vectors train slowly)
    refine: int = 50

    def resolve(self, n: int, dim: int) -> Dict[str, Any]:
        """The concrete spec for ``n`` vectors of dimension ``dim``; bad values raise naming the option."""
        kind = self.index_type
        if kind not in INDEX_TYPES:
            raise ValueError(f"--index-type {kind!r}: choose one of {', '.join(INDEX_TYPES)}")
        _positive(flat_max=self.flat_max, hnsw_max=self.hnsw_max, hnsw_m=self.hnsw_m,
                  ef_construction=self.ef_construction, ef_search=self.ef_search, nprobe=self.nprobe,
                  refine=self.refine)
        if kind == "auto":
            kind = "flat" if n <= self.flat_max else "hnsw" if n <= self.hnsw_max else "ivfpq"
        if kind == "flat":
            return {"type": "flat"}
        if kind == "hnsw":
            return {"type": "hnsw", "m": self.hnsw_m, "ef_construction": self.ef_construction,
                    "ef_search": self.ef_search}
        if n < 256:
            raise ValueError(f"--index-type ivfpq needs at least 256 vectors to train its codebooks, this corpus has "
                             f"{n}; use --index-type flat")
        nlist = self.nlist or max(1, min(int(round(math.sqrt(n))), n // 39))
        pq_bytes = self.pq_bytes or max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        _positive(nlist=nlist, pq_bytes=pq_bytes)
        if nlist > n:
            raise ValueError(f"--nlist {nlist} exceeds the {n} vectors to cluster")
        if dim % pq_bytes:
            raise ValueError(f"--pq-bytes {pq_bytes} must divide the embedding dimension {dim}")
        return {"type": "ivfpq", "nlist": nlist, "nprobe": min(self.nprobe, nlist), "pq_bytes": pq_bytes,
                "refine": self.refine}

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _positive(**values) -> None:
    for name, value in values.items():
        if value is None or int(value) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def with_overrides(spec: Dict[str, Any], **knobs) -> Dict[str, Any]:
    """``spec`` with the search-time knobs given (not None); knobs of another index kind are ignored."""
    out = dict(spec)
    for name, value in knobs.items():
        if value is None:
            continue
        if name not in SEARCH_KNOBS[spec["type"]]:
            log.warning("--%s does not apply to a %s index; ignored", name.replace("_", "-"), spec["type"])
            continue
        _positive(**{name: value})
        out[name] = int(value)
    return out


def build(vectors: np.ndarray, spec: Dict[str, Any], progress: bool = True, seed: int = 0):
    """A FAISS index of ``spec`` over the rows of ``vectors`` (float32 [n, d]), configured for search."""
    import faiss

    n, dim = vectors.shape
    kind = spec["type"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec["ef_construction"]
    elif kind == "ivfpq":
        index = faiss.index_factory(dim, f"IVF{spec['nlist']},PQ{spec['pq_bytes']}", faiss.METRIC_INNER_PRODUCT)
        index.do_polysemous_training = False  # codes for Hamming pre-filtering, which search never uses (~12 s)
        sample = min(n, max(64 * spec["nlist"], 65_536))
        rows = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)) if sample < n else slice(None)
        index.train(np.ascontiguousarray(vectors[rows]))
    else:
        raise ValueError(f"unknown index type {kind!r} (index.json written by a newer dcd?)")
    with tqdm(total=n, desc=f"build {kind}", unit="vec", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, n, ADD_BLOCK):
            block = np.ascontiguousarray(vectors[start:start + ADD_BLOCK], dtype=np.float32)
            index.add(block)
            bar.update(len(block))
    configure(index, spec)
    return index


def configure(index, spec: Dict[str, Any]) -> None:
    """Set the search-time knobs of ``spec`` on ``index``."""
    import faiss

    if spec["type"] == "hnsw":
        index.hnsw.efSearch = spec["ef_search"]
    elif spec["type"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = spec["nprobe"]


def search(index, spec: Dict[str, Any], queries: np.ndarray, k: int,
           vectors: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)``, each ``[n_queries, min(k, ntotal)]``, best first; id -1 where fewer were found.

    An IVF-PQ index with ``refine > 1`` and the stored ``vectors`` re-scores its best ``refine * k``
    candidates exactly.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(k), index.ntotal)
    refine = spec.get("refine", 1) if vectors is not None else 1
    if spec["type"] != "ivfpq" or refine <= 1:
        return index.search(queries, k)
    _, candidates = index.search(queries, min(k * refine, index.ntotal))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for q, row in enumerate(candidates):
        row = np.sort(row[row >= 0])  # sorted ids: a memory-mapped read goes forward through the file
        exact = np.asarray(vectors[row], dtype=np.float32) @ queries[q]
        best = np.argsort(-exact, kind="stable")[:k]
        scores[q, :len(best)], ids[q, :len(best)] = exact[best], row[best]
    return scores, ids
