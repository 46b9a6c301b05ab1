"""Scores of any ``Scorer``: encoding images and texts, the evaluation image set of a split, full score
matrices, exhaustive recall@K evaluation (:func:`evaluate`) and pair-scoring functions for re-ranking.

Everything here runs a model; the metrics themselves are in :mod:`dcd.retrieval.metrics`.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from teachers.base import Features, Inputs, Scorer, concat, num_items, select, to_device

from .metrics import DEFAULT_KS, RecallAccumulator

__all__ = [
    "encode_images", "encode_texts", "score_feature_blocks", "score_matrix", "eval_images", "evaluate",
    "scorer_pair_fn", "BlockFn", "PairFn",
]


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


def eval_images(model: Scorer, split, batch_size: int, num_workers: int):
    from ..data import EvalImages

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
    from ..binding import binding_accumulator

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

        score_matrix(model, eval_images(model, split, batch_size, num_workers), split.captions, batch_size,
                     text_batch_size, device, progress, num_workers, offload, on_block=add_block,
                     return_matrix=False)
        metrics: Dict[str, float] = {}
        for accumulator in accumulators:
            metrics.update(accumulator.compute())
    finally:
        model.train(was_training)
    metrics["elapsed_s"] = time.perf_counter() - started
    return metrics


PairFn = Callable[[Tensor, Tensor], Tensor]


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
