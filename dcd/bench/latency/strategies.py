"""What is timed: the workloads (test-set sizes) and the strategies, each a recipe of measured stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

__all__ = ["BASELINE", "EXHAUSTIVE", "RECIPES", "STRATEGIES", "WORKLOADS", "Workload"]


@dataclass(frozen=True)
class Workload:
    name: str
    n_images: int
    n_texts: int


WORKLOADS: Dict[str, Workload] = {
    "flickr30k": Workload("Flickr30K 1K test", 1_000, 5_000),
    "coco": Workload("MS-COCO 5K test", 5_000, 25_000),
}


#: strategy id -> table label
STRATEGIES: Dict[str, str] = {
    "1_teacher_naive": "1  teacher exhaustive, naive",
    "2_teacher_cached": "2  teacher exhaustive, cached",
    "3_fusion_exhaustive": "3  fusion student exhaustive",
    "4_dual": "4  dual student + top-k",
    "5a_rerank_fusion": "5a dual top-k -> fusion student",
    "5b_rerank_teacher": "5b dual top-k -> teacher",
}


BASELINE = "1_teacher_naive"


#: what each strategy is made of: (measured stage, what it is counted per)
#:   "images" / "texts": once per gallery item; "pairs": every (image, caption) pair;
#:   "candidates": k pairs per query, both directions.
_DUAL = [("dual_image", "images"), ("dual_text", "texts"), ("similarity", "pairs")]


RECIPES: Dict[str, List[Tuple[str, str]]] = {
    "1_teacher_naive": [("naive_pair", "pairs")],
    "2_teacher_cached": [("teacher_image", "images"), ("teacher_text", "texts"), ("teacher_pair", "pairs")],
    "3_fusion_exhaustive": [("fusion_image", "images"), ("fusion_text", "texts"), ("fusion_pair", "pairs")],
    "4_dual": _DUAL,
    "5a_rerank_fusion": _DUAL + [("fusion_image", "images"), ("fusion_text", "texts"),
                                 ("fusion_rerank_pair", "candidates")],
    "5b_rerank_teacher": _DUAL + [("teacher_image", "images"), ("teacher_text", "texts"),
                                  ("teacher_rerank_pair", "candidates")],
}


EXHAUSTIVE = ("1_teacher_naive", "2_teacher_cached", "3_fusion_exhaustive")
