"""Teacher-estimated hard negatives: keep the positive and the k negatives the teacher scores highest.

``select_hard(teacher_scores, k)`` returns column indices ``[B, 1 + k]``: column 0 (the positive)
first, then the k hardest negatives in the teacher's order. Apply the **same** indices to the teacher's
and the student's score matrices (:func:`gather`) so that column j of both refers to the same
candidate. The reference gathers the teacher with its sorted top-(k+1) and the student with
``[0, n_1..n_k]``; the two disagree whenever the teacher does not rank the positive first.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["select_hard", "gather"]


def select_hard(teacher_scores: Tensor, k: int) -> Tensor:
    """Indices ``[B, 1 + k]`` into ``teacher_scores`` ``[B, 1 + K]`` (positive in column 0)."""
    num_negatives = teacher_scores.shape[1] - 1
    if not 0 < k <= num_negatives:
        raise ValueError(f"num_hard={k} must be between 1 and the number of scored negatives ({num_negatives})")
    hardest = teacher_scores[:, 1:].detach().topk(k, dim=1).indices + 1
    positive = torch.zeros_like(hardest[:, :1])
    return torch.cat([positive, hardest], dim=1)


def gather(values: Tensor, index: Tensor) -> Tensor:
    """``values[i, index[i, j]]``: the chosen candidates of each row, in the chosen order."""
    return values.gather(1, index)
