"""Binding accuracy: how often a model tells an image from its binding twins.

On the embedded set (:mod:`dcd.data.synthetic`) images come in twin groups: the same objects with
colours and sizes bound to other shapes, or the layout mirrored, so that every caption of an image
has, for each twin, a caption with exactly the same words. Recall@K mixes two skills, knowing which
objects a caption names and knowing how they are bound; a perfect bag-of-words ranker still reaches
an image-to-text R@1 of about 35% there (one in a twin group's size). Binding accuracy isolates the
second skill:

    over every caption c of image i and every twin k of i: the share of (c, i, k) with
    score(i, c) > score(k, c), ties counting one half.

50% is a model blind to binding (a bag of words ties every comparison), 100% one that always binds.
It is computed from the same score blocks as recall (:func:`dcd.retrieval.evaluate` adds it for any
split whose Karpathy JSON gives each image a twin ``"group"``), so it costs no extra scoring.
"""
from __future__ import annotations

import json
from collections import defaultdict
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

__all__ = ["BindingAccumulator", "binding_accumulator", "twin_comparisons"]

Index = Union[slice, range, List[int], Tensor, None]


def twin_comparisons(split) -> Optional[Tensor]:
    """``LongTensor [P, 3]`` of (caption, its image, a twin image) for ``split``, split-local indices.

    ``None`` when the split's source JSON gives no ``"group"`` to some image (real data sets) or the
    split has no twins at all.
    """
    if getattr(split, "source", None) is None:
        return None
    try:
        with open(split.source) as handle:
            images = json.load(handle).get("images", [])
    except (OSError, ValueError, AttributeError):
        return None
    group_of = {entry.get("imgid"): entry.get("group") for entry in images if isinstance(entry, dict)}
    groups = [group_of.get(image_id) for image_id in split.image_ids]
    if any(g is None for g in groups):
        return None
    members = defaultdict(list)
    for image, group in enumerate(groups):
        members[group].append(image)
    rows = [(caption, image, twin) for caption, image in enumerate(split.caption_image)
            for twin in members[groups[image]] if twin != image]
    return torch.tensor(rows, dtype=torch.long) if rows else None


def _positions(index: Index, size: int) -> Tensor:
    """Where each of ``size`` items sits in a block indexed by ``index`` (-1: not in the block)."""
    if index is None:
        items = torch.arange(size)
    elif isinstance(index, (slice, range)):
        items = torch.arange(size)[index]
    else:
        items = torch.as_tensor(index)
    where = torch.full((size,), -1, dtype=torch.long)
    where[items.long().cpu()] = torch.arange(len(items))
    return where


class BindingAccumulator:
    """Collects the scores of every twin comparison from score blocks (``add_block``, as recall does)."""

    def __init__(self, comparisons: Tensor, num_images: int, num_texts: int):
        self.comparisons = comparisons
        self.num_images, self.num_texts = num_images, num_texts
        self.own = torch.full((len(comparisons),), float("nan"), dtype=torch.float64)
        self.twin = torch.full((len(comparisons),), float("nan"), dtype=torch.float64)

    def add_block(self, image_index: Index, text_index: Index, scores: Tensor) -> None:
        rows, cols = _positions(image_index, self.num_images), _positions(text_index, self.num_texts)
        scores = scores.detach().double().cpu()
        caption = cols[self.comparisons[:, 0]]
        for image_column, target in ((1, self.own), (2, self.twin)):
            row = rows[self.comparisons[:, image_column]]
            inside = (row >= 0) & (caption >= 0)
            target[inside] = scores[row[inside], caption[inside]]

    def compute(self) -> Dict[str, float]:
        """``{"binding": percent}``; raises if some comparison never got both of its scores."""
        missing = int((self.own.isnan() | self.twin.isnan()).sum())
        if missing:
            raise ValueError(f"binding accuracy: {missing} of {len(self.comparisons)} twin comparisons were not scored")
        wins = (self.own > self.twin).double() + 0.5 * (self.own == self.twin).double()
        return {"binding": 100.0 * float(wins.mean())}


def binding_accumulator(split) -> Optional[BindingAccumulator]:
    """A :class:`BindingAccumulator` for ``split``, or ``None`` when it has no twin groups."""
    comparisons = twin_comparisons(split)
    if comparisons is None:
        return None
    return BindingAccumulator(comparisons, split.num_images, split.num_captions)
