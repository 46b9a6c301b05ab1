"""What ``dcd index`` encodes: a :class:`Corpus` is one modality's ordered list of items.

Sources:

* an image folder, searched recursively for ``.jpg`` / ``.jpeg`` / ``.png`` / ``.webp`` files (sorted by
  relative path, so the order and the ids are reproducible): items ``{"path": ...}``;
* a caption file: ``.jsonl`` (one JSON object per line with a ``"caption"`` or ``"text"`` field, whose
  other fields are kept as metadata, or one JSON string per line) or plain text (one caption per
  non-blank line): items ``{"caption": ...}``;
* a Karpathy / COCO split (:func:`dcd.data.load_split`): its images ``{"path", "image_id"}`` and its captions
  ``{"caption", "caption_id", "image"}`` (``image``: the path of the image the caption describes).

Item ``i`` of the corpus gets id ``i`` unless it is skipped (an unreadable image); ids in the index
are the rows of the kept items (see :mod:`dcd.index.encode`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from ..data import CaptionSplit, DataError, load_split

__all__ = ["Corpus", "IMAGE_SUFFIXES", "MODALITIES", "as_corpora", "caption_file", "image_folder", "split_corpora"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MODALITIES = ("images", "texts")


@dataclass
class Corpus:
    """``modality`` ("images" | "texts"), its ``items`` in order, and a description of the ``source``."""

    modality: str
    items: List[Dict[str, Any]]
    source: str

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"corpus modality must be one of {MODALITIES}, got {self.modality!r}")
        if not self.items:
            raise DataError(f"{self.source}: no {self.modality} to index")
        key = "path" if self.modality == "images" else "caption"
        bad = next((i for i, item in enumerate(self.items) if not isinstance(item.get(key), str)), None)
        if bad is not None:
            raise DataError(f"{self.source}: item {bad} has no string {key!r} field")

    def __len__(self) -> int:
        return len(self.items)

    @cached_property
    def values(self) -> List[str]:
        """Image paths or captions, in item order."""
        key = "path" if self.modality == "images" else "caption"
        return [item[key] for item in self.items]

    def fingerprint(self) -> str:
        """sha256 of the items: chunks encoded from another corpus are never resumed into this one."""
        text = json.dumps(self.items, sort_keys=True, default=str)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def image_folder(root: Union[str, Path]) -> Corpus:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--images {root}: not a folder")
    paths = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise DataError(f"--images {root}: no {'/'.join(IMAGE_SUFFIXES)} files in it (searched recursively)")
    return Corpus("images", [{"path": str(p.resolve())} for p in paths], f"image folder {root}")


def caption_file(path: Union[str, Path]) -> Corpus:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--captions {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"--captions {path} is not UTF-8 text: {exc}") from exc
    items = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        items.append(_jsonl_item(line, path, number) if jsonl else {"caption": line.strip()})
    return Corpus("texts", items, f"caption file {path}")


def _jsonl_item(line: str, path: Path, number: int) -> Dict[str, Any]:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {number}: malformed JSON ({exc.msg})") from exc
    if isinstance(entry, str):
        entry = {"caption": entry}
    if not isinstance(entry, dict):
        raise DataError(f"{path}, line {number}: expected an object with a 'caption' field or a string")
    caption = entry.pop("caption", None)
    caption = entry.pop("text", None) if caption is None else caption
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{path}, line {number}: no non-empty 'caption' (or 'text') field")
    return {"caption": caption.strip(), **entry}


def split_corpora(split: CaptionSplit, modalities: Sequence[str] = MODALITIES) -> List[Corpus]:
    """The images and / or the captions of a caption split."""
    out = []
    where = f"split {split.name!r}" + (f" of {split.source}" if split.source else "")
    if "images" in modalities:
        out.append(Corpus("images", [{"path": str(p), "image_id": i} for p, i in zip(split.image_paths, split.image_ids)],
                          where))
    if "texts" in modalities:
        out.append(Corpus("texts", [{"caption": c, "caption_id": i, "image": str(split.image_paths[j])}
                                    for c, i, j in zip(split.captions, split.caption_ids, split.caption_image)], where))
    return out


def load_corpora(images: Optional[str] = None, captions: Optional[str] = None, data: Optional[str] = None,
                 data_root: Optional[str] = None, split: str = "test", modality: str = "both") -> List[Corpus]:
    """The corpora the ``dcd index`` options name (an image folder and / or a caption file, or a split)."""
    if data is not None and (images or captions):
        raise DataError("give either --data (a split: its images and captions) or --images / --captions, not both")
    if data is not None:
        modalities = MODALITIES if modality == "both" else (modality,)
        return split_corpora(load_split(data, data_root, split=split), modalities)
    corpora = ([image_folder(images)] if images else []) + ([caption_file(captions)] if captions else [])
    if not corpora:
        raise DataError("nothing to index: give --images FOLDER, --captions FILE or --data NAME")
    return corpora


def as_corpora(corpus: Any) -> List[Corpus]:
    """What ``Index.build`` accepts: a Corpus or a list of them, a CaptionSplit (both modalities), an image
    folder, or a caption file."""
    if isinstance(corpus, Corpus):
        return [corpus]
    if isinstance(corpus, CaptionSplit):
        return split_corpora(corpus)
    if isinstance(corpus, (str, Path)):
        return [image_folder(corpus) if Path(corpus).expanduser().is_dir() else caption_file(corpus)]
    if isinstance(corpus, (list, tuple)) and corpus and all(isinstance(c, Corpus) for c in corpus):
        modalities = [c.modality for c in corpus]
        if len(set(modalities)) != len(modalities):
            raise ValueError(f"one corpus per modality, got {modalities}")
        return list(corpus)
    raise TypeError(f"cannot index a {type(corpus).__name__}: pass a Corpus, a CaptionSplit, an image folder or "
                    "a caption file")
