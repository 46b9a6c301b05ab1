"""Retrieve-then-rerank evaluation: a first stage's full score matrix picks each query's top ``k``
candidates, a second stage (any pair-scoring function, e.g. a cross-encoder ``Scorer``) re-scores only
those, and recall@K follows the pessimistic protocol of :mod:`dcd.retrieval.metrics`.
"""
from __future__ import annotations

import time
from typing import Dict, Iterable, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from teachers.base import Scorer

from .encoding import PairFn, encode_images, encode_texts, eval_images, score_matrix, scorer_pair_fn
from .metrics import (DEFAULT_KS, check_ks, check_score_matrix, checked_scores, first_stage_ranks, recall_at_k,
                      recalls_from_ranks)

__all__ = ["rerank", "rerank_with_scorer", "evaluate_rerank"]


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
        values[start:start + len(i)] = checked_scores(out).double().cpu()
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
    caption_image = check_score_matrix(first_stage_scores, caption_image)
    ks = check_ks(ks)
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
    return recalls_from_ranks(i2t[has_caption], t2i, ks)


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
        scores = score_matrix(first_stage, eval_images(first_stage, split, batch_size, num_workers),
                              split.captions, batch_size, text_batch_size, device, progress, num_workers)
        caption_image = split.caption_image_tensor()
        first = recall_at_k(scores, caption_image, ks)
        img_f = encode_images(second_stage, eval_images(second_stage, split, batch_size, num_workers),
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
