"""The embedded default data set: compositional shape scenes whose captions word overlap cannot rank.

Each image (``image_size`` px, default 64) shows ``num_objects`` (default 2) objects on a plain,
slightly noisy grey background. An object has a colour (red, green, blue, yellow, purple, white), a
shape (circle, square, triangle, diamond, cross) and a size (small, large); objects of one image have
distinct colours and distinct shapes, and are laid out along one axis, so the relation between
neighbours is one of left of / right of / above / below. Five captions per image come from varied
templates, synonyms ("to the left of", "on top of", "disk", "tiny"...), with the relation told from
either object ("A left of B" == "B right of A") and sizes sometimes left out.

**Binding twins.** Images are generated in groups (most of size 2-5, within one split) that share
the multiset of objects' colours, shapes and sizes but bind colours and sizes to shapes differently
and/or mirror the layout ("a red circle left of a blue square" / "a blue circle left of a red square"
/ "a blue square left of a red circle"...). Twins also share their caption recipes (template,
synonyms, whether the earlier or the later object along the axis is the subject), so with two
objects every caption of an image has a caption of each twin with exactly the same bag of words: a
bag-of-words model cannot tell twins apart, a cross-encoder that binds attributes to objects can.
Scene metadata (objects in axis order, relation of the first to the second, twin group) is kept
in the JSON next to the Karpathy fields.

On disk (``build_synthetic``): ``root/images/<split>_<index>.jpg`` (JPEG quality 95, 4:4:4 chroma),
``root/dataset_synthetic.json`` in Karpathy's format (read by :func:`~dcd.data.load_karpathy`
exactly like COCO and Flickr30K) and ``root/manifest.json`` with the generation parameters.
Everything is a deterministic function of the parameters: the same seed gives the same captions
and the same image bytes (for a given Pillow version), and each split has its own random stream, so
changing the train size leaves val and test unchanged.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from dataclasses import dataclass
from itertools import permutations
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from .errors import DataError

__all__ = [
    "build_synthetic", "dcd_home", "default_data_root", "generate_split", "render_scene", "Scene", "SynthObject",
    "COLOURS", "SHAPES", "DEFAULT_SIZES", "JSON_NAME", "MANIFEST_NAME",
]

VERSION = 2
JSON_NAME = "dataset_synthetic.json"
MANIFEST_NAME = "manifest.json"
IMAGE_DIR = "images"
DEFAULT_SIZES: Dict[str, int] = {"train": 1500, "val": 500, "test": 500}
DEFAULT_TWIN_FRACTION = 0.85
MAX_TWINS = 5  # largest twin group

#: well separated RGB values (hue and/or brightness) that survive JPEG at 64 px
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 170, 50),
    "blue": (35, 75, 235),
    "yellow": (245, 220, 30),
    "purple": (150, 50, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")

SHAPE_WORDS = {
    "circle": ("circle", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond", "rhombus"),
    "cross": ("cross", "plus sign"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
#: relation of the subject to the other object
RELATION_WORDS = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "on top of", "over"),
    "below": ("below", "beneath", "under"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
#: caption templates for two objects: {A}/{B} indefinite noun phrases of subject/other, {tA}/{tB}
#: definite ones, {sA}/{sB} the bare shape words, {R} the relation phrase
PAIR_TEMPLATES = (
    "{A} {R} {B}",
    "{tA} is {R} {tB}",
    "there is {A} {R} {B}",
    "{R} {B} there is {A}",
    "{A} and {B}, the {sA} is {R} the {sB}",
    "an image of {A} {R} {B}",
    "{A} placed {R} {B}",
    "two shapes: {A} {R} {B}",
    "{B} with {A} {R} it",
)
CHAIN_PREFIXES = ("", "there is ", "an image of ", "{n} shapes: ", "a picture with ")
SINGLE_TEMPLATES = ("{A}", "there is {A}", "an image of {A}", "a single {X}", "{A} on a grey background")
CAPTIONS_PER_IMAGE = 5


def dcd_home() -> Path:
    """``$DCD_HOME``, default ``~/.cache/dcd``."""
    return Path(os.environ.get("DCD_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "dcd"))


def default_data_root() -> Path:
    """``$DCD_HOME/data/synthetic-v2`` (``DCD_HOME`` defaults to ``~/.cache/dcd``)."""
    return dcd_home() / "data" / f"synthetic-v{VERSION}"


# ---------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class SynthObject:
    colour: str
    shape: str
    size: str


@dataclass
class Scene:
    """Objects in axis order (first = leftmost / topmost), the axis, and the caption recipes."""

    objects: List[SynthObject]  # by slot: the shape is bound to the slot, colour and size permuted by variant
    order: List[int]  # slots in axis order
    axis: str  # "h" | "v"
    recipes: List[Dict[str, Any]]
    group: int

    def relation(self, subject: int, other: int) -> str:
        first = self.order.index(subject) < self.order.index(other)
        if self.axis == "h":
            return "left" if first else "right"
        return "above" if first else "below"


def _noun(obj: SynthObject, recipe: Dict[str, Any], slot: int, definite: bool) -> str:
    words = []
    if not recipe["no_size"]:
        words.append(SIZE_WORDS[obj.size][recipe["size_word"][obj.size] % len(SIZE_WORDS[obj.size])])
    words.append(obj.colour)
    words.append(_shape_word(obj, recipe, slot))
    return ("the " if definite else "a ") + " ".join(words)


def _shape_word(obj: SynthObject, recipe: Dict[str, Any], slot: int) -> str:
    options = SHAPE_WORDS[obj.shape]
    return options[recipe["shape_word"][slot] % len(options)]


def caption(scene: Scene, recipe: Dict[str, Any]) -> str:
    """Render one caption recipe for ``scene``.

    The subject of each clause is chosen by axis position (the earlier or the later object of a
    neighbouring pair), not by object, so a mirrored twin keeps the relation word and, for two
    objects, the exact bag of words of its twin's caption.
    """
    objs = scene.objects
    n = len(objs)
    if n == 1:
        template = SINGLE_TEMPLATES[recipe["template"] % len(SINGLE_TEMPLATES)]
        x = f"{objs[0].colour} {_shape_word(objs[0], recipe, 0)}"
        return template.format(A=_noun(objs[0], recipe, 0, False), X=x)
    clauses = []
    for k in range(n - 1):
        a, b = scene.order[k], scene.order[k + 1]
        if recipe["subject"][k]:  # the later object of the pair is the subject
            a, b = b, a
        rel = scene.relation(a, b)
        rel_words = RELATION_WORDS[rel]
        fields = dict(
            A=_noun(objs[a], recipe, a, False), B=_noun(objs[b], recipe, b, False),
            tA=_noun(objs[a], recipe, a, True), tB=_noun(objs[b], recipe, b, True),
            sA=_shape_word(objs[a], recipe, a), sB=_shape_word(objs[b], recipe, b),
            R=rel_words[recipe["rel_word"][k] % len(rel_words)],
        )
        if n == 2:
            return PAIR_TEMPLATES[recipe["template"] % len(PAIR_TEMPLATES)].format(**fields)
        clauses.append("{A} {R} {B}".format(**fields))
    prefix = CHAIN_PREFIXES[recipe["template"] % len(CHAIN_PREFIXES)].format(n=n)
    return prefix + ", and ".join(clauses)


def _recipes(rng: random.Random, num_objects: int) -> List[Dict[str, Any]]:
    """Five caption recipes with distinct templates (shared by a whole twin group)."""
    if num_objects == 1:
        n_templates = len(SINGLE_TEMPLATES)
    elif num_objects == 2:
        n_templates = len(PAIR_TEMPLATES)
    else:
        n_templates = len(CHAIN_PREFIXES)
    templates = rng.sample(range(n_templates), min(CAPTIONS_PER_IMAGE, n_templates))
    while len(templates) < CAPTIONS_PER_IMAGE:
        templates.append(rng.randrange(n_templates))
    recipes = []
    for t in templates:
        recipes.append({
            "template": t,
            "subject": [rng.random() < 0.5 for _ in range(max(1, num_objects - 1))],
            "rel_word": [rng.randrange(6) for _ in range(max(1, num_objects - 1))],
            "size_word": {size: rng.randrange(6) for size in SIZES},  # by size, so size swaps keep the words
            "shape_word": [rng.randrange(6) for _ in range(num_objects)],
            "no_size": rng.random() < 0.3,
        })
    return recipes


# ---------------------------------------------------------------------------------------------- drawing
def _geometry(image_size: int, num_objects: int) -> Tuple[float, int, int]:
    cell = image_size / num_objects
    large = int(round(min(0.34 * image_size, 0.8 * cell)))
    small = max(4, int(round(0.55 * large)))
    return cell, small, large


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: int, fill) -> None:
    r = d / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
    elif shape == "square":
        h = 0.86 * r
        draw.rectangle([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        t = max(1.0, d / 6)
        draw.rectangle([cx - r, cy - t, cx + r - 1, cy + t - 1], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t - 1, cy + r - 1], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, image_size: int, rng: random.Random, noise_seed: Sequence[int]
                 ) -> Tuple[Image.Image, List[Dict[str, Any]]]:
    """Draw ``scene``: grey noisy background, objects in axis order with jittered positions."""
    n = len(scene.objects)
    cell, small, large = _geometry(image_size, n)
    grey = rng.randrange(95, 136)
    noise = np.random.default_rng(list(noise_seed)).integers(-4, 5, size=(image_size, image_size, 1))
    background = np.clip(grey + noise + np.zeros((1, 1, 3), dtype=np.int64), 0, 255).astype(np.uint8)
    image = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(image)
    margin = 2
    centre = image_size / 2
    base = centre + rng.uniform(-0.15, 0.15) * image_size  # shared cross-axis coordinate
    placed = []
    for position, slot in enumerate(scene.order):
        obj = scene.objects[slot]
        d = large if obj.size == "large" else small
        jitter = max(0.0, (cell - d) / 2 - margin)
        along = (position + 0.5) * cell + rng.uniform(-jitter, jitter)
        across = base + rng.uniform(-0.06, 0.06) * image_size
        across = min(max(across, d / 2 + margin), image_size - d / 2 - margin)
        cx, cy = (along, across) if scene.axis == "h" else (across, along)
        cx, cy = int(round(cx)), int(round(cy))
        _draw_shape(draw, obj.shape, cx, cy, d, COLOURS[obj.colour])
        placed.append({"colour": obj.colour, "shape": obj.shape, "size": obj.size, "center": [cx, cy],
                       "diameter": d})
    return image, placed


# ---------------------------------------------------------------------------------------------- splits
def _variants(rng: random.Random, colours: List[str], shapes: List[str], sizes: List[str], count: int
              ) -> List[Tuple[List[SynthObject], bool]]:
    """Up to ``count`` distinct scenes from one attribute multiset: colours and sizes re-bound to the
    shapes by permutations, layout possibly mirrored (objects by slot, mirrored flag)."""
    n = len(shapes)
    perms = list(permutations(range(n)))
    if len(perms) > 6:
        perms = [perms[0]] + rng.sample(perms[1:], 5)
    options, seen = [], set()
    for cp in perms:
        for sp in perms:
            objects = [SynthObject(colours[cp[k]], shapes[k], sizes[sp[k]]) for k in range(n)]
            for mirrored in (False, True):
                key = (tuple(objects), mirrored)
                if key not in seen:
                    seen.add(key)
                    options.append((objects, mirrored))
    return rng.sample(options, min(count, len(options)))


def generate_split(split: str, count: int, seed: int = 0, image_size: int = 64, num_objects: int = 2,
                   twin_fraction: float = DEFAULT_TWIN_FRACTION, group_offset: int = 0
                   ) -> List[Tuple[Image.Image, List[str], Dict[str, Any]]]:
    """``count`` (image, five captions, metadata) triples for ``split`` (in memory)."""
    if not 1 <= num_objects <= min(len(COLOURS), len(SHAPES), 4):
        raise ValueError(f"num_objects must be between 1 and 4, got {num_objects}")
    rng = random.Random(f"dcd-synthetic-v{VERSION}/{seed}/{split}")
    out: List[Tuple[Image.Image, List[str], Dict[str, Any]]] = []
    group = group_offset
    while len(out) < count:
        twins = num_objects > 1 and rng.random() < twin_fraction
        size = rng.randint(2, MAX_TWINS) if twins else 1
        colours = rng.sample(list(COLOURS), num_objects)
        shapes = rng.sample(SHAPES, num_objects)
        sizes = [rng.choice(SIZES) for _ in range(num_objects)]
        axis = rng.choice("hv")
        recipes = _recipes(rng, num_objects)
        for objects, mirrored in _variants(rng, colours, shapes, sizes, size):
            if len(out) >= count:
                break
            order = list(range(num_objects))
            if mirrored:
                order.reverse()
            scene = Scene(objects=objects, order=order, axis=axis, recipes=recipes, group=group)
            captions = [caption(scene, r) for r in recipes]
            image, placed = render_scene(scene, image_size, rng, (seed, _split_code(split), len(out)))
            relation = scene.relation(order[0], order[1]) if num_objects > 1 else None
            meta = {"group": group, "objects": placed, "axis": axis, "relation": relation}
            out.append((image, captions, meta))
        group += 1
    return out


def _split_code(split: str) -> int:
    return int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")


# ---------------------------------------------------------------------------------------------- on disk
def _normalise_sizes(sizes: Union[None, Mapping[str, int], Sequence[int]]) -> Dict[str, int]:
    if sizes is None:
        return dict(DEFAULT_SIZES)
    if not isinstance(sizes, Mapping):
        sizes = list(sizes)
        if len(sizes) != 3:
            raise ValueError(f"sizes must be a dict or (train, val, test), got {sizes!r}")
        sizes = dict(zip(("train", "val", "test"), sizes))
    out = {}
    for split, n in sizes.items():
        if split not in ("train", "val", "test", "restval"):
            raise ValueError(f"unknown split {split!r} in sizes (train, val, test, restval)")
        if int(n) < 0:
            raise ValueError(f"size of split {split!r} must be >= 0, got {n}")
        if int(n):
            out[split] = int(n)
    if not out:
        raise ValueError("sizes: every split is empty")
    return out


def _params(seed: int, sizes, image_size: int, num_objects: int, twin_fraction: float) -> Dict[str, Any]:
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    return {"version": VERSION, "seed": int(seed), "sizes": _normalise_sizes(sizes), "image_size": int(image_size),
            "num_objects": int(num_objects), "twin_fraction": float(twin_fraction)}


def _read_manifest(root: Path) -> Optional[Dict[str, Any]]:
    try:
        with open(root / MANIFEST_NAME) as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == "dcd-synthetic" else None


def _is_complete(root: Path, params: Dict[str, Any]) -> bool:
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("params") != params or not (root / JSON_NAME).is_file():
        return False
    try:
        return sum(1 for _ in os.scandir(root / IMAGE_DIR)) == manifest.get("num_images")
    except OSError:
        return False


def _write(folder: Path, params: Dict[str, Any]) -> None:
    (folder / IMAGE_DIR).mkdir(parents=True)
    images, imgid, sentid, groups = [], 0, 0, 0
    for split, count in params["sizes"].items():
        items = generate_split(split, count, params["seed"], params["image_size"], params["num_objects"],
                               params["twin_fraction"], group_offset=groups)
        for index, (image, captions, meta) in enumerate(items):
            filename = f"{split}_{index:05d}.jpg"
            image.save(folder / IMAGE_DIR / filename, "JPEG", quality=95, subsampling=0)
            sentences = []
            for text in captions:
                sentences.append({"raw": text, "tokens": text.replace(",", "").replace(":", "").split(),
                                  "imgid": imgid, "sentid": sentid})
                sentid += 1
            images.append({"filepath": IMAGE_DIR, "filename": filename, "split": split, "imgid": imgid,
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences, **meta})
            imgid += 1
        groups = max(m["group"] for _, _, m in items) + 1 if items else groups
    with open(folder / JSON_NAME, "w") as handle:
        json.dump({"images": images, "dataset": "synthetic", "info": params}, handle)
    with open(folder / MANIFEST_NAME, "w") as handle:  # written last: its presence marks completion
        json.dump({"format": "dcd-synthetic", "params": params, "num_images": imgid, "num_captions": sentid},
                  handle, indent=1)


def build_synthetic(
    root: Union[str, Path, None] = None,
    seed: int = 0,
    sizes: Union[None, Mapping[str, int], Sequence[int]] = None,
    image_size: int = 64,
    num_objects: int = 2,
    twin_fraction: float = DEFAULT_TWIN_FRACTION,
    force: bool = False,
) -> Path:
    """Create the synthetic data set under ``root`` once; return the path of its Karpathy JSON.

    Args:
        root: folder of this data set. ``None``: :func:`default_data_root` for the default
            parameters, a sibling ``synthetic-v2-<hash of the parameters>`` otherwise.
        seed: everything is a deterministic function of the seed (and the other parameters).
        sizes: images per split, ``{"train": 1500, "val": 500, "test": 500}`` by default, or a
            ``(train, val, test)`` tuple.
        image_size: image side in pixels.
        num_objects: objects per image (1-4).
        twin_fraction: share of generation groups with binding twins (the rest are singletons).
        force: regenerate even if a complete copy is present, or if ``root`` holds a copy made
            with other parameters.

    A complete copy with the same parameters (``manifest.json``) is reused. Generation writes into
    a temporary sibling folder that is renamed into place, so a crash or a concurrent build never
    leaves a half-written data set at ``root``. An existing ``root`` with other parameters raises
    :class:`DataError` unless ``force``; a non-empty folder that is not a dcd synthetic data set is
    never overwritten.
    """
    params = _params(seed, sizes, image_size, num_objects, twin_fraction)
    if root is None:
        root = default_data_root()
        if params != _params(0, None, 64, 2, DEFAULT_TWIN_FRACTION):
            digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
            root = root.with_name(f"{root.name}-{digest}")
    root = Path(root).expanduser()
    if _is_complete(root, params) and not force:
        return root / JSON_NAME
    if root.exists():
        if not root.is_dir():
            raise DataError(f"synthetic data root {root} exists and is not a folder")
        manifest = _read_manifest(root)
        if manifest is None and any(root.iterdir()):
            raise DataError(f"{root} is not empty and holds no dcd synthetic data set ({MANIFEST_NAME}); "
                            "choose another root")
        if manifest is not None and manifest.get("params") != params and not force:
            raise DataError(f"{root} holds a synthetic data set generated with {manifest.get('params')}, not "
                            f"{params}; pass force=True to regenerate it or choose another root")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        _write(tmp, params)
        old = None
        if root.exists():
            if any(root.iterdir()):
                old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(root, old)
            else:
                root.rmdir()
        try:
            os.replace(tmp, root)
        except OSError:
            if _is_complete(root, params):  # a concurrent build got there first
                return root / JSON_NAME
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root / JSON_NAME
