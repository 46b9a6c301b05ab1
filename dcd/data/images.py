"""Safe image loading and the two image datasets (training pairs, evaluation images).

``load_image`` decodes the whole file (``img.load()``) and converts to RGB; a missing, unreadable or
truncated file raises :class:`DataError` naming the path. PIL's global
``ImageFile.LOAD_TRUNCATED_IMAGES`` would make truncated JPEGs load silently (grey bottom rows); if
some other library has switched it on, ``load_image`` switches it off for the duration of its own
decode (under a lock) and restores it afterwards.

Datasets never hard-code a resolution or a normalisation: each model hands in its own
``image_transform``. ``TrainPairs`` decodes an image once and applies every model's transform to it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Callable, Dict, Iterator, Mapping, Optional, Set, Union

import numpy as np
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from .errors import DataError

__all__ = ["load_image", "TrainPairs", "EvalImages"]

log = logging.getLogger("dcd.data")

_truncation_lock = threading.Lock()
_warned_truncation_flag = False


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated files even if someone set ``ImageFile.LOAD_TRUNCATED_IMAGES``."""
    global _warned_truncation_flag
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        yield
        return
    if not _warned_truncation_flag:
        _warned_truncation_flag = True
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; dcd ignores it and rejects truncated images")
    with _truncation_lock:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def load_image(path: Union[str, Path]) -> Image.Image:
    """Open ``path``, decode it fully and return an RGB ``PIL.Image``.

    Raises:
        DataError: the file is missing, is not an image, or is truncated / corrupt.
    """
    path = Path(path)
    try:
        with _strict_truncation(), Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"image path is a directory, not a file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DataError(f"cannot decode image {path}: {exc}") from exc


Transforms = Union[Callable, Mapping[str, Callable]]


class TrainPairs(Dataset):
    """One item per caption of ``split``, its image transformed once per model.

    Args:
        split: a :class:`~dcd.data.CaptionSplit`.
        transforms: ``{model name: that model's image_transform(train=True)}``, e.g.
            ``{"teacher": teacher.image_transform(True), "student": student.image_transform(True)}``.
            A single callable is taken as ``{"image": transform}``.

    Items are ``{"images": {name: tensor}, "caption": str, "image_index": int, "caption_index": int}``.

    A corrupt or missing image does not stop a long run: it is reported once (``logging.warning``
    naming the file), and every item whose image it is gets replaced by the next caption (in split
    order, wrapping around) whose image decodes -- a deterministic choice. ``skipped`` counts items
    served by a replacement, ``bad_images`` holds the indices of the images found unreadable. With
    ``DataLoader(num_workers > 0)`` each worker process keeps its own counts and warnings.
    """

    #: decoded images kept in memory (uint8 RGB), so that every epoch after the first skips file reads and
    #: JPEG decoding; the embedded training set takes 18 MB; past the budget, the remaining images are read
    #: from their files every time
    memory_bytes: int = 2 << 30

    def __init__(self, split, transforms: Transforms, memory_bytes: Optional[int] = None):
        if callable(transforms) and not isinstance(transforms, Mapping):
            transforms = {"image": transforms}
        if not transforms:
            raise ValueError("TrainPairs needs at least one image transform")
        self.split = split
        self.transforms: Dict[str, Callable] = dict(transforms)
        self.skipped = 0
        self.bad_images: Set[int] = set()
        if memory_bytes is not None:
            self.memory_bytes = memory_bytes
        self._decoded: Dict[int, np.ndarray] = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return self.split.num_captions

    def _try_image(self, image_index: int):
        if image_index in self.bad_images:
            return None
        pixels = self._decoded.get(image_index)
        if pixels is not None:
            return Image.fromarray(pixels)
        try:
            image = load_image(self.split.image_paths[image_index])
        except DataError as exc:
            self.bad_images.add(image_index)
            log.warning("skipping corrupt image %d of split %r: %s", image_index, self.split.name, exc)
            return None
        pixels = np.asarray(image)
        if self._decoded_bytes + pixels.nbytes <= self.memory_bytes:
            self._decoded[image_index] = pixels
            self._decoded_bytes += pixels.nbytes
        return image

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"caption index {index} out of range for {n} captions")
        caption_image = self.split.caption_image
        for step in range(n):
            cap = (index + step) % n
            image = self._try_image(caption_image[cap])
            if image is None:
                continue
            if step:
                self.skipped += 1
            return {
                "images": {name: t(image) for name, t in self.transforms.items()},
                "caption": self.split.captions[cap],
                "image_index": caption_image[cap],
                "caption_index": cap,
            }
        raise DataError(f"no readable image left in split {self.split.name!r} ({self.split.source})")


class EvalImages(Dataset):
    """The images of ``split`` in split order, each ``transform(image)``; a corrupt image is an error."""

    def __init__(self, split, transform: Callable):
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index: int):
        return self.transform(load_image(self.split.image_paths[index]))
