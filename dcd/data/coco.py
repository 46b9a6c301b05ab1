"""COCO caption annotation files (``captions_train2017.json``, ``captions_val2014.json``, ...).

Format: ``{"images": [{"id", "file_name", ...}], "annotations": [{"id", "image_id", "caption"}], "info",
"licenses"}``. Read through pycocotools' ``COCO`` index (its progress prints are silenced); images are
ordered by COCO image id (as torchvision's ``CocoCaptions``), captions of an image in annotation order.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Optional, Union

from .errors import DataError
from .karpathy import CaptionSplit, json_field, read_json

__all__ = ["load_coco_captions", "is_coco_annotation"]

PathLike = Union[str, Path]


def is_coco_annotation(data: Any) -> bool:
    """A COCO-format annotation object (has ``annotations`` and ``images``)."""
    return isinstance(data, dict) and "annotations" in data and "images" in data


def load_coco_captions(
    annotation_file: PathLike,
    image_root: Optional[PathLike] = None,
    check_files: bool = False,
    name: Optional[str] = None,
) -> CaptionSplit:
    """Read a COCO caption annotation file into a :class:`CaptionSplit`.

    Args:
        annotation_file: e.g. ``annotations/captions_val2017.json``.
        image_root: folder holding the images (``image_root / file_name``); default: the file's folder.
        check_files: verify now that every image file exists.
        name: the split's name (default: the file's stem).

    ``image_ids`` are COCO image ids, ``caption_ids`` annotation ids.
    """
    path = Path(annotation_file)
    return coco_from_data(read_json(path), path, image_root, check_files, name)


def coco_from_data(data: Any, path: Path, image_root: Optional[PathLike] = None, check_files: bool = False,
                   name: Optional[str] = None) -> CaptionSplit:
    from pycocotools.coco import COCO

    image_root = Path(image_root) if image_root is not None else path.parent
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a COCO annotation object, got {type(data).__name__}")
    images = json_field(data, "images", f"{path} (top level)", list)
    annotations = json_field(data, "annotations", f"{path} (top level)", list)
    known = set()
    for i, img in enumerate(images):
        where = f"{path}: images[{i}]"
        image_id = json_field(img, "id", where, (int, str))
        json_field(img, "file_name", where, str)
        if image_id in known:
            raise DataError(f"{where}: duplicate image id {image_id!r}")
        known.add(image_id)
    for k, ann in enumerate(annotations):
        where = f"{path}: annotations[{k}]"
        json_field(ann, "id", where, (int, str))
        image_id = json_field(ann, "image_id", where, (int, str))
        caption = json_field(ann, "caption", where, str)
        if image_id not in known:
            raise DataError(f"{where}: image_id {image_id!r} is not in 'images'")
        if not caption.strip():
            raise DataError(f"{where}: field 'caption' is empty")
    if not images:
        raise DataError(f"{path}: 'images' is empty")

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()

    image_paths, image_ids, captions, caption_image, caption_ids = [], [], [], [], []
    for index, image_id in enumerate(sorted(coco.imgs, key=lambda x: (str(type(x)), x))):
        image_paths.append(image_root / coco.imgs[image_id]["file_name"])
        image_ids.append(image_id)
        for ann in coco.imgToAnns.get(image_id, []):
            captions.append(ann["caption"].strip())
            caption_image.append(index)
            caption_ids.append(ann["id"])
    if not captions:
        raise DataError(f"{path}: no captions in 'annotations'")
    split = CaptionSplit(
        image_paths=image_paths, image_ids=image_ids, captions=captions, caption_image=caption_image,
        caption_ids=caption_ids, name=name or path.stem, source=path,
        meta={"format": "coco", "image_root": str(image_root)},
    )
    if check_files:
        split.check_files()
    return split
