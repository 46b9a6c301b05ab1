"""Neighbour batches: training batches made of groups of images whose captions share words.

In-batch negatives drawn at random are easy: on COCO two random images rarely share a subject, on
the embedded set a batch of 32 of 1500 images almost never holds two binding twins, the pairs a
retrieval model is tested on hardest. A cross-encoder whose ranking head only ever compares easy
pairs learns to read words, not to bind them. So each batch here is a few *groups*: a seed image
and its nearest neighbours by caption words (idf-weighted word sets, cosine), each image with one
of its captions. Every caption is still served once per epoch, in a seeded order, so training stays
resumable (``ResumableSampler`` with a ``grouping``).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List

import torch

__all__ = ["caption_neighbours", "NeighbourGrouping"]

_WORD = re.compile(r"[a-z0-9]+")


def _word_sets(split) -> List[set]:
    words: List[set] = [set() for _ in range(split.num_images)]
    for caption, image in zip(split.captions, split.caption_image):
        words[image].update(_WORD.findall(caption.lower()))
    return words


def caption_neighbours(split, k: int, chunk: int = 256) -> torch.Tensor:
    """``LongTensor [num_images, k]``: each image's ``k`` nearest other images by caption words.

    Images are idf-weighted binary word sets over all their captions, compared by cosine; the
    similarity is computed in chunks of ``chunk`` images (memory ``num_images x chunk``), so it
    scales to COCO's 113K training images.
    """
    n = split.num_images
    if n < 2:
        raise ValueError(f"split {split.name!r} needs at least 2 images for neighbour batches, has {n}")
    k = min(k, n - 1)
    words = _word_sets(split)
    document_frequency = Counter(w for ws in words for w in ws)
    vocabulary: Dict[str, int] = {w: i for i, w in enumerate(sorted(document_frequency))}
    rows, cols, values = [], [], []
    for image, ws in enumerate(words):
        weights = [math.log(n / document_frequency[w]) for w in ws]  # a word every image has weighs 0
        norm = math.sqrt(sum(x * x for x in weights)) or 1.0
        for w, x in zip(ws, weights):
            rows.append(image)
            cols.append(vocabulary[w])
            values.append(x / norm)
    matrix = torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.tensor(values, dtype=torch.float32),
                                     (n, len(vocabulary)), check_invariants=True).coalesce()
    neighbours = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block = _dense_rows(matrix, start, stop)
        similarity = torch.sparse.mm(matrix, block.t()).t()  # [chunk, n]
        similarity[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")  # never itself
        neighbours[start:stop] = similarity.topk(k, dim=1).indices
    return neighbours


def _dense_rows(matrix: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    indices, values = matrix.indices(), matrix.values()
    keep = (indices[0] >= start) & (indices[0] < stop)
    out = torch.zeros(stop - start, matrix.shape[1])
    out[indices[0, keep] - start, indices[1, keep]] = values[keep]
    return out


class NeighbourGrouping:
    """Per epoch, the captions of ``split`` arranged in groups of neighbouring images.

    ``groups(generator)`` visits the images in a random order; each image not yet placed seeds a
    group with up to ``group_size - 1`` of its not-yet-placed caption neighbours. Captions are then
    served in rounds: in each round every group (in a new random order) gives one unused caption of
    each of its images, so a batch holds ``batch_size / group_size`` groups of distinct images.
    """

    def __init__(self, split, group_size: int = 4, candidates: int = 16):
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        self.group_size = group_size
        self.size = split.num_captions
        self.captions_of: List[List[int]] = split.image_to_captions()
        self.neighbours = caption_neighbours(split, max(candidates, group_size)).tolist() if group_size > 1 else None

    def image_groups(self, generator: torch.Generator) -> List[List[int]]:
        n = len(self.captions_of)
        placed = [False] * n
        groups: List[List[int]] = []
        for seed in torch.randperm(n, generator=generator).tolist():
            if placed[seed]:
                continue
            group = [seed]
            placed[seed] = True
            for other in (self.neighbours[seed] if self.neighbours is not None else ()):
                if len(group) >= self.group_size:
                    break
                if not placed[other]:
                    group.append(other)
                    placed[other] = True
            groups.append(group)
        return groups

    def groups(self, generator: torch.Generator) -> List[List[int]]:
        """Caption index groups for one epoch; together they hold every caption exactly once."""
        image_groups = self.image_groups(generator)
        queues = {image: [self.captions_of[image][j] for j in torch.randperm(len(self.captions_of[image]), generator=generator).tolist()]
                  for group in image_groups for image in group}
        out: List[List[int]] = []
        while True:
            order = torch.randperm(len(image_groups), generator=generator).tolist()
            served = False
            for g in order:
                group = [queues[image].pop() for image in image_groups[g] if queues[image]]
                if group:
                    out.append(group)
                    served = True
            if not served:
                return out
