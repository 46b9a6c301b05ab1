"""A cross-encoder's full evaluation score matrix, computed once and kept on disk.

Exhaustive cross-encoder scoring is the expensive part of every table dcd prints: on the embedded test
split (500 images x 2,500 captions) the embedded METER teacher needs about ten minutes of 2 CPU cores.
Its matrix does not change between students, seeds and ablation rows, so it is stored as
``<directory>/<split>.npy`` (float32 ``[n_images, n_texts]``; ``<split>-bf16.npy`` for a bf16 pass) beside
``<split>.json``, which names the model (weights fingerprint, scoring precision), the split (source file,
name, sizes) and holds the recall figures. A
header that does not match is recomputed, never reused.

From the matrix, recall (:func:`dcd.retrieval.recall_at_k`), binding accuracy and retrieve-then-rerank
with the cached model as second stage (:func:`rerank_with_matrix`, any ``k``, no model call) are free.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from teachers.base import Scorer
from teachers.files import save_array, write_json

from . import retrieval
from .binding import binding_accumulator
from .score_cache import scoring_precision
from .stages import weights_sha256

log = logging.getLogger(__name__)

__all__ = ["REFINE_TOP", "cached_score_matrix", "metrics_from_matrix", "plateau_k", "refine_top", "rerank_curve",
           "rerank_with_matrix", "stored_score_info"]


def _header(model: Scorer, split) -> Dict[str, Any]:
    header = {"model": weights_sha256(model), "split": split.name, "source": str(split.source),
              "num_images": split.num_images, "num_captions": split.num_captions}
    precision = scoring_precision(model)
    if precision != "fp32":  # fp32 matrices keep the header they had before precision was recorded
        header.update(precision=precision, fp32_refined_top=REFINE_TOP)
    return header


#: a low-precision exhaustive pass re-scores in fp32 each image's and each caption's best this many
REFINE_TOP = 16


def refine_top(model: Scorer, scores: Tensor, images, captions: Sequence[str], top: int = REFINE_TOP,
               device: str = "cpu") -> Tensor:
    """``scores`` (of ``images`` x ``captions``, any input :func:`dcd.retrieval.encode_images` takes) with each
    image's ``top`` best captions and each caption's ``top`` best images re-scored in fp32.

    Why: bf16 moves a trained teacher's logits by up to ~0.1 (their spread is ~3), enough to swap near-ties,
    and the embedded set is made of near-ties (binding twins): measured on 100 validation images, a plain bf16
    pass kept the fp32 top-1 of 93 % of images and 97 % of captions. Recall@1/5/10 only read the top of each
    list, so re-scoring its head in fp32 restores the fp32 ranking there; it costs ``top * (n_images +
    n_texts)`` fp32 pairs, under a tenth of the pass.
    """
    import teachers
    from teachers.base import concat

    exact = teachers.as_teacher(model, "fp32")
    n_img, n_txt = scores.shape
    k_txt, k_img = min(top, n_txt), min(top, n_img)
    rows = torch.cat([torch.arange(n_img).repeat_interleave(k_txt), scores.topk(k_img, dim=0).indices.t().reshape(-1)])
    cols = torch.cat([scores.topk(k_txt, dim=1).indices.reshape(-1), torch.arange(n_txt).repeat_interleave(k_img)])
    pairs = torch.unique(rows * n_txt + cols)
    rows, cols = pairs // n_txt, pairs % n_txt
    with torch.inference_mode():
        image_features = concat(retrieval.encode_images(exact, images, 64, device))
        text_features = concat(retrieval.encode_texts(exact, list(captions), 256, device))
        refined = exact.score_index_pairs(image_features, text_features, rows.to(device), cols.to(device)).float().cpu()
    scores = scores.clone()
    scores[rows, cols] = refined
    return scores


def _stem(model: Scorer, split) -> str:
    """The file name of ``model``'s matrix on ``split``: one per precision, so a bf16 pass never replaces fp32."""
    precision = scoring_precision(model)
    return split.name if precision == "fp32" else f"{split.name}-{precision}"


def metrics_from_matrix(scores: Tensor, split) -> Dict[str, float]:
    """Recall@K, RSUM and (on a split with twin groups) binding accuracy of a full score matrix."""
    metrics = retrieval.recall_at_k(scores, split.caption_image_tensor())
    binding = binding_accumulator(split)
    if binding is not None:
        binding.add_block(None, None, scores)
        metrics.update(binding.compute())
    return metrics


def cached_score_matrix(model: Scorer, split, directory: str | Path, device: str = "cpu",
                        progress: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """``(scores [n_images, n_texts], info)`` of ``model`` on ``split``: read from ``directory`` or computed.

    ``info`` holds the header, the metrics of :func:`metrics_from_matrix` and ``elapsed_s``, the time the
    exhaustive scoring took when it was computed (the figure a speed-up is measured against).
    """
    from .stages import stage_lock

    directory = Path(directory)
    matrix_path, info_path = directory / f"{_stem(model, split)}.npy", directory / f"{_stem(model, split)}.json"
    header = _header(model, split)
    found = _stored_scores(matrix_path, info_path, header, model, split)
    if found is not None:
        return found
    with stage_lock(matrix_path.with_suffix("")):  # a second sweep waits for the first's pass, then reads it
        found = _stored_scores(matrix_path, info_path, header, model, split)
        if found is not None:
            return found
        if info_path.is_file() and matrix_path.is_file():  # said where the pass is decided, not by each look
            log.info("scores of %s: %s was made for another model or split; recomputing", split.name, matrix_path)
        import time

        started = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            scores = retrieval.score_matrix(model, retrieval.eval_images(model, split, 64, 0), split.captions,
                                            device=device, progress=progress)
            if "fp32_refined_top" in header:
                scores = refine_top(model, scores, retrieval.eval_images(model, split, 64, 0), split.captions,
                                    header["fp32_refined_top"], device)
        finally:
            model.train(was_training)
        elapsed = time.perf_counter() - started
        info = {"header": header, "metrics": metrics_from_matrix(scores, split), "elapsed_s": round(elapsed, 2)}
        save_array(matrix_path, scores.float().numpy())
        write_json(info_path, info, indent=1, sort_keys=False, newline=False)
    return scores, info


def _stored_scores(matrix_path: Path, info_path: Path, header: Dict[str, Any], model: Scorer,
                   split) -> Optional[Tuple[Tensor, Dict[str, Any]]]:
    """The matrix and info stored for ``header``, or None (nothing stored, or stored for another model / split)."""
    if not (info_path.is_file() and matrix_path.is_file()):
        return None
    info = _stored_info(info_path, header, model)
    if info is None:
        return None
    log.info("scores of %s: reusing %s", split.name, matrix_path)
    return torch.from_numpy(np.load(matrix_path)), info


def stored_score_info(model: Scorer, split, directory: str | Path) -> Optional[Dict[str, Any]]:
    """The ``info`` :func:`cached_score_matrix` stored for ``model`` on ``split`` (metrics, time), or ``None``
    when none was stored for this model and split: a report reads it and never starts a long exhaustive pass."""
    return _stored_info(Path(directory) / f"{_stem(model, split)}.json", _header(model, split), model)


def _stored_info(info_path: Path, header: Dict[str, Any], model: Scorer) -> Optional[Dict[str, Any]]:
    """The info in ``info_path`` if it was stored under ``header`` (same model and split), else ``None``; a header
    an earlier dcd wrote (SHA-1 of the same weights) counts as the same (:mod:`dcd.migrate`)."""
    from .migrate import legacy_header_matches

    if not info_path.is_file():
        return None
    info = json.loads(info_path.read_text())
    stored = info.get("header") or {}
    return info if stored == header or legacy_header_matches(stored, header, "model", model) else None


def rerank_with_matrix(first_stage: Tensor, second_stage: Tensor, split, k: int) -> Dict[str, float]:
    """Recall of re-ranking ``first_stage``'s top ``k`` by the precomputed ``second_stage`` matrix."""
    second = second_stage.float()

    def pairs(image_index: Tensor, text_index: Tensor) -> Tensor:
        return second[image_index, text_index]

    return retrieval.rerank(first_stage, pairs, split.caption_image_tensor(), k=k)


def rerank_curve(first_stage: Tensor, second_stage, split, ks: Sequence[int]) -> Dict[int, Dict[str, float]]:
    """Recall of re-ranking the top ``k`` for every ``k`` in ``ks``; each distinct pair is scored once.

    ``second_stage(image_index, text_index) -> scores`` is called for the largest ``k``'s candidates
    only; every smaller ``k`` reads the same scores back (its candidates are a subset).
    """
    n_texts = first_stage.shape[1]
    memo: Dict[int, float] = {}

    def lookup(image_index: Tensor, text_index: Tensor) -> Tensor:
        keys = (image_index * n_texts + text_index).tolist()
        missing = [key for key in keys if key not in memo]
        if missing:
            wanted = torch.tensor(missing)
            memo.update(zip(missing, second_stage(wanted // n_texts, wanted % n_texts).double().tolist()))
        return torch.tensor([memo[key] for key in keys], dtype=torch.float64)

    caption_image = split.caption_image_tensor()
    curve = {k: retrieval.rerank(first_stage, lookup, caption_image, k=k) for k in sorted(set(ks), reverse=True)}
    return dict(sorted(curve.items()))


def plateau_k(curve: Dict[int, Dict[str, float]], tolerance: float = 0.5) -> int:
    """The smallest ``k`` whose mean R@1 (both directions) is within ``tolerance`` points of the best ``k``'s."""
    r1 = {k: 0.5 * (m["i2t_r1"] + m["t2i_r1"]) for k, m in curve.items()}
    best = max(r1.values())
    return min(k for k, value in r1.items() if value >= best - tolerance)
