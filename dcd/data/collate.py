"""Batch collation that leaves preprocessing to the models.

``collate_train(models)`` builds, for every model of a distillation pair (teacher, student...), that
model's image batch (``model.collate_images``: its own padding / pixel mask) and text batch
(``model.tokenize``: its own tokenizer, padded per batch). The data layer knows no resolution,
normalisation or vocabulary.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch

__all__ = ["collate_train", "TrainCollator"]


class TrainCollator:
    """Picklable collate function (a class, not a closure) for :class:`~dcd.data.TrainPairs` items.

    Returns ``{"images": {name: model.collate_images([...])}, "texts": {name: model.tokenize(captions)},
    "captions": list[str], "image_index": LongTensor[B], "caption_index": LongTensor[B]}``.

    Note: with ``DataLoader(num_workers > 0)`` the collator, and so the models it holds, is sent to
    the worker processes (free with the default ``fork`` start method on Linux).
    """

    def __init__(self, models: Mapping[str, Any]):
        if not models:
            raise ValueError("collate_train needs at least one model")
        self.models = dict(models)

    def __call__(self, items: List[Dict[str, Any]]) -> Dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        captions = [item["caption"] for item in items]
        images: Dict[str, Any] = {}
        for name, model in self.models.items():
            if name not in items[0]["images"]:
                raise KeyError(
                    f"collate_train: no image transformed for model {name!r}; the dataset's transforms are "
                    f"{sorted(items[0]['images'])} (give TrainPairs a transform per model name)"
                )
            images[name] = model.collate_images([item["images"][name] for item in items])
        return {
            "images": images,
            "texts": {name: model.tokenize(captions) for name, model in self.models.items()},
            "captions": captions,
            "image_index": torch.tensor([item["image_index"] for item in items], dtype=torch.long),
            "caption_index": torch.tensor([item["caption_index"] for item in items], dtype=torch.long),
        }


def collate_train(models: Mapping[str, Any]) -> TrainCollator:
    """Collate function for training batches: ``{name: Scorer}`` -> :class:`TrainCollator`."""
    return TrainCollator(models)
