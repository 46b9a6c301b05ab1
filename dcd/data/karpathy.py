"""``CaptionSplit`` (the one in-memory form of a split) and the Karpathy split JSON loader.

Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json`` (and dcd's ``dataset_synthetic.json``)::

    {"dataset": "coco", "images": [{"filepath": "val2014",            # absent for Flickr30K
                                     "filename": "COCO_val2014_000000391895.jpg",
                                     "split": "test", "imgid": 0, "cocoid": 391895,  # cocoid: COCO only
                                     "sentences": [{"raw": "A man ... ", "sentid": 770337, ...}, ...]}, ...]}

Image path = ``image_root / filepath / filename``. Split names are ``train``, ``val``, ``test`` and
``restval``; ``split="train"`` means **train + restval** (the usual retrieval training set: 113,287
COCO images; Flickr30K has no restval). Pass a list (``["train"]``) to select splits literally.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .errors import DataError

__all__ = ["CaptionSplit", "load_karpathy", "KARPATHY_SPLITS", "read_json", "json_field"]

log = logging.getLogger("dcd.data")

KARPATHY_SPLITS = ("train", "val", "test", "restval")
#: what a split name selects; anything else is taken literally
SPLIT_ALIASES = {"train": ("train", "restval"), "all": KARPATHY_SPLITS}

PathLike = Union[str, Path]


@dataclass(repr=False)
class CaptionSplit:
    """Images and captions of one split, captions flattened in image order.

    ``caption_image[j]`` is the index (into ``image_paths``) of the image caption ``j`` describes.
    Images may have any number of captions (COCO has some with 6 or 7); an image with none is a
    distractor only (``recall_at_k`` leaves it out of the image-to-text queries).
    """

    image_paths: List[Path]
    image_ids: List[Any]
    captions: List[str]
    caption_image: List[int]
    caption_ids: List[Any]
    name: str = "split"
    source: Optional[Path] = None
    meta: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.image_paths) != len(self.image_ids):
            raise DataError(f"{self._where()}: {len(self.image_paths)} image paths but {len(self.image_ids)} image ids")
        if not (len(self.captions) == len(self.caption_image) == len(self.caption_ids)):
            raise DataError(f"{self._where()}: captions, caption_image and caption_ids differ in length")
        n = len(self.image_paths)
        bad = next((j for j, i in enumerate(self.caption_image) if not 0 <= i < n), None)
        if bad is not None:
            raise DataError(f"{self._where()}: caption {bad} points to image {self.caption_image[bad]} of {n}")

    def _where(self) -> str:
        return f"split {self.name!r}" + (f" of {self.source}" if self.source else "")

    # ------------------------------------------------------------------ sizes and ground truth
    @property
    def num_images(self) -> int:
        return len(self.image_paths)

    @property
    def num_captions(self) -> int:
        return len(self.captions)

    def __len__(self) -> int:
        return self.num_captions

    def image_to_captions(self) -> List[List[int]]:
        """For each image, the indices of its captions (any number, possibly none)."""
        out: List[List[int]] = [[] for _ in range(self.num_images)]
        for j, i in enumerate(self.caption_image):
            out[i].append(j)
        return out

    def caption_image_tensor(self) -> torch.Tensor:
        """``LongTensor [num_captions]``: the ground truth ``recall_at_k`` takes."""
        return torch.as_tensor(self.caption_image, dtype=torch.long)

    def captions_per_image(self) -> Dict[int, int]:
        """Histogram ``{captions per image: number of images}``."""
        hist: Dict[int, int] = {}
        for caps in self.image_to_captions():
            hist[len(caps)] = hist.get(len(caps), 0) + 1
        return dict(sorted(hist.items()))

    # ------------------------------------------------------------------ subsets and checks
    def select_images(self, indices: Iterable[int], name: Optional[str] = None) -> "CaptionSplit":
        """A new split with the images ``indices`` (in that order) and their captions."""
        indices = list(indices)
        per_image = self.image_to_captions()
        captions, caption_image, caption_ids = [], [], []
        for new, old in enumerate(indices):
            for j in per_image[old]:
                captions.append(self.captions[j])
                caption_image.append(new)
                caption_ids.append(self.caption_ids[j])
        return CaptionSplit(
            image_paths=[self.image_paths[i] for i in indices], image_ids=[self.image_ids[i] for i in indices],
            captions=captions, caption_image=caption_image, caption_ids=caption_ids,
            name=name or self.name, source=self.source, meta=dict(self.meta),
        )

    def head(self, num_images: int) -> "CaptionSplit":
        """The first ``num_images`` images and their captions (quick evaluations)."""
        return self.select_images(range(min(num_images, self.num_images)))

    def missing_files(self, limit: Optional[int] = None) -> List[Path]:
        """Image paths that do not exist (the first ``limit`` of them)."""
        missing = []
        for p in self.image_paths:
            if not p.is_file():
                missing.append(p)
                if limit is not None and len(missing) >= limit:
                    break
        return missing

    def check_files(self, show: int = 5) -> None:
        """Raise :class:`DataError` naming the first missing image files, if any."""
        missing = [p for p in self.image_paths if not p.is_file()]
        if missing:
            listed = ", ".join(str(p) for p in missing[:show])
            more = f" (and {len(missing) - show} more)" if len(missing) > show else ""
            raise DataError(
                f"{self._where()}: {len(missing)} of {self.num_images} image files are missing: {listed}{more}"
            )

    def __repr__(self) -> str:
        return (f"CaptionSplit(name={self.name!r}, num_images={self.num_images}, num_captions={self.num_captions}, "
                f"source={str(self.source) if self.source else None!r})")

    def summary(self) -> str:
        return (f"{self.name}: {self.num_images} images, {self.num_captions} captions "
                f"(captions per image {self.captions_per_image()})" + (f" from {self.source}" if self.source else ""))


# ---------------------------------------------------------------------------------------------- JSON
def read_json(path: PathLike) -> Any:
    """``json.load`` with errors that name the file (and line / column for a syntax error)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    if not path.is_file():
        raise DataError(f"annotation path is not a file: {path}")
    try:
        with open(path, "rb") as handle:
            return json.loads(handle.read().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON in {path}, line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def json_field(entry: Any, key: str, where: str, kind: Union[type, Tuple[type, ...]] = object) -> Any:
    """``entry[key]`` of a parsed JSON object, checked to be a ``kind``; else a DataError naming ``where``."""
    if not isinstance(entry, dict):
        raise DataError(f"{where} is a {type(entry).__name__}, expected a JSON object")
    if key not in entry:
        raise DataError(f"{where} has no field {key!r}")
    value = entry[key]
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(f"{where}: field {key!r} should be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _as_tuple(kind) -> Tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def resolve_splits(split: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"train"`` -> ``("train", "restval")``, ``"all"`` -> every split, a list -> itself."""
    if isinstance(split, str):
        return SPLIT_ALIASES.get(split, (split,))
    return tuple(split)


def _split_label(split: Union[str, Sequence[str]]) -> str:
    return split if isinstance(split, str) else "+".join(split)


# ---------------------------------------------------------------------------------------------- loader
def load_karpathy(
    json_path: PathLike,
    image_root: Optional[PathLike] = None,
    split: Union[str, Sequence[str]] = "test",
    check_files: bool = False,
    name: Optional[str] = None,
) -> CaptionSplit:
    """Read one split of a Karpathy split JSON.

    Args:
        json_path: ``dataset_coco.json``, ``dataset_flickr30k.json``, ``dataset_synthetic.json``, ...
        image_root: folder the ``filepath/filename`` of each entry is relative to (default: the
            JSON's folder). For COCO, the folder holding ``train2014/`` and ``val2014/``; for
            Flickr30K, ``flickr30k-images/`` itself.
        split: ``"train"`` (= train + restval), ``"val"``, ``"test"``, ``"restval"``, ``"all"``, or
            a list of split names taken literally.
        check_files: verify every image file exists now (raises naming the first missing ones).
        name: the split's name (default: ``"<dataset>-<split>"``).

    Ids: ``image_ids`` are ``cocoid`` if present, else ``imgid``, else the file name;
    ``caption_ids`` are ``sentid`` if present, else ``(image_id, position)``. Captions are the
    ``raw`` sentences with surrounding whitespace stripped.
    """
    path = Path(json_path)
    return karpathy_from_data(read_json(path), path, image_root, split, check_files, name)


def karpathy_from_data(data: Any, path: Path, image_root: Optional[PathLike], split, check_files: bool = False,
                       name: Optional[str] = None) -> CaptionSplit:
    image_root = Path(image_root) if image_root is not None else path.parent
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object with an 'images' list, got {type(data).__name__}")
    images = json_field(data, "images", f"{path} (top level)", list)
    dataset = data.get("dataset", path.stem)
    wanted = resolve_splits(split)
    unknown = [s for s in wanted if s not in KARPATHY_SPLITS]

    splits_of = carve_val([json_field(entry, "split", f"{path}: images[{i}]", str) for i, entry in enumerate(images)],
                          path, "val" in wanted)
    present: Dict[str, int] = {}
    for s in splits_of:
        present[s] = present.get(s, 0) + 1
    if unknown:
        raise DataError(
            f"{path}: unknown split {_split_label(split)!r}; valid splits are {', '.join(KARPATHY_SPLITS)} "
            f"(and 'all'; 'train' means train+restval); this file has {_format_counts(present)}"
        )
    selected = [i for i, s in enumerate(splits_of) if s in wanted]
    if not selected:
        raise DataError(
            f"{path}: split {_split_label(split)!r} is empty (no images with split in {list(wanted)}); "
            f"this file has {_format_counts(present)}"
        )

    image_paths: List[Path] = []
    image_ids: List[Any] = []
    captions: List[str] = []
    caption_image: List[int] = []
    caption_ids: List[Any] = []
    no_captions = 0
    for i in selected:
        entry = images[i]
        where = f"{path}: images[{i}]"
        filename = json_field(entry, "filename", where, str)
        filepath = entry.get("filepath", "")
        if not isinstance(filepath, str):
            raise DataError(f"{where}: field 'filepath' should be str, got {type(filepath).__name__}")
        sentences = json_field(entry, "sentences", f"{where} ({filename})", list)
        image_id = entry.get("cocoid", entry.get("imgid", filename))
        index = len(image_paths)
        image_paths.append(image_root / filepath / filename if filepath else image_root / filename)
        image_ids.append(image_id)
        if not sentences:
            no_captions += 1
        for j, sentence in enumerate(sentences):
            swhere = f"{where} ({filename}) sentences[{j}]"
            raw = json_field(sentence, "raw", swhere, str).strip()
            if not raw:
                raise DataError(f"{swhere}: field 'raw' is empty")
            captions.append(raw)
            caption_image.append(index)
            caption_ids.append(sentence.get("sentid", (image_id, j)))
    if no_captions:
        log.warning("%s: %d images of split %r have no captions (kept as distractors)", path, no_captions,
                    _split_label(split))
    result = CaptionSplit(
        image_paths=image_paths, image_ids=image_ids, captions=captions, caption_image=caption_image,
        caption_ids=caption_ids, name=name or f"{dataset}-{_split_label(split)}", source=path,
        meta={"format": "karpathy", "dataset": dataset, "splits": list(wanted), "image_root": str(image_root)},
    )
    if check_files:
        result.check_files()
    return result


#: the share of training images held out as val in a file that has train and test but no val split
VAL_SHARE = 0.1


def carve_val(splits_of: List[str], path: Path, say: bool = False) -> List[str]:
    """Image split labels with a val split carved from train when the file has train but no val (a user's own
    data: choices need a split of their own): every ``1 / VAL_SHARE``-th training image, in file order, so the
    same file always gives the same split and val spreads over the whole set. Unchanged otherwise."""
    if "val" in splits_of or "train" not in splits_of:
        return splits_of
    train = [i for i, s in enumerate(splits_of) if s == "train"]
    every = max(2, round(1 / VAL_SHARE))
    held = set(train[every - 1::every]) or {train[-1]}
    if len(held) == len(train):
        raise DataError(f"{path}: {len(train)} training image(s) is too few to hold out a val split; add images "
                        "or give some a \"split\": \"val\"")
    if say:
        log.info("%s has no val split: %d of its %d training images (every %dth) are held out as val", path,
                 len(held), len(train), every)
    return ["val" if i in held else s for i, s in enumerate(splits_of)]


def hold_out(split: "CaptionSplit", every: int = 10) -> Dict[str, "CaptionSplit"]:
    """``{"train", "val", "eval"}`` from a file that is one split only (a COCO caption annotation file): every
    ``every``-th image is held out for evaluation, every ``every``-th from the middle for val, the rest trains;
    the same file always gives the same three. Said in the log."""
    n = split.num_images
    if n < 3:
        raise DataError(f"{split.source}: {n} image(s) cannot be split into train, val and test; give more")
    test = [i for i in range(n) if i % every == 0]
    val = [i for i in range(n) if i % every == every // 2] or [n - 1]
    train = [i for i in range(n) if i not in set(test) | set(val)]
    log.info("%s is one split: %d images train, %d val (every %dth from the %dth), %d test (every %dth)",
             split.source, len(train), len(val), every, every // 2, len(test), every)
    return {"train": split.select_images(train, f"{split.name}-train"),
            "val": split.select_images(val, f"{split.name}-val"),
            "eval": split.select_images(test, f"{split.name}-test")}


def _format_counts(counts: Dict[str, int]) -> str:
    if not counts:
        return "no images"
    return ", ".join(f"{k}: {v} images" for k, v in sorted(counts.items()))
