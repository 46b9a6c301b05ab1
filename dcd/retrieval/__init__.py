"""Image-text retrieval evaluation: recall@K (COCO 5K / Flickr30K 1K protocol), score matrices for any
``Scorer``, and retrieve-then-rerank.

A package of three modules, re-exported here so that ``from dcd import retrieval; retrieval.evaluate(...)``
and ``from dcd.retrieval import X`` keep working:

* :mod:`~dcd.retrieval.metrics`: recall@K and RSUM from scores (protocol and ties are documented there);
* :mod:`~dcd.retrieval.encoding`: encoding images and texts, score matrices, exhaustive evaluation,
  pair-scoring functions;
* :mod:`~dcd.retrieval.rerank`: retrieve-then-rerank evaluation.
"""
from __future__ import annotations

from .encoding import (BlockFn, PairFn, encode_images, encode_texts, eval_images, evaluate, score_feature_blocks,
                       score_matrix, scorer_pair_fn)
from .metrics import DEFAULT_KS, RecallAccumulator, first_stage_ranks, recall_at_k
from .rerank import evaluate_rerank, rerank, rerank_with_scorer

__all__ = [
    "DEFAULT_KS", "RecallAccumulator", "recall_at_k", "encode_images", "encode_texts", "score_matrix",
    "evaluate", "rerank", "rerank_with_scorer", "scorer_pair_fn", "evaluate_rerank",
    "first_stage_ranks", "score_feature_blocks", "eval_images", "BlockFn", "PairFn",
]
