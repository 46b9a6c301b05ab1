"""The index directory on disk::

    INDEX/
      .dcd-index          marker: this folder is a dcd index (dcd never clears a folder without it)
      index.json          format, student identity, normalisation and metric, per modality: count,
                          skipped, source and the FAISS spec; written last, so its presence means complete
      images/ | texts/    one folder per indexed modality:
        recipe.json       what the vectors depend on (student weights, corpus, chunk size); other work is cleared
        chunks/           encoded chunks while encoding (removed once merged)
        vectors.npy       float32 [n, d] unit rows; row i is id i
        items.jsonl       row i: the item of id i ({"path": ...} or {"caption": ...} and its metadata)
        skipped.txt       items that could not be read: "<path>\\t<reason>" per line
        faiss.index       the FAISS index over vectors.npy

Every file is written atomically (:mod:`teachers.files`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np

from teachers.files import atomic_write, save_array, write_json, write_text

from ..data import DataError
from .corpus import MODALITIES, Corpus

__all__ = ["FORMAT", "IndexFileError", "prepare_dir", "read_items", "read_meta", "write_encoded", "write_meta"]

FORMAT = 1
META_NAME = "index.json"
MARKER = ".dcd-index"
VECTORS, ITEMS, SKIPPED, FAISS_NAME, CHUNKS = "vectors.npy", "items.jsonl", "skipped.txt", "faiss.index", "chunks"
#: how queries and corpus vectors are compared: unit rows, inner product (= cosine)
NORMALIZATION, METRIC = "l2", "inner_product"


class IndexFileError(DataError):
    """A missing, foreign or damaged index directory."""


#: what a modality folder's vectors were made by
RECIPE_FILE = "recipe.json"


def prepare_dir(path: Path) -> None:
    """Make ``path`` an index folder: new, empty, or one dcd made before (never someone else's files)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise IndexFileError(f"index path {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise IndexFileError(f"{path} holds files and is not a dcd index folder: give a new or empty folder")
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).touch()


def claim_modality_dir(directory: Path, recipe: Dict[str, Any]) -> bool:
    """Make a modality folder of an index hold only vectors made by ``recipe`` (format, student, corpus, chunk
    size); True when it already did (they are reused). An index path is the user's named output, written over
    like a file: vectors of another student or corpus there give way (the run stages that made them, students
    and teachers, are never touched)."""
    directory = Path(directory)
    recipe = json.loads(json.dumps(recipe))
    path = directory / RECIPE_FILE
    kept = path.is_file() and json.loads(path.read_text()) == recipe
    if not kept and directory.is_dir():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(path, recipe, indent=1, sort_keys=False, newline=False)
    return kept


def clear_other_modalities(path: Path, keep: List[str]) -> None:
    """An index describes one build: modality folders of an earlier build with other inputs go."""
    for modality in MODALITIES:
        if modality not in keep and (path / modality).is_dir():
            shutil.rmtree(path / modality)


def write_meta(path: Path, meta: Dict[str, Any]) -> None:
    write_json(Path(path) / META_NAME, meta, indent=1, sort_keys=False)


def read_meta(path: Path) -> Dict[str, Any]:
    path = Path(path)
    meta_path = path / META_NAME
    if not path.is_dir():
        raise IndexFileError(f"no index at {path}: build one with `dcd index {path} --student DIR --images FOLDER`")
    if not meta_path.is_file():
        raise IndexFileError(f"{path} is not a finished dcd index ({META_NAME} is missing): build it with dcd index")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IndexFileError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IndexFileError(f"{meta_path}: index format {meta.get('format') if isinstance(meta, dict) else '?'}, "
                             f"this dcd reads format {FORMAT}: rebuild the index")
    if meta.get("normalization") != NORMALIZATION or meta.get("metric") != METRIC:
        raise IndexFileError(f"{meta_path}: normalization {meta.get('normalization')!r} / metric {meta.get('metric')!r}; "
                             f"this dcd searches {NORMALIZATION!r} vectors by {METRIC!r}")
    return meta


def write_encoded(directory: Path, corpus: Corpus, vectors: np.ndarray, rows: np.ndarray,
                  skipped: List[Tuple[int, str]]) -> None:
    """vectors.npy, items.jsonl (the kept items, in vector order) and skipped.txt of one modality."""
    directory = Path(directory)
    items = "".join(json.dumps(corpus.items[int(r)], default=str) + "\n" for r in rows)
    lines = "".join(f"{corpus.values[i]}\t{' '.join(reason.split())}\n" for i, reason in skipped)
    write_text(directory / ITEMS, items)
    write_text(directory / SKIPPED, lines)
    save_array(directory / VECTORS, vectors)


def read_items(directory: Path) -> List[Dict[str, Any]]:
    path = Path(directory) / ITEMS
    if not path.is_file():
        raise IndexFileError(f"{path} is missing: the index is damaged, rebuild it")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_faiss(path: Path, index) -> None:
    import faiss

    atomic_write(Path(path), lambda tmp: faiss.write_index(index, tmp))


def read_faiss(path: Path):
    import faiss

    path = Path(path)
    if not path.is_file():
        raise IndexFileError(f"{path} is missing: the index is damaged, rebuild it")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise IndexFileError(f"{path} could not be read as a FAISS index: {str(exc).splitlines()[0]}") from exc
