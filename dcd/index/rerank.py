"""Second stage of retrieve-then-rerank on an index: a cross-encoder re-scores one query's candidates.

The re-ranker (the teacher, or the fusion student) sees the raw candidates -- image files or caption
strings -- through its own image transform and tokenizer, and scores the (query, candidate) pairs with
:func:`dcd.retrieval.score_matrix`, as the evaluation's re-ranking does.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

from teachers.base import Scorer

from .. import retrieval
from ..data import load_image

__all__ = ["rerank_scores"]


def rerank_scores(reranker: Scorer, query, query_modality: str, candidates: List[Dict], batch_size: int = 32,
                  device: Optional[torch.device | str] = None) -> np.ndarray:
    """Re-ranker logits of ``query`` (a caption, or a PIL image) with each candidate item, in order."""
    transform = reranker.image_transform(False)
    was_training = reranker.training
    reranker.eval()
    try:
        if query_modality == "texts":  # caption -> candidate images
            paths = [c["path"] for c in candidates]
            batches = (reranker.collate_images([transform(load_image(p)) for p in paths[s:s + batch_size]])
                       for s in range(0, len(paths), batch_size))
            scores = retrieval.score_matrix(reranker, batches, [query], batch_size, batch_size, device, progress=False)
            return scores[:, 0].numpy()
        assert isinstance(query, Image.Image)
        image = reranker.collate_images([transform(query)])
        captions = [c["caption"] for c in candidates]
        scores = retrieval.score_matrix(reranker, image, captions, batch_size, batch_size, device, progress=False)
        return scores[0].numpy()
    finally:
        reranker.train(was_training)
