"""Where a sample's negative candidates come from, before the teacher picks the hard ones.

* :func:`random_captions`: K captions drawn uniformly from the training corpus, never one of the
  image's own captions (the reference draws from all captions, so positives can slip in as
  "negatives").
* :func:`nearest_captions`: the student's current nearest captions to each image (a dual student's
  caption bank, refreshed every N steps by the :class:`~dcd.distiller.Distiller`); harder than random.
* :func:`neighbour_captions`: captions of the images nearest by caption words (idf-weighted word sets,
  :func:`~dcd.data.neighbour_batches.caption_neighbours`), where binding twins and near-duplicates live;
  the teacher-free analogue of BM25 negatives, fixed before training (the score cache's "near" pools).
* :func:`in_batch`: the other rows of the batch that show a different image; used for text->image
  (candidate images come from the batch, already loaded) and for image->text when no corpus is given.

All draws use the global torch RNG, which the trainer checkpoints, so a resumed run draws the same.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["random_captions", "nearest_captions", "neighbour_captions", "in_batch"]


def random_captions(image_index: Tensor, caption_image: Tensor, k: int) -> Tensor:
    """``[B, k]`` caption indices, uniform over the corpus, excluding each image's own captions."""
    image_index = image_index.to(caption_image.device)
    own = torch.bincount(caption_image, minlength=int(image_index.max()) + 1)[image_index]
    if bool((caption_image.numel() - own < k).any()):
        raise ValueError(f"cannot draw {k} negative captions: the corpus has only {caption_image.numel()} captions")
    draws = torch.randint(caption_image.numel(), (image_index.numel(), k))
    clash = caption_image[draws] == image_index[:, None]
    while bool(clash.any()):  # redraw the positives that slipped in (rare: 5 of N captions)
        draws[clash] = torch.randint(caption_image.numel(), (int(clash.sum()),))
        clash = caption_image[draws] == image_index[:, None]
    return draws


def nearest_captions(image_embedding: Tensor, caption_bank: Tensor, image_index: Tensor, caption_image: Tensor,
                     k: int) -> Tensor:
    """``[B, k]`` captions of other images with the highest student similarity to each image."""
    sims = image_embedding.detach().float() @ caption_bank.t().to(image_embedding.device).float()
    own = caption_image.to(sims.device)[None, :] == image_index.to(sims.device)[:, None]
    return sims.masked_fill(own, float("-inf")).topk(k, dim=1).indices


def neighbour_captions(split, image_index: Tensor, k: int, neighbours: int = 8) -> Tensor:
    """``[B, k]`` captions drawn (without replacement) from those of each image's ``neighbours`` nearest images."""
    from dcd.data.neighbour_batches import caption_neighbours

    near_images = caption_neighbours(split, neighbours)[image_index.cpu()]  # [B, neighbours]
    captions_of = split.image_to_captions()
    rows = []
    for images in near_images.tolist():
        pool = torch.tensor([c for i in images for c in captions_of[i]])
        if len(pool) < k:
            raise ValueError(f"{neighbours} neighbour images hold {len(pool)} captions, fewer than k={k}")
        rows.append(pool[torch.randperm(len(pool))[:k]])
    return torch.stack(rows)


def in_batch(image_index: Tensor, k: int) -> Tensor:
    """``[B, min(k, available)]`` random batch rows showing another image than row i's.

    The count is cut to the fewest other-image rows any sample has, so every row has the same width.
    """
    other = image_index[:, None] != image_index[None, :]
    available = int(other.sum(1).min())
    if available == 0:
        raise ValueError("in-batch negatives need at least two different images in the batch")
    noise = torch.rand(other.shape).to(image_index.device)
    return noise.masked_fill(~other, -1.0).topk(min(k, available), dim=1).indices
