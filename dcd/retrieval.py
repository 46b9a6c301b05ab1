"""Image-text retrieval evaluation: recall@K (COCO 5K / Flickr30K 1K protocol), score matrices for any
``Scorer``, and retrieve-then-rerank.

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

import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from teachers.base import Features, Inputs, Scorer, concat, num_items, select, to_device

__all__ = [
    "DEFAULT_KS", "RecallAccumulator", "recall_at_k", "encode_images", "encode_texts", "score_matrix",
    "evaluate", "rerank", "rerank_with_scorer", "scorer_pair_fn", "evaluate_rerank",
]

DEFAULT_KS: Tuple[int, ...] = (1, 5, 10)
Index = Union[slice, range, Tensor, Sequence[int]]


def _check_ks(ks: Iterable[int]) -> Tuple[int, ...]:
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


def _as_scores(block: Tensor) -> Tensor:
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
        self.ks = _check_ks(ks)
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
        s = _as_scores(scores)
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
        return _recalls(i2t[self.has_caption], t2i, self.ks)


def _recalls(i2t_ranks: Tensor, t2i_ranks: Tensor, ks: Sequence[int]) -> Dict[str, float]:
    out: Dict[str, float] = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * float((i2t_ranks < k).double().mean()) if len(i2t_ranks) else 0.0
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * float((t2i_ranks < k).double().mean())
    out["rsum"] = sum(out[name] for name in _metric_names(ks))
    return out


def _check_matrix(scores: Tensor, caption_image: Union[Tensor, Sequence[int]]) -> Tensor:
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
    caption_image = _check_matrix(scores, caption_image)
    acc = RecallAccumulator(caption_image, scores.shape[0], ks)
    for start in range(0, scores.shape[0], max(1, chunk_size)):
        acc.add_rows(start, scores[start:start + chunk_size])
    return acc.compute()


def first_stage_ranks(scores: Tensor, caption_image: Union[Tensor, Sequence[int]], cap: int,
                      chunk_size: int = 256) -> Tuple[Tensor, Tensor]:
    """Pessimistic ranks capped at ``cap`` (i2t -1 for images without captions) of a full matrix."""
    caption_image = _check_matrix(scores, caption_image)
    acc = RecallAccumulator(caption_image, scores.shape[0], ks=(cap,))
    for start in range(0, scores.shape[0], max(1, chunk_size)):
        acc.add_rows(start, scores[start:start + chunk_size])
    return acc.capped_ranks()


# ================================================================================= score matrices
def _batches_of_inputs(inputs: Mapping[str, Tensor], batch_size: int) -> Iterable[Inputs]:
    n = next(iter(inputs.values())).shape[0]
    for start in range(0, n, batch_size):
        yield {k: v[start:start + batch_size] for k, v in inputs.items()}


def _image_batches(model: Scorer, images, batch_size: int, num_workers: int) -> Iterable[Inputs]:
    if isinstance(images, Mapping):
        return _batches_of_inputs(images, batch_size)
    if isinstance(images, torch.utils.data.Dataset) and not isinstance(images, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                           collate_fn=model.collate_images)
    return images  # an iterable of image input batches (a DataLoader)


def _len_or_none(obj) -> Optional[int]:
    try:
        return len(obj)
    except TypeError:
        return None


def encode_images(model: Scorer, images, batch_size: int = 64, device: Union[str, torch.device, None] = None,
                  progress: bool = False, num_workers: int = 0, offload: bool = False) -> List[Features]:
    """``model.encode_images`` over all images, one feature dict per batch (in order).

    Args:
        images: image inputs ``{"pixel_values", "pixel_mask"}`` (batched here), a map-style
            ``Dataset`` of transformed image tensors (e.g. :class:`~dcd.data.EvalImages`, collated
            with ``model.collate_images``), or any iterable of image-input batches (a ``DataLoader``).
        offload: keep the features on the CPU (moved to ``device`` block by block when scoring).
    """
    device = torch.device(device) if device is not None else model.device
    batches = _image_batches(model, images, batch_size, num_workers)
    total = None
    if isinstance(images, Mapping):
        total = -(-next(iter(images.values())).shape[0] // batch_size)
    out: List[Features] = []
    with torch.inference_mode():
        for batch in tqdm(batches, total=total or _len_or_none(batches), desc="encode images", disable=not progress,
                          dynamic_ncols=True, leave=False):
            feats = model.encode_images(to_device(batch, device))
            out.append(to_device(feats, "cpu") if offload else feats)
    if not out:
        raise ValueError("encode_images: no images")
    return out


def encode_texts(model: Scorer, texts: Union[Sequence[str], Mapping[str, Tensor]], batch_size: int = 256,
                 device: Union[str, torch.device, None] = None, progress: bool = False,
                 offload: bool = False) -> List[Features]:
    """``model.encode_texts`` over all captions (tokenised per batch by ``model.tokenize``), one dict per batch."""
    device = torch.device(device) if device is not None else model.device
    if isinstance(texts, Mapping):
        batches = list(_batches_of_inputs(texts, batch_size))
    else:
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of captions, not a single string")
        texts = list(texts)
        batches = [texts[s:s + batch_size] for s in range(0, len(texts), batch_size)]
    out: List[Features] = []
    with torch.inference_mode():
        for batch in tqdm(batches, desc="encode texts", disable=not progress, dynamic_ncols=True, leave=False):
            inputs = batch if isinstance(batch, Mapping) else model.tokenize(batch)
            feats = model.encode_texts(to_device(inputs, device))
            out.append(to_device(feats, "cpu") if offload else feats)
    if not out:
        raise ValueError("encode_texts: no texts")
    return out


BlockFn = Callable[[slice, slice, Tensor], None]


def score_feature_blocks(model: Scorer, image_features: List[Features], text_features: List[Features],
                         device: Union[str, torch.device, None] = None, progress: bool = False,
                         on_block: Optional[BlockFn] = None, return_matrix: bool = True) -> Optional[Tensor]:
    """``model.score_features`` for every (image batch, text batch) pair of per-batch feature lists.

    Each block goes to ``on_block(image_slice, text_slice, scores)`` if given; the full float32
    matrix ``[n_images, n_texts]`` (on the CPU) is returned if ``return_matrix``.
    """
    device = torch.device(device) if device is not None else model.device
    img_sizes = [num_items(f) for f in image_features]
    txt_sizes = [num_items(f) for f in text_features]
    n_img, n_txt = sum(img_sizes), sum(txt_sizes)
    matrix = torch.empty(n_img, n_txt, dtype=torch.float32) if return_matrix else None
    bar = tqdm(total=len(image_features) * len(text_features), desc="score", disable=not progress,
               dynamic_ncols=True, leave=False)
    with torch.inference_mode():
        i0 = 0
        for fi, bi in zip(image_features, img_sizes):
            fi = to_device(fi, device)
            t0 = 0
            for ft, bt in zip(text_features, txt_sizes):
                block = model.score_features(fi, to_device(ft, device)).float()
                if tuple(block.shape) != (bi, bt):
                    raise ValueError(f"{type(model).__name__}.score_features returned shape {tuple(block.shape)} "
                                     f"for {bi} images x {bt} texts")
                rows, cols = slice(i0, i0 + bi), slice(t0, t0 + bt)
                if on_block is not None:
                    on_block(rows, cols, block)
                if matrix is not None:
                    matrix[rows, cols] = block.cpu()
                t0 += bt
                bar.update(1)
            i0 += bi
    bar.close()
    return matrix


def score_matrix(model: Scorer, images, texts: Union[Sequence[str], Mapping[str, Tensor]],
                 image_batch_size: int = 64, text_batch_size: int = 256,
                 device: Union[str, torch.device, None] = None, progress: bool = True, num_workers: int = 0,
                 offload: bool = False, on_block: Optional[BlockFn] = None,
                 return_matrix: bool = True) -> Optional[Tensor]:
    """Full score matrix ``[n_images, n_texts]`` (float32, CPU) of any ``Scorer``.

    Every image is encoded once (``encode_images`` in batches), every caption once
    (``encode_texts``), then ``score_features`` runs block by block (image batch x text batch) under
    ``torch.inference_mode()``. Features stay per batch, so batches of different token lengths need
    no padding. ``images``: see :func:`encode_images`; ``texts``: captions or text inputs.
    ``on_block`` / ``return_matrix=False``: stream blocks (e.g. into a :class:`RecallAccumulator`)
    without keeping the matrix. The model's train/eval mode is left as it is.
    """
    img_feats = encode_images(model, images, image_batch_size, device, progress, num_workers, offload)
    txt_feats = encode_texts(model, texts, text_batch_size, device, progress, offload)
    return score_feature_blocks(model, img_feats, txt_feats, device, progress, on_block, return_matrix)


def _eval_images(model: Scorer, split, batch_size: int, num_workers: int):
    from .data import EvalImages

    return torch.utils.data.DataLoader(EvalImages(split, model.image_transform(False)), batch_size=batch_size,
                                       shuffle=False, num_workers=num_workers, collate_fn=model.collate_images)


def evaluate(model: Scorer, split, batch_size: int = 64, text_batch_size: int = 256,
             device: Union[str, torch.device, None] = None, ks: Iterable[int] = DEFAULT_KS, num_workers: int = 0,
             progress: bool = True, offload: bool = False) -> Dict[str, float]:
    """Recall@K of ``model`` on a :class:`~dcd.data.CaptionSplit` by exhaustive scoring.

    Images go through the model's own ``image_transform(False)`` and ``collate_images``, captions
    through its ``tokenize``; scores stream into a :class:`RecallAccumulator` (no full matrix). The
    model is put in eval mode and restored afterwards. Returns the recall dict plus ``"elapsed_s"``
    (wall-clock seconds of the whole evaluation), and ``"binding"`` (:mod:`dcd.binding`) for a split
    with twin groups (the embedded set), from the same score blocks.
    """
    from .binding import binding_accumulator

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        accumulators = [RecallAccumulator(split.caption_image_tensor(), split.num_images, ks)]
        binding = binding_accumulator(split)
        accumulators += [binding] if binding is not None else []

        def add_block(rows, cols, block):
            for accumulator in accumulators:
                accumulator.add_block(rows, cols, block)

        score_matrix(model, _eval_images(model, split, batch_size, num_workers), split.captions, batch_size,
                     text_batch_size, device, progress, num_workers, offload, on_block=add_block,
                     return_matrix=False)
        metrics: Dict[str, float] = {}
        for accumulator in accumulators:
            metrics.update(accumulator.compute())
    finally:
        model.train(was_training)
    metrics["elapsed_s"] = time.perf_counter() - started
    return metrics


# ================================================================================= re-ranking
PairFn = Callable[[Tensor, Tensor], Tensor]


def _top_candidates(scores: Tensor, k: int, dim: int, chunk_size: int) -> Tensor:
    """Indices of the ``k`` best entries along ``dim`` (ties: lower index first), per query."""
    n_queries = scores.shape[1 - dim]
    out = []
    for start in range(0, n_queries, chunk_size):
        chunk = scores[start:start + chunk_size] if dim == 1 else scores[:, start:start + chunk_size].t()
        kth = chunk.topk(k, dim=1).values[:, -1:]  # the k-th best score of each query
        greater = chunk > kth
        tied = chunk == kth
        # all scores above the k-th, then the lowest-index ties until there are k
        need = k - greater.sum(1, keepdim=True)
        if bool((tied.sum(1, keepdim=True) > need).any()):
            tied = tied & (tied.cumsum(1) <= need)
        chosen = greater | tied
        out.append(chosen.nonzero()[:, 1].view(-1, k).cpu())
    return torch.cat(out)


def _score_pairs(second_stage: PairFn, img: Tensor, txt: Tensor, n_txt: int, batch_size: int,
                 progress: bool) -> Tensor:
    """Second-stage scores of the pairs ``(img[p], txt[p])``, each distinct pair scored once."""
    keys = img * n_txt + txt
    unique, inverse = torch.unique(keys, return_inverse=True)
    u_img, u_txt = unique // n_txt, unique % n_txt
    values = torch.empty(len(unique), dtype=torch.float64)
    for start in tqdm(range(0, len(unique), batch_size), desc="rerank", disable=not progress, dynamic_ncols=True,
                      leave=False):
        i, t = u_img[start:start + batch_size], u_txt[start:start + batch_size]
        out = torch.as_tensor(second_stage(i, t)).detach().reshape(-1)
        if len(out) != len(i):
            raise ValueError(f"second stage returned {len(out)} scores for {len(i)} pairs")
        values[start:start + len(i)] = _as_scores(out).double().cpu()
    return values[inverse]


def _rerank_ranks(candidates: Tensor, second: Tensor, positive: Tensor, fallback: Tensor) -> Tensor:
    """Pessimistic rank of each query's best positive after re-ranking its candidates.

    Candidates rank above all non-candidates, which keep their first-stage order; a query whose
    positives all lie outside its candidates therefore keeps its first-stage rank (``fallback``,
    which is then >= the number of candidates).
    """
    has = positive.any(1)
    best = second.masked_fill(~positive, float("-inf")).amax(1)
    inside = ((second >= best[:, None]) & ~positive).sum(1)
    return torch.where(has, inside, fallback)


def rerank(first_stage_scores: Tensor, second_stage: PairFn, caption_image: Union[Tensor, Sequence[int]],
           k: int = 16, ks: Iterable[int] = DEFAULT_KS, add_first_stage: bool = False,
           first_stage_weight: float = 1.0, pair_batch_size: int = 512, chunk_size: int = 256,
           progress: bool = False) -> Dict[str, float]:
    """Retrieve-then-rerank recall@K.

    For each image query its ``k`` best captions by ``first_stage_scores`` (ties: lower index first)
    are re-scored by ``second_stage(image_index, text_index) -> scores`` (aligned 1-D LongTensors
    of pairs, called in batches of ``pair_batch_size`` distinct pairs); for each caption query its
    ``k`` best images likewise. The re-ranked score is the second-stage logit, plus
    ``first_stage_weight *`` the first-stage score if ``add_first_stage`` (LAVIS adds the ITC
    similarity). Candidates rank above all non-candidates, which keep their first-stage order, so
    R@K for K > k is still defined. i2t recall comes from the i2t lists, t2i from the t2i lists;
    ties are pessimistic as in :func:`recall_at_k`. Only ``(n_images + n_texts) * k`` pairs (fewer
    after removing duplicates) are scored.
    """
    caption_image = _check_matrix(first_stage_scores, caption_image)
    ks = _check_ks(ks)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = first_stage_scores.detach()
    n_img, n_txt = scores.shape
    k_txt, k_img = min(k, n_txt), min(k, n_img)
    i2t_first, t2i_first = first_stage_ranks(scores, caption_image, cap=ks[-1], chunk_size=chunk_size)

    text_cands = _top_candidates(scores, k_txt, dim=1, chunk_size=chunk_size)  # [n_img, k_txt]
    image_cands = _top_candidates(scores, k_img, dim=0, chunk_size=chunk_size)  # [n_txt, k_img]
    pair_img = torch.cat([torch.arange(n_img).repeat_interleave(k_txt), image_cands.reshape(-1)])
    pair_txt = torch.cat([text_cands.reshape(-1), torch.arange(n_txt).repeat_interleave(k_img)])
    second = _score_pairs(second_stage, pair_img, pair_txt, n_txt, pair_batch_size, progress)
    if add_first_stage:
        second = second + first_stage_weight * scores.cpu()[pair_img, pair_txt].double()
    i2t_second = second[: n_img * k_txt].view(n_img, k_txt)
    t2i_second = second[n_img * k_txt:].view(n_txt, k_img)

    i2t = _rerank_ranks(text_cands, i2t_second, caption_image[text_cands] == torch.arange(n_img)[:, None], i2t_first)
    t2i = _rerank_ranks(image_cands, t2i_second, image_cands == caption_image[:, None], t2i_first)
    has_caption = torch.zeros(n_img, dtype=torch.bool)
    has_caption[caption_image] = True
    return _recalls(i2t[has_caption], t2i, ks)


def scorer_pair_fn(model: Scorer, image_features: Union[Features, List[Features]],
                   text_features: Union[Features, List[Features]],
                   device: Union[str, torch.device, None] = None) -> PairFn:
    """``(image_index, text_index) -> model.score_feature_pairs(...)`` over precomputed features.

    Per-batch feature lists are concatenated (token axes padded, ``teachers.base.concat``).
    Features may live on the CPU; the selected rows move to ``device`` (default: the model's).
    """
    img_f = concat(image_features) if isinstance(image_features, list) else image_features
    txt_f = concat(text_features) if isinstance(text_features, list) else text_features
    device = torch.device(device) if device is not None else model.device

    def pairs(image_index: Tensor, text_index: Tensor) -> Tensor:
        with torch.inference_mode():
            a = to_device(select(img_f, image_index), device)
            b = to_device(select(txt_f, text_index), device)
            return model.score_feature_pairs(a, b).float().cpu()

    return pairs


def rerank_with_scorer(first_stage_scores: Tensor, model: Scorer, image_features, text_features,
                       caption_image: Union[Tensor, Sequence[int]], k: int = 16,
                       device: Union[str, torch.device, None] = None, **kwargs) -> Dict[str, float]:
    """:func:`rerank` with a ``Scorer``'s ``score_feature_pairs`` on its precomputed features."""
    return rerank(first_stage_scores, scorer_pair_fn(model, image_features, text_features, device), caption_image,
                  k=k, **kwargs)


def evaluate_rerank(first_stage: Scorer, second_stage: Scorer, split, k: int = 16, batch_size: int = 64,
                    text_batch_size: int = 256, device: Union[str, torch.device, None] = None,
                    ks: Iterable[int] = DEFAULT_KS, add_first_stage: bool = False, num_workers: int = 0,
                    progress: bool = True, offload: bool = False) -> Dict[str, float]:
    """Retrieve with ``first_stage`` (full matrix), re-rank the top ``k`` with ``second_stage``.

    Each model sees the images through its own transform. Returns the re-ranked recall dict plus
    ``"elapsed_s"`` (everything included) and the first stage's own recall as ``"first_<name>"``.
    """
    started = time.perf_counter()
    modes = [(m, m.training) for m in (first_stage, second_stage)]
    for m, _ in modes:
        m.eval()
    try:
        scores = score_matrix(first_stage, _eval_images(first_stage, split, batch_size, num_workers),
                              split.captions, batch_size, text_batch_size, device, progress, num_workers)
        caption_image = split.caption_image_tensor()
        first = recall_at_k(scores, caption_image, ks)
        img_f = encode_images(second_stage, _eval_images(second_stage, split, batch_size, num_workers),
                              batch_size, device, progress, num_workers, offload)
        txt_f = encode_texts(second_stage, split.captions, text_batch_size, device, progress, offload)
        metrics = rerank_with_scorer(scores, second_stage, img_f, txt_f, caption_image, k=k, device=device, ks=ks,
                                     add_first_stage=add_first_stage, progress=progress)
    finally:
        for m, mode in modes:
            m.train(mode)
    metrics.update({f"first_{name}": value for name, value in first.items()})
    metrics["elapsed_s"] = time.perf_counter() - started
    return metrics
