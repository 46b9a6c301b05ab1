""":class:`Index`: build an index directory with a dual student, load it, search it (and re-rank).

    index = Index.build(student_dir("runs/meter-synthetic"), "photos/", "photos.idx")   # or a Corpus / split
    index = Index.load("photos.idx")                      # loads the student recorded in index.json
    hits = index.search("a red circle left of a blue square", k=10)
    hits.ids, hits.scores, hits.items                      # ids are rows of the index; items their metadata
    index.search(Path("query.jpg"), k=5)                   # image -> captions (or images, target="images")
    index.search(["a cat", "a dog"], k=10, rerank=teacher, rerank_k=50)

A text query searches the images when the index has them (else its captions); an image query (a
``pathlib.Path`` or a ``PIL.Image``) searches the captions when there are some (else the images).
Scores are cosine similarities of the student's embeddings, or the re-ranker's logits after
``rerank`` (then ``retrieval_scores`` keeps the cosines).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from teachers.base import Scorer

from ..data import DataError, load_image
from ..runtime import distributed_info
from . import ann, store
from .corpus import MODALITIES, as_corpora
from .encode import encode_chunks, encode_images, encode_texts, merge_chunks
from .identity import check_student, describe_student
from .rerank import rerank_scores

__all__ = ["Hits", "Index", "SearchError"]

Query = Union[str, Path, Image.Image]


class SearchError(DataError):
    """A query the index cannot answer (empty, of the wrong kind, a modality the index lacks)."""


@dataclass
class Hits:
    """One query's ranked results: ``ids`` (rows of the target modality), ``scores``, ``items``."""

    query: str
    target: str
    ids: List[int]
    scores: List[float]
    items: List[Dict[str, Any]]
    retrieval_scores: Optional[List[float]] = None  # the student's cosines, when ``scores`` are a re-ranker's
    reranked_by: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        hits = []
        for rank, (i, score, item) in enumerate(zip(self.ids, self.scores, self.items)):
            hit = {"rank": rank + 1, "id": i, "score": score}
            if self.retrieval_scores is not None:
                hit["retrieval_score"] = self.retrieval_scores[rank]
            hits.append({**hit, "item": item})
        return {"query": self.query, "target": self.target, "reranked_by": self.reranked_by, "hits": hits}


def _earlier_modalities(path: Path) -> Dict[str, Any]:
    """What an earlier build of ``path`` recorded per modality (nothing if there was none, or it is unreadable)."""
    try:
        return store.read_meta(path).get("modalities", {}) if (path / store.META_NAME).is_file() else {}
    except store.IndexFileError:
        return {}


def _as_student(student, device) -> tuple:
    """``(model, path or None)`` from a model or a save_pretrained directory."""
    if isinstance(student, (str, Path)):
        import students

        return students.load_student(student).to(device or "cpu"), Path(student)
    return (student.to(device) if device is not None else student), None


class _Part:
    """One modality of a loaded index: FAISS index, items and the memory-mapped vectors."""

    def __init__(self, directory: Path, spec: Dict[str, Any]):
        self.spec = spec
        self.items = store.read_items(directory)
        self.vectors = np.load(directory / store.VECTORS, mmap_mode="r")
        self.index = store.read_faiss(directory / store.FAISS_NAME)
        if not len(self.items) == len(self.vectors) == self.index.ntotal:
            raise store.IndexFileError(f"{directory}: {len(self.items)} items, {len(self.vectors)} vectors and "
                                       f"{self.index.ntotal} indexed vectors disagree; rebuild the index")
        ann.configure(self.index, spec)


class Index:
    """An index directory opened with the student that built it (see the module doc)."""

    def __init__(self, path: Path, meta: Dict[str, Any], student: Scorer):
        self.path = Path(path)
        self.meta = meta
        self.student = student
        self._parts: Dict[str, _Part] = {}

    # ----------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, student, corpus, path, ann_params: Optional[ann.AnnParams] = None, *, chunk_size: int = 1024,
              batch_size: int = 64, device: Optional[str] = None, num_workers: int = 0,
              progress: bool = True) -> "Index":
        """Encode ``corpus`` with ``student`` (a dual student or its save_pretrained directory) into ``path``.

        ``corpus``: a :class:`~dcd.index.corpus.Corpus` (or a list, one per modality), a ``CaptionSplit``
        (its images and captions), an image folder or a caption file. Resumable (chunks of
        ``chunk_size`` items); under torchrun every rank encodes its share and rank 0 merges and builds.
        """
        student, student_path = _as_student(student, device)
        corpora = as_corpora(corpus)
        ann_params = ann_params or ann.AnnParams()
        path = Path(path)
        rank, world, barrier = distributed_info()
        main = rank == 0
        if main:
            store.prepare_dir(path)
        barrier()
        identity = describe_student(student, student_path)
        old = _earlier_modalities(path)
        modalities: Dict[str, Any] = {}
        for corpus in corpora:
            directory = path / corpus.modality
            recipe = {"format": store.FORMAT, "student": identity["weights_sha256"], "corpus": corpus.fingerprint(),
                      "chunk_size": chunk_size}
            if main:  # the index path is the user's output: other vectors there give way to this recipe's
                store.claim_modality_dir(directory, recipe)
            barrier()
            reused = (directory / store.VECTORS).is_file()
            started = time.perf_counter()
            if not reused:
                encode_chunks(student, corpus, directory / store.CHUNKS, chunk_size, batch_size, device, rank, world,
                              num_workers, progress)
                barrier()
            if main:
                modalities[corpus.modality] = cls._finish(directory, corpus, reused, chunk_size, ann_params,
                                                          old.get(corpus.modality), progress)
                modalities[corpus.modality]["seconds"] = round(time.perf_counter() - started, 3)
        if main:
            store.clear_other_modalities(path, list(modalities))
            store.write_meta(path, {
                "format": store.FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "student": identity,
                "normalization": store.NORMALIZATION, "metric": store.METRIC, "modalities": modalities,
            })
        barrier()
        return cls.load(path, student, device)

    @staticmethod
    def _finish(directory: Path, corpus, reused: bool, chunk_size: int, ann_params: ann.AnnParams,
                old: Optional[Dict[str, Any]], progress: bool) -> Dict[str, Any]:
        """Rank 0: merge the chunks (unless reused), build the FAISS index (unless the same one exists)."""
        if not reused:
            encoded = merge_chunks(directory / store.CHUNKS, corpus, chunk_size)
            store.write_encoded(directory, corpus, encoded.vectors, encoded.rows, encoded.skipped)
        shutil.rmtree(directory / store.CHUNKS, ignore_errors=True)
        vectors = np.load(directory / store.VECTORS, mmap_mode="r")
        skipped = sum(1 for line in (directory / store.SKIPPED).read_text(encoding="utf-8").splitlines() if line)
        spec = ann_params.resolve(len(vectors), vectors.shape[1])
        faiss_path = directory / store.FAISS_NAME
        if not (reused and old and old.get("index") == spec and faiss_path.is_file()):
            store.write_faiss(faiss_path, ann.build(vectors, spec, progress))
        return {"count": int(len(vectors)), "skipped": skipped, "source": corpus.source, "dim": int(vectors.shape[1]),
                "index": spec}

    # ----------------------------------------------------------------------------------- load
    @classmethod
    def load(cls, path, student=None, device: Optional[str] = None) -> "Index":
        """Open ``path``; ``student`` (model or directory) defaults to the one recorded at build time.

        Raises :class:`~dcd.index.identity.StudentMismatch` when ``student`` is not the one that built it.
        """
        path = Path(path)
        meta = store.read_meta(path)
        if student is None:
            recorded = meta["student"].get("path")
            if not recorded:
                raise SearchError(f"{path} was built from an in-memory student: pass the student (--student DIR)")
            if not Path(recorded).is_dir():
                raise SearchError(f"the student that built {path} is no longer at {recorded}: pass --student DIR")
            student = recorded
        student, _ = _as_student(student, device)
        check_student(meta["student"], student, path)
        return cls(path, meta, student.eval())

    @property
    def modalities(self) -> List[str]:
        return [m for m in MODALITIES if m in self.meta["modalities"]]

    def _part(self, modality: str) -> _Part:
        if modality not in self._parts:
            self._parts[modality] = _Part(self.path / modality, self.meta["modalities"][modality]["index"])
        return self._parts[modality]

    def items(self, modality: str) -> List[Dict[str, Any]]:
        """The item list of ``modality`` (row id -> path / caption and the corpus's other fields)."""
        return self._part(modality).items

    # ----------------------------------------------------------------------------------- search
    def encode_queries(self, queries: Sequence[Query]) -> tuple:
        """``(modality, unit vectors [n, d], decoded queries)`` of a list of all-text or all-image queries."""
        kinds = {"images" if isinstance(q, (Path, Image.Image)) else "texts" for q in queries}
        if len(kinds) != 1:
            raise SearchError("mix of text and image queries: search them separately")
        modality = kinds.pop()
        if modality == "texts":
            for q in queries:
                if not isinstance(q, str) or not q.strip():
                    raise SearchError("empty query: give a caption, or an image with --image PATH")
            return modality, encode_texts(self.student, [q.strip() for q in queries]), [q.strip() for q in queries]
        images = [q if isinstance(q, Image.Image) else load_image(q) for q in queries]
        transform = self.student.image_transform(False)
        return modality, encode_images(self.student, [transform(im) for im in images]), images

    def search(self, queries: Union[Query, Sequence[Query]], k: int = 10, target: Optional[str] = None,
               rerank: Optional[Scorer] = None, rerank_k: int = 50, rerank_name: Optional[str] = None,
               ef_search: Optional[int] = None, nprobe: Optional[int] = None,
               refine: Optional[int] = None) -> Union[Hits, List[Hits]]:
        """The ``k`` best items of ``target`` for each query (one query -> one :class:`Hits`, a list -> a list).

        ``rerank``: a cross-encoder (teacher or fusion student) that re-scores the ``rerank_k`` best
        candidates; ``ef_search`` / ``nprobe`` / ``refine`` override the index's search knobs.
        """
        single = isinstance(queries, (str, Path, Image.Image))
        queries = [queries] if single else list(queries)
        if not queries:
            raise SearchError("no queries given")
        if k < 1 or (rerank is not None and rerank_k < 1):
            raise SearchError(f"-k and --rerank-k must be positive, got {k} and {rerank_k}")
        modality, vectors, decoded = self.encode_queries(queries)
        target = target or next((m for m in MODALITIES if m != modality and m in self.modalities), modality)
        if target not in self.modalities:
            raise SearchError(f"{self.path} has no {target} (it indexes {', '.join(self.modalities)})")
        if rerank is not None and target == modality:
            raise SearchError(f"a re-ranker scores image-caption pairs; {modality} -> {target} cannot be re-ranked")
        part = self._part(target)
        spec = ann.with_overrides(part.spec, ef_search=ef_search, nprobe=nprobe, refine=refine)
        ann.configure(part.index, spec)
        fetch = max(k, rerank_k) if rerank is not None else k
        scores, ids = ann.search(part.index, spec, vectors, fetch, part.vectors)
        results = []
        for query, raw, row_scores, row_ids in zip(queries, decoded, scores, ids):
            keep = row_ids >= 0
            row_ids, row_scores = row_ids[keep].tolist(), row_scores[keep].tolist()
            hits = Hits(str(query) if not isinstance(query, Image.Image) else "<image>", target, row_ids, row_scores,
                        [part.items[i] for i in row_ids])
            if rerank is not None:
                hits = self._rerank(hits, raw, modality, rerank, rerank_k, rerank_name)
            hits.ids, hits.scores, hits.items = hits.ids[:k], hits.scores[:k], hits.items[:k]
            if hits.retrieval_scores is not None:
                hits.retrieval_scores = hits.retrieval_scores[:k]
            results.append(hits)
        return results[0] if single else results

    @staticmethod
    def _rerank(hits: Hits, query, modality: str, reranker: Scorer, rerank_k: int, name: Optional[str]) -> Hits:
        """The first ``rerank_k`` hits in the re-ranker's order (by its logits), the rest after them as they were."""
        head = rerank_scores(reranker, query, modality, hits.items[:rerank_k])
        order = np.argsort(-head, kind="stable").tolist() + list(range(len(head), len(hits.ids)))
        second = head.tolist() + [None] * (len(hits.ids) - len(head))  # not re-ranked: no re-ranker score
        return Hits(hits.query, hits.target, [hits.ids[i] for i in order], [second[i] for i in order],
                    [hits.items[i] for i in order], [hits.scores[i] for i in order],
                    name or getattr(reranker, "family", type(reranker).__name__))

    def summary(self) -> str:
        lines = [f"index {self.path} (student {self.meta['student'].get('path') or 'in memory'}, "
                 f"weights {self.meta['student']['weights_sha256'][:12]})"]
        for modality, info in self.meta["modalities"].items():
            spec = ", ".join(f"{k} {v}" for k, v in info["index"].items() if k != "type")
            lines.append(f"  {modality}: {info['count']} indexed, {info['skipped']} skipped "
                         f"({modality}/{store.SKIPPED}); {info['index']['type']}{' (' + spec + ')' if spec else ''}; "
                         f"{info['seconds']:.1f} s; from {info['source']}")
        return "\n".join(lines)

