"""The scorer interface: the one seam between `dcd/` and any model that scores image-text pairs.

Teachers (ViLT, METER, a user's BLIP) and students (dual encoder, fusion cross-encoder) all implement
`Scorer`, so retrieval evaluation, re-ranking, hard-negative selection and distillation treat them
alike and never look inside a model.

Conventions (plain dicts of tensors, so `.to(device)` and indexing stay trivial):

* image inputs  ``{"pixel_values": float[B, 3, H, W], "pixel_mask": long[B, H, W]}`` (1 = real pixel)
* text inputs   ``{"input_ids": long[B, L], "attention_mask": long[B, L]}``
* features      ``dict[str, Tensor]``, every tensor with the item axis first, so a subset of
  images or texts is ``select(features, index)``. What a model caches per modality is its own
  business (a pooled embedding, a token sequence, patch embeddings).

Scoring splits into a per-modality part (``encode_images`` / ``encode_texts``: run once per image and
once per caption) and a per-pair part (``score_features`` / ``score_feature_pairs``). A dual encoder's
per-pair part is a dot product; a cross-encoder's is its fusion layers. ``score`` and ``score_pairs``
compose the two and are what callers use.

What a student takes from its teacher also goes through this interface, so that ``students/`` and
``benchmarks/`` never import a teacher family's module (a family is reached by name through the
registry in ``teachers/__init__.py``):

* a dual student's initialisation: ``unimodal_towers()`` -> :class:`Towers` (the teacher's image and
  text towers, the preprocessing they expect, and a config of the family that rebuilds them);
* a fusion student: ``shrink(layers)`` (a deep-copied shallower model), ``num_fusion_layers``,
  ``fusion_frozen`` (what the student keeps fixed) and ``save_pretrained(dir)``, read back by the
  family's registered factory as ``create_model(family, checkpoint=dir)``;
* the family name (``family``), the preprocessing (``image_transform``, ``tokenize``) and the size of a
  typical input image (``input_image_hw``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from .files import atomic_write  # noqa: F401  (its old home: ``from teachers.base import atomic_write``)

Features = Dict[str, Tensor]
Inputs = Dict[str, Tensor]


def select(features: Features, index: Tensor | Sequence[int] | slice) -> Features:
    """Rows ``index`` of every tensor in ``features`` (the item axis is always first)."""
    if not isinstance(index, (Tensor, slice)):
        index = torch.as_tensor(index, dtype=torch.long)
    if isinstance(index, Tensor):
        index = index.to(next(iter(features.values())).device)
    return {k: v[index] for k, v in features.items()}


def num_items(features: Features) -> int:
    return next(iter(features.values())).shape[0]


def concat(chunks: List[Features]) -> Features:
    """Concatenate feature dicts along the item axis, padding token axes to a common length."""
    out: Features = {}
    for key in chunks[0]:
        parts = [c[key] for c in chunks]
        if parts[0].dim() >= 2 and len({p.shape[1] for p in parts}) > 1:
            width = max(p.shape[1] for p in parts)
            parts = [nn.functional.pad(p, [0, 0] * (p.dim() - 2) + [0, width - p.shape[1]]) for p in parts]
        out[key] = torch.cat(parts)
    return out


def pad_images(images: List[Tensor]) -> Inputs:
    """Stack [3, H, W] tensors of possibly different sizes, zero-padding to the largest, with a pixel mask."""
    if not images:
        raise ValueError("pad_images: empty list of images")
    height = max(t.shape[1] for t in images)
    width = max(t.shape[2] for t in images)
    pixels = images[0].new_zeros(len(images), 3, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.long)
    for i, t in enumerate(images):
        pixels[i, :, : t.shape[1], : t.shape[2]] = t
        mask[i, : t.shape[1], : t.shape[2]] = 1
    return {"pixel_values": pixels, "pixel_mask": mask}


def to_device(inputs: Dict[str, Tensor], device: torch.device | str) -> Dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


@dataclass
class Towers:
    """A cross-encoder's unimodal towers, what a dual student starts from (:meth:`Scorer.unimodal_towers`).

    Attributes:
        family: the teacher family (its registry name).
        image: module, image inputs -> one vector per image [N, image.width].
        text: module, text inputs -> one vector per caption [N, text.width].
        config: a JSON-able config of the family that builds a model with these towers:
            ``teachers.build_towers(family, config)`` rebuilds them (random weights).
        preprocessing: what the towers expect: ``tokenizer``, ``max_text_len``, ``image_size``,
            ``image_mean``, ``image_std``, ``train_augment``.

    ``image`` and ``text`` are the teacher's own modules; a student deep-copies them.
    """

    family: str
    image: nn.Module
    text: nn.Module
    config: Dict[str, Any]
    preprocessing: Dict[str, Any]


class Scorer(nn.Module):
    """Anything that scores image-text pairs: one unnormalised retrieval logit per (image, text).

    Subclasses implement ``image_transform``, ``tokenize``, ``encode_images``, ``encode_texts`` and
    ``score_feature_pairs``; ``score_features`` has a generic chunked implementation that a subclass
    overrides when it can do better (a dual encoder's matrix product).
    """

    #: short family name used by registries and checkpoints ("meter", "vilt", "dual", ...)
    family: str = "scorer"
    #: how many (image, text) pairs the per-pair part scores at once in ``score_features``
    pair_chunk: int = 256
    #: submodules a fusion student copied from this cross-encoder keeps frozen (its unimodal towers)
    fusion_frozen: Tuple[str, ...] = ()

    # ----------------------------------------------------------------- preprocessing (model's own)
    def image_transform(self, train: bool = False) -> Callable:
        """PIL image -> float tensor [3, H, W], the model's own resize and normalisation."""
        raise NotImplementedError

    def collate_images(self, images: List[Tensor]) -> Inputs:
        """Batch transformed images; the default pads to the largest size with a pixel mask."""
        return pad_images(images)

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        """Captions -> {"input_ids", "attention_mask"}, padded to the longest in the batch."""
        raise NotImplementedError

    # ----------------------------------------------------------------- per-modality part
    def encode_images(self, images: Inputs) -> Features:
        raise NotImplementedError

    def encode_texts(self, texts: Inputs) -> Features:
        raise NotImplementedError

    # ----------------------------------------------------------------- per-pair part
    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        """Aligned pairs: image i with text i -> logits [N]."""
        raise NotImplementedError

    def score_index_pairs(self, image_features: Features, text_features: Features, image_index: Tensor,
                          text_index: Tensor) -> Tensor:
        """Pairs (image_index[n], text_index[n]) of two feature sets -> logits [N], ``pair_chunk`` at a time."""
        chunks = [
            self.score_feature_pairs(
                select(image_features, image_index[s:s + self.pair_chunk]),
                select(text_features, text_index[s:s + self.pair_chunk]),
            )
            for s in range(0, len(image_index), self.pair_chunk)
        ]
        return torch.cat(chunks) if len(chunks) != 1 else chunks[0]

    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        """Every image with every text -> logits [n_images, n_texts], in chunks of ``pair_chunk`` pairs."""
        n_img, n_txt = num_items(image_features), num_items(text_features)
        device = next(iter(image_features.values())).device
        rows = []
        per_chunk = max(1, self.pair_chunk // max(1, n_txt))
        for start in range(0, n_img, per_chunk):
            img_idx = torch.arange(start, min(start + per_chunk, n_img), device=device)
            # pairs (i, t) for i in this chunk, t over all texts, image-major
            pair_img = img_idx.repeat_interleave(n_txt)
            pair_txt = torch.arange(n_txt, device=device).repeat(len(img_idx))
            logits = self.score_index_pairs(image_features, text_features, pair_img, pair_txt)
            rows.append(logits.view(len(img_idx), n_txt))
        return torch.cat(rows)

    # ----------------------------------------------------------------- what students take from a teacher
    def unimodal_towers(self) -> Towers:
        """The image and text towers a dual student copies; a single-stream model has none."""
        raise NotImplementedError(
            f"a {getattr(self, 'family', type(self).__name__)!r} model has no unimodal image or text tower to copy into a dual encoder (a "
            "single-stream cross-encoder such as ViLT has none): build the dual student from timm / transformers "
            "towers instead, e.g. create_student('dual') or DualEncoder(DualEncoderConfig(timm_model=..., text_model=...))"
        )

    def input_image_hw(self) -> Tuple[int, int]:
        """(height, width) of a typical preprocessed image: the configured square ``image_size``."""
        for owner in (getattr(self, "config", None), self):
            size = owner.get("image_size") if isinstance(owner, dict) else getattr(owner, "image_size", None)
            if size:
                return (int(size), int(size)) if isinstance(size, int) else tuple(int(x) for x in size)
        raise NotImplementedError(f"cannot tell the input size of a {type(self).__name__} (no image_size)")

    # ----------------------------------------------------------------- what callers use
    def score(self, images: Inputs, texts: Inputs) -> Tensor:
        """Full pairwise matrix [n_images, n_texts] for a block of images x a block of texts."""
        return self.score_features(self.encode_images(images), self.encode_texts(texts))

    def score_pairs(self, images: Inputs, texts: Inputs) -> Tensor:
        """Aligned pairs (image i, text i) -> [N]."""
        return self.score_feature_pairs(self.encode_images(images), self.encode_texts(texts))

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")


class Wrapper(Scorer):
    """A scorer whose preprocessing and scoring are those of the model it wraps, ``self.model``.

    The frozen :class:`Teacher` view and the fusion student (``students.FusionStudent``) are both one.
    """

    model: Scorer

    def image_transform(self, train: bool = False) -> Callable:
        return self.model.image_transform(train)

    def collate_images(self, images: List[Tensor]) -> Inputs:
        return self.model.collate_images(images)

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        return self.model.tokenize(texts)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def input_image_hw(self) -> Tuple[int, int]:
        return self.model.input_image_hw()

    def encode_images(self, images: Inputs) -> Features:
        return self.model.encode_images(images)

    def encode_texts(self, texts: Inputs) -> Features:
        return self.model.encode_texts(texts)

    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        return self.model.score_feature_pairs(image_features, text_features)

    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        return self.model.score_features(image_features, text_features)


class ScoringView(Wrapper):
    """A scorer's passes without gradients, at a chosen precision (logits back in fp32), its weights untouched.

    How a student still in training is scored as it will be once trained: the :class:`Teacher` view adds the
    freezing, which would stop its training.
    """

    def __init__(self, model: Scorer, precision: str = "auto"):
        super().__init__()
        if isinstance(model, ScoringView):  # a view of a view scores the model itself
            model = model.model
        self.model = model
        self.precision = precision  # what it scores in: "auto" (bf16 where it pays, teachers.precision) or fixed
        self.family = model.family
        self.fusion_frozen = getattr(model, "fusion_frozen", ())
        self.training = model.training  # so that restoring the view's mode restores the model's

    def unimodal_towers(self) -> Towers:
        return unimodal_towers(self.model)

    @property
    def scoring_precision(self) -> str:
        """The precision its passes run at on its current device (``precision`` with ``auto`` resolved)."""
        from .precision import choose

        return choose(self.precision, self.device, "scoring")

    def _frozen(self):
        from .precision import autocast

        return autocast(self.device, self.scoring_precision)

    # the wrapped model's own preprocessing and scoring (Wrapper), without gradients, at the scoring precision;
    # logits come back fp32 whatever it computed in
    @torch.no_grad()
    def encode_images(self, images: Inputs) -> Features:
        with self._frozen():
            return self.model.encode_images(images)

    @torch.no_grad()
    def encode_texts(self, texts: Inputs) -> Features:
        with self._frozen():
            return self.model.encode_texts(texts)

    @torch.no_grad()
    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        with self._frozen():
            return self.model.score_feature_pairs(image_features, text_features).float()

    @torch.no_grad()
    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        with self._frozen():
            return self.model.score_features(image_features, text_features).float()


class Teacher(ScoringView):
    """A frozen view of a scorer: eval mode always, no gradients, never trained by dcd.

    The architecture (``self.model``) stays an ordinary trainable ``Scorer`` so that the embedded
    default can fine-tune it first; wrapping it in ``Teacher`` freezes every parameter, and ``train()``
    is overridden so that a user's ``distiller.train()`` cannot switch dropout back on.
    """

    def __init__(self, model: Scorer, precision: str = "auto"):
        super().__init__(model, precision)
        for p in self.model.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "Teacher":  # a teacher stays in eval mode
        return super().train(False)


def unimodal_towers(model: nn.Module) -> Towers:
    """``model.unimodal_towers()`` of a teacher (or of a ``Teacher``'s model); ``NotImplementedError`` when it has none."""
    model = model.model if isinstance(model, ScoringView) else model
    if isinstance(model, Scorer):
        return model.unimodal_towers()
    return Scorer.unimodal_towers(model)  # not a Scorer: the same message, naming its family


def check_layer_indices(indices: Sequence[int], depth: int, name: str = "layers") -> Tuple[int, ...]:
    """``indices`` of fusion layers to keep (``shrink``), checked: integers, at least one, in ``0..depth-1``,
    no repeats, increasing (the copies keep the teacher's order). Errors are ``ValueError`` naming ``name``."""
    try:
        out = tuple(int(i) for i in indices)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of integers, got {indices!r}") from None
    if any(isinstance(i, bool) or int(i) != i for i in indices):
        raise ValueError(f"{name} must be integers, got {indices!r}")
    if not out:
        raise ValueError(f"{name} is empty: keep at least one fusion layer")
    bad = [i for i in out if not 0 <= i < depth]
    if bad:
        raise ValueError(f"{name} {bad} out of range: the model has {depth} fusion layers (0..{depth - 1})")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} {out} repeat a layer")
    if list(out) != sorted(out):
        raise ValueError(f"{name} {out} must be increasing (the copies keep the teacher's order)")
    return out


def num_fusion_layers(model: nn.Module) -> int:
    """How many layers ``model.shrink`` selects among (``model.num_fusion_layers``).

    A model without that attribute but with the two-stream layout (``cross_modal_text_layers``, one
    co-attention layer per entry) is counted from it.
    """
    value = getattr(model, "num_fusion_layers", None)
    if callable(value):
        value = value()
    if value is not None:
        return int(value)
    if isinstance(getattr(model, "cross_modal_text_layers", None), nn.ModuleList):
        return len(model.cross_modal_text_layers)
    raise ValueError(f"cannot tell how many fusion layers a {type(model).__name__} has (no num_fusion_layers)")
