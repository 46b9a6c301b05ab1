"""Safe image loading and the two image datasets (training pairs, evaluation images).

``load_image`` decodes the whole file (``img.load()``) and converts it to RGB the way a person would see it:
EXIF orientation applied (phone photos), transparency composited on :data:`BACKGROUND` (white, as a browser
shows it; never black by accident), greyscale and CMYK converted, 16-bit files scaled to 8 bits (not clipped).
A missing, unreadable or truncated file raises :class:`DataError` naming the path. PIL's global
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
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import Dataset

from .errors import DataError

__all__ = ["BACKGROUND", "load_image", "readable", "to_rgb", "TrainPairs", "EvalImages"]

#: what a transparent pixel shows through: white, as browsers and image viewers show a transparent PNG
BACKGROUND = (255, 255, 255)

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
            return to_rgb(img)
    except FileNotFoundError as exc:
        raise DataError(f"image file not found: {path}") from exc
    except IsADirectoryError as exc:
        raise DataError(f"image path is a directory, not a file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        # UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DataError(f"cannot decode image {path}: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` upright, in 8-bit RGB: EXIF orientation applied, alpha composited on :data:`BACKGROUND`, 16-bit
    and 32-bit greyscale scaled to 0..255, CMYK / palette / greyscale converted."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16 / 32-bit greyscale: scale, not clip at 255
        array = np.asarray(img, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else (1.0 if img.mode == "F" and peak <= 1 else 255.0)
        img = Image.fromarray(np.clip(array * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


def readable(split):
    """``split`` without the images that do not decode (missing, corrupt, truncated, not an image): each is
    logged with its reason and listed in the new split's ``meta["skipped"]`` (``"path: reason"``), and the run
    goes on with the rest. Decodes every image once: for a user's own files, not for the named data sets."""
    kept, skipped = [], []
    for i, path in enumerate(split.image_paths):
        try:
            load_image(path)
            kept.append(i)
        except DataError as exc:
            skipped.append(str(exc))
    if not skipped:
        return split
    if not kept:
        raise DataError(f"no image of split {split.name!r} ({split.source}) can be read: {skipped[0]}")
    log.warning("split %r: skipping %d unreadable image(s) of %d: %s", split.name, len(skipped), split.num_images,
                "; ".join(skipped))
    out = split.select_images(kept)
    out.meta["skipped"] = list(split.meta.get("skipped", [])) + skipped
    return out


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
