"""Recall@K (COCO 5K / Flickr30K 1K protocol) and RSUM from scores, and the helpers the metrics share.

Pure tensor code, no model: :mod:`dcd.retrieval.encoding` produces the scores that stream in here, and
:mod:`dcd.retrieval.rerank` re-uses the rank and recall helpers.

Protocol. ``scores`` is ``[n_images, n_texts]``; ``caption_image[t]`` is the image caption ``t``
describes (images may have any number of captions).

* image -> text (i2t, "text retrieval"): an image query is correct at K if **any** of its captions is
  among the K best-scored captions. Images without captions are left out of the i2t queries.
* text -> image (t2i, "image retrieval"): a caption query is correct at K if its image is among the
  K best-scored images.

Ties are pessimistic and independent of candidate order: the rank (0-based) of a query's best
positive is the number of **negatives scoring at least as high** as it (other positives never
count). A query is correct at K iff that rank is < K. So a constant scorer gets R@K = 0 rather than
whatever the candidate order happens to give, and two exactly tied images (e.g. binding twins
under a bag-of-words scorer) both count as wrong at R@1. Results are percentages;
``rsum`` is the sum of all R@K.

Memory. :class:`RecallAccumulator` needs no score matrix: per query it keeps the best positive score
and the ``max(ks)`` highest negative scores, i.e. ``(n_images + n_texts) * (max(ks) + 1)`` float64
(about 2.6 MB for COCO 5K), so a cross-encoder can feed its scores block by block in any order.
``recall_at_k`` feeds a full matrix through it in chunks of query rows; one chunk is
``chunk_size * n_texts`` scores plus a boolean mask of the same shape at a time.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_KS", "RecallAccumulator", "recall_at_k", "first_stage_ranks", "check_ks", "checked_scores",
    "recalls_from_ranks", "check_score_matrix",
]

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10)
Index = Union[slice, range, Tensor, Sequence[int]]


def check_ks(ks: Iterable[int]) -> Tuple[int, ...]:
    """The K of R@K, sorted and without repeats; each must be >= 1."""
    ks = tuple(sorted({int(k) for k in ks}))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def _as_index(index: Optional[Index], size: int, what: str) -> Tensor:
    if index is None:
        return torch.arange(size)
    if isinstance(index, slice):
        return torch.arange(*index.indices(size))
    if isinstance(index, range):
        out = torch.as_tensor(list(index), dtype=torch.long)
    else:
        out = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
    if len(out) and (int(out.min()) < 0 or int(out.max()) >= size):
        raise IndexError(f"{what} index out of range [0, {size})")
    return out


def _metric_names(ks: Sequence[int]) -> List[str]:
    return [f"i2t_r{k}" for k in ks] + [f"t2i_r{k}" for k in ks]


def checked_scores(block: Tensor) -> Tensor:
    """``block`` detached, in float32 (or wider), checked to be finite."""
    block = block.detach()
    if not block.is_floating_point() or block.dtype in (torch.float16, torch.bfloat16):
        block = block.float()
    if not torch.isfinite(block).all():
        raise ValueError("retrieval scores must be finite (found NaN or inf)")
    return block


class RecallAccumulator:
    """Recall@K from scores fed block by block, without storing the score matrix.

    Args:
        caption_image: ``LongTensor [n_texts]``, the image of each caption.
        num_images: number of images (default: ``max(caption_image) + 1``).
        ks: the K of R@K.

    Feed every (image, text) score exactly once, in blocks of any shape and order::

        acc = RecallAccumulator(split.caption_image_tensor(), split.num_images)
        for img_slice, txt_slice in blocks:
            acc.add_block(img_slice, txt_slice, model.score(images[img_slice], texts[txt_slice]))
        metrics = acc.compute()

    ``compute`` checks that every image row received ``n_texts`` scores and every text column
    ``n_images`` scores (it cannot detect a block given twice *and* another missing with the same
    per-row and per-column counts).
    """

    def __init__(self, caption_image: Union[Tensor, Sequence[int]], num_images: Optional[int] = None,
                 ks: Iterable[int] = DEFAULT_KS):
        caption_image = torch.as_tensor(caption_image, dtype=torch.long).reshape(-1).cpu()
        if len(caption_image) == 0:
            raise ValueError("caption_image is empty: no captions to evaluate")
        if num_images is None:
            num_images = int(caption_image.max()) + 1
        if int(caption_image.min()) < 0 or int(caption_image.max()) >= num_images:
            raise ValueError(f"caption_image values must lie in [0, {num_images})")
        self.ks = check_ks(ks)
        self.kmax = self.ks[-1]
        self.caption_image = caption_image
        self.num_images = int(num_images)
        self.num_texts = len(caption_image)
        neg_inf = float("-inf")
        self.image_pos = torch.full((self.num_images,), neg_inf, dtype=torch.float64)
        self.image_neg = torch.full((self.num_images, self.kmax), neg_inf, dtype=torch.float64)
        self.text_pos = torch.full((self.num_texts,), neg_inf, dtype=torch.float64)
        self.text_neg = torch.full((self.num_texts, self.kmax), neg_inf, dtype=torch.float64)
        self.image_seen = torch.zeros(self.num_images, dtype=torch.long)
        self.text_seen = torch.zeros(self.num_texts, dtype=torch.long)
        self.has_caption = torch.zeros(self.num_images, dtype=torch.bool)
        self.has_caption[caption_image] = True

    def add_block(self, image_index: Optional[Index], text_index: Optional[Index], scores: Tensor) -> None:
        """Scores ``[len(image_index), len(text_index)]`` of images ``image_index`` x texts ``text_index``.

        Indices are slices, ranges, index lists or LongTensors (``None`` = all); no index may repeat
        within one block.
        """
        img = _as_index(image_index, self.num_images, "image")
        txt = _as_index(text_index, self.num_texts, "text")
        if scores.dim() != 2 or tuple(scores.shape) != (len(img), len(txt)):
            raise ValueError(f"block scores have shape {tuple(scores.shape)}, expected ({len(img)}, {len(txt)})")
        if len(img) == 0 or len(txt) == 0:
            return
        if len(torch.unique(img)) != len(img) or len(torch.unique(txt)) != len(txt):
            raise ValueError("an image or text index repeats within one block")
        s = checked_scores(scores)
        device = s.device
        positive = self.caption_image[txt].to(device)[None, :] == img.to(device)[:, None]  # [bi, bt]
        neg_inf = float("-inf")
        negatives = s.masked_fill(positive, neg_inf)
        positives = s.masked_fill(~positive, neg_inf)
        # image queries (rows)
        top = negatives.topk(min(self.kmax, len(txt)), dim=1).values.double().cpu()
        self.image_neg[img] = torch.cat([self.image_neg[img], top], 1).topk(self.kmax, dim=1).values
        self.image_pos[img] = torch.maximum(self.image_pos[img], positives.amax(1).double().cpu())
        # text queries (columns)
        top = negatives.topk(min(self.kmax, len(img)), dim=0).values.t().double().cpu()
        self.text_neg[txt] = torch.cat([self.text_neg[txt], top], 1).topk(self.kmax, dim=1).values
        self.text_pos[txt] = torch.maximum(self.text_pos[txt], positives.amax(0).double().cpu())
        self.image_seen[img] += len(txt)
        self.text_seen[txt] += len(img)

    def add_rows(self, start: int, scores: Tensor) -> None:
        """Rows ``start : start + len(scores)`` of the matrix, all texts."""
        self.add_block(slice(start, start + scores.shape[0]), None, scores)

    def _check_complete(self) -> None:
        bad_rows = (self.image_seen != self.num_texts).nonzero().flatten()
        bad_cols = (self.text_seen != self.num_images).nonzero().flatten()
        if len(bad_rows) or len(bad_cols):
            raise ValueError(
                f"scores do not cover the {self.num_images} x {self.num_texts} matrix exactly once: "
                f"{len(bad_rows)} image rows (first {bad_rows[:5].tolist()}) and {len(bad_cols)} text columns "
                f"(first {bad_cols[:5].tolist()}) have missing or repeated scores"
            )

    def capped_ranks(self) -> Tuple[Tensor, Tensor]:
        """0-based pessimistic ranks of each query's best positive, capped at ``max(ks)``.

        Returns ``(i2t [n_images], t2i [n_texts])``; i2t is -1 for images without captions.
        """
        i2t = (self.image_neg >= self.image_pos[:, None]).sum(1)
        i2t[~self.has_caption] = -1
        t2i = (self.text_neg >= self.text_pos[:, None]).sum(1)
        return i2t, t2i

    def compute(self, check: bool = True) -> Dict[str, float]:
        """``{"i2t_r1", ..., "t2i_r10", "rsum"}`` in percent."""
        if check:
            self._check_complete()
        i2t, t2i = self.capped_ranks()
        return recalls_from_ranks(i2t[self.has_caption], t2i, self.ks)


def recalls_from_ranks(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int]) -> Dict[str, float]:
    """R@K (percent) and ``rsum`` from the 0-based pessimistic ranks of the i2t and t2i queries."""
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_ranks < k).double().mean()) if len(i2t_ranks) else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_ranks < k).double().mean())
    out["rsum"] = sum(out[name] for name in _metric_names(ks))
    return out


def check_score_matrix(scores: Tensor, caption_image: Union[Tensor, Sequence[int]]) -> Tensor:
    """``caption_image`` as a CPU LongTensor, checked against ``scores [n_images, n_texts]``."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be [n_images, n_texts], got shape {tuple(scores.shape)}")
    caption_image = torch.as_tensor(caption_image, dtype=torch.long).reshape(-1).cpu()
    if len(caption_image) != scores.shape[1]:
        raise ValueError(f"scores have {scores.shape[1]} text columns but caption_image has {len(caption_image)} "
                         "entries")
    return caption_image


def recall_at_k(scores: Tensor, caption_image: Union[Tensor, Sequence[int]], ks: Iterable[int] = DEFAULT_KS,
                chunk_size: int = 256) -> Dict[str, float]:
    """R@K of a full score matrix ``[n_images, n_texts]`` (see the module doc for protocol and ties).

    Processed ``chunk_size`` image rows at a time; returns ``{"i2t_r1", "i2t_r5", "i2t_r10",
    "t2i_r1", "t2i_r5", "t2i_r10", "rsum"}`` (percent) for the default ``ks``.
    """
    caption_image = check_score_matrix(scores, caption_image)
    acc = RecallAccumulator(caption_image, scores.shape[0], ks)
    for start in range(0, scores.shape[0], max(1, chunk_size)):
        acc.add_rows(start, scores[start:start + chunk_size])
    return acc.compute()


def first_stage_ranks(scores: Tensor, caption_image: Union[Tensor, Sequence[int]], cap: int,
                      chunk_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Pessimistic ranks capped at ``cap`` (i2t -1 for images without captions) of a full matrix."""
    caption_image = check_score_matrix(scores, caption_image)
    acc = RecallAccumulator(caption_image, scores.shape[0], ks=(cap,))
    for start in range(0, scores.shape[0], max(1, chunk_size)):
        acc.add_rows(start, scores[start:start + chunk_size])
    return acc.capped_ranks()
