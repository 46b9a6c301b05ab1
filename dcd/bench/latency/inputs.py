"""Synthetic inputs already on the device: random pixels at a model's input size, random caption token ids."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

from .settings import BenchError

__all__ = ["CAPTION_TOKENS", "image_hw", "synthetic_images", "synthetic_texts"]

CAPTION_TOKENS = (16, 20)  # synthetic caption length range, special tokens included


def _word_embedding(model: nn.Module) -> nn.Embedding:
    """The text model's token embedding: the one named *word_embeddings, else the largest Embedding."""
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise BenchError(f"{type(model).__name__} has no token embedding: cannot make synthetic captions for it")
    named = [m for n, m in embeddings if n.endswith("word_embeddings")]
    return named[0] if named else max((m for _, m in embeddings), key=lambda m: m.num_embeddings)


def synthetic_texts(model: nn.Module, n: int, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    """``n`` captions of random token ids, lengths drawn from CAPTION_TOKENS, padded to the longest."""
    emb = _word_embedding(model)
    vocab = emb.num_embeddings
    pad = emb.padding_idx if emb.padding_idx is not None else 0
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(min(5, vocab - 1), vocab, (n, width), generator=g)
    ids[ids == pad] = (pad + 1) % vocab
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def synthetic_images(hw: Tuple[int, int], n: int, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, *hw, generator=g)
    return {"pixel_values": pixels.to(device), "pixel_mask": torch.ones(n, *hw, dtype=torch.long, device=device)}


def image_hw(model: nn.Module) -> Tuple[int, int]:
    """Input resolution of the synthetic images: the model's own ``input_image_hw()`` (:mod:`teachers.base`:
    METER and dual students their configured square size; ViLT a 2:3 image, 384 x 576 at base size)."""
    try:
        return tuple(int(x) for x in model.input_image_hw())
    except (AttributeError, NotImplementedError) as err:
        raise BenchError(f"cannot tell the input resolution of a {type(model).__name__}: {err}") from None
