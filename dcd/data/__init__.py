"""Data layer: caption splits (Karpathy JSON, COCO annotations, the embedded synthetic set), safe image
loading, datasets and collation.

    split = load_split("synthetic", split="test")          # builds the embedded default on first use
    split = load_split("coco", root="~/data/coco", split="test")   # Karpathy 5K test
    split = load_split("annotations/captions_val2017.json", image_root="~/data/coco/val2017")

Every loader returns a :class:`CaptionSplit`; bad input raises :class:`DataError` naming the file,
field or image at fault. Named data sets are entries of :data:`DATA_SETS` (a :class:`teachers.registry.Registry`):
``@DATA_SETS.register("name")`` on ``loader(root, split, image_root, check_files) -> CaptionSplit`` adds one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from teachers.registry import Registry

from .coco import is_coco_annotation, load_coco_captions
from .collate import TrainCollator, collate_train
from .errors import DataError
from .images import EvalImages, TrainPairs, load_image, readable
from .karpathy import KARPATHY_SPLITS, CaptionSplit, load_karpathy, read_json
from .synthetic import build_synthetic, dcd_home, default_data_root

__all__ = [
    "CaptionSplit", "DATA_SETS", "DATASETS", "DataError", "EvalImages", "KARPATHY_SPLITS", "TrainCollator",
    "TrainPairs", "build_synthetic", "collate_train", "dcd_home", "default_data_root", "load_coco_captions",
    "load_image", "load_karpathy", "load_split", "readable",
]

PathLike = Union[str, Path]

#: data set name -> ``loader(root, split, image_root, check_files) -> CaptionSplit``
DATA_SETS = Registry("data set", hint="(or pass the path of a .json annotation file)")

#: Karpathy data sets: name -> (Karpathy JSON inside root, image folder inside root)
DATASETS = {
    "coco": ("dataset_coco.json", "."),
    "flickr30k": ("dataset_flickr30k.json", "flickr30k-images"),
}


@DATA_SETS.register("synthetic")
def _synthetic(root, split, image_root, check_files) -> CaptionSplit:
    """The embedded compositional set, generated on first use (root default: $DCD_HOME/data/synthetic-v2)."""
    return load_karpathy(build_synthetic(root), image_root, split, check_files, name=f"synthetic-{_label(split)}")


def _karpathy_set(key: str) -> None:
    json_name, image_dir = DATASETS[key]

    def load(root, split, image_root, check_files) -> CaptionSplit:
        base = Path(root).expanduser() if root is not None else dcd_home() / "data" / key
        json_path = base / json_name
        if not json_path.exists():
            raise DataError(f"{key}: Karpathy split file not found: {json_path} (download Karpathy's "
                            f"caption_datasets.zip and put {json_name} there, or pass root=)")
        if image_root is None:
            image_root = base / image_dir if (base / image_dir).is_dir() else base
        return load_karpathy(json_path, image_root, split, check_files, name=f"{key}-{_label(split)}")

    images = "root" if image_dir == "." else f"root/{image_dir}"
    load.__doc__ = f"Karpathy's {json_name} in root (default $DCD_HOME/data/{key}), images under {images}."
    DATA_SETS.register(key, load)


for _name in DATASETS:
    _karpathy_set(_name)


def load_split(
    name_or_path: PathLike,
    root: Optional[PathLike] = None,
    split: Union[str, Sequence[str]] = "test",
    *,
    image_root: Optional[PathLike] = None,
    check_files: bool = False,
) -> CaptionSplit:
    """One split of a named data set or of an annotation file.

    Args:
        name_or_path:
            * ``"synthetic"``: the embedded default (built under ``root``, default
              :func:`default_data_root`, on first use);
            * ``"coco"``: ``root/dataset_coco.json`` (Karpathy), images under ``root``
              (``root/val2014/...``); ``root`` defaults to ``$DCD_HOME/data/coco``;
            * ``"flickr30k"``: ``root/dataset_flickr30k.json``, images in ``root/flickr30k-images``
              (or ``root`` itself when that folder does not exist); default root ``$DCD_HOME/data/flickr30k``;
            * a ``.json`` path: a Karpathy split file (has ``images[].sentences``) or a COCO caption
              annotation file (has ``annotations``), detected from its keys.
        root: the data set's folder (named data sets), or where an annotation file's images are.
        split: Karpathy split: ``"train"`` (= train + restval), ``"val"``, ``"test"``, ``"restval"``,
            ``"all"`` or a list. A COCO annotation file is one split by itself; ``split`` is ignored.
        image_root: override where images are looked up.
        check_files: verify now that every image file exists.
    """
    key = str(name_or_path)
    if key in DATA_SETS:
        return DATA_SETS.create(key, root, split, image_root, check_files)
    path = Path(key).expanduser()
    if path.suffix.lower() != ".json" and not path.is_file():
        raise DataError(DATA_SETS.unknown(key))
    if image_root is None and root is not None:  # an annotation file's --data-root: where its images are
        image_root = root
    data = read_json(path)
    if is_coco_annotation(data):
        from .coco import coco_from_data
        return coco_from_data(data, path, image_root, check_files)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        from .karpathy import karpathy_from_data
        return karpathy_from_data(data, path, image_root, split, check_files)
    raise DataError(f"{path}: neither a Karpathy split file (top-level 'images' with 'sentences') nor a COCO "
                    "caption annotation file ('images' and 'annotations')")


def _label(split) -> str:
    return split if isinstance(split, str) else "+".join(split)
