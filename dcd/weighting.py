"""Dynamic weighting: how much each sample learns from the teacher versus from its own labels.

For sample i of a batch, with the teacher's logits over its candidate set (positive + hard negatives)::

    p_i   = softmax(teacher_logits_i / T)           teacher's belief over the candidates
    H_i   = -sum_j p_ij log p_ij                    its uncertainty
    w_i   = H_i / sum_k H_k                         entropy share, sums to 1 over the batch
    u_i   = H_i / log C                             entropy normalised by its maximum (C candidates), in [0, 1]
    r_i   = softmax_i((1 - u_i) ** 2)               sums to 1 over the batch

    L = alpha * sum_i r_i * L_distill_i + (1 - alpha) * sum_i w_i * L_self_i

A sample the teacher is unsure about (high entropy) leans on the ground truth (large w_i); one the
teacher is confident about leans on imitation (large r_i). Unlike the reference code, where the
distillation MSE is averaged over the batch before ``r`` multiplies it (so ``r`` has no effect), both
weights here multiply per-sample losses. The reference feeds the batch share ``w_i`` (about 1/B) into
``r``; then ``(1 - w_i)^2`` is the same for every sample and ``r`` is uniform (measured: ``r*B`` within
0.97-1.02 at B = 32). ``u_i`` keeps the formula's intent with a scale that does not vanish with the
batch size: a confident sample (``u = 0``) gets up to ``e`` times the distillation weight of a
maximally uncertain one (``u = 1``). ``alpha`` may follow a schedule over training
(:class:`AlphaSchedule`).

The paper's weights read the teacher only. :func:`gap_weights` and :func:`gap_alpha` (``weighting="gap"``,
``alpha_schedule="gap"``) follow what the *student* has yet to learn instead, from the per-sample losses of the
step itself (no gradient through the weights)::

    r_i = KL_i / sum_k KL_k          distillation weight: where the student is furthest from the teacher
    w_i = CE_i / sum_k CE_k          self-learning weight: where its own labels still disagree with it
    alpha = clamp(mean KL / (mean KL + mean CE), alpha_end, alpha)

so a sample the student already imitates gives way to one it does not, and the distillation share of the loss
shrinks as the student catches up with the teacher (issue 27: the paper's two parts had not been shown to help).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["AlphaSchedule", "entropy_share", "normalised_entropy", "distill_weights", "dynamic_weights",
           "uniform_weights", "gap_weights", "gap_alpha", "WEIGHTINGS"]

#: what sets the per-sample weights: the teacher's entropy (the paper) or the student's per-sample losses
WEIGHTINGS = ("entropy", "gap")


def entropy_share(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``w_i = H_i / sum_k H_k`` from ``teacher_logits`` [B, C]; uniform if every entropy is zero."""
    logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    total = entropy.sum()
    if total <= 0:
        return uniform_weights(teacher_logits.shape[0], teacher_logits.device)
    return entropy / total


def normalised_entropy(teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``u_i = H_i / log C`` in [0, 1] from ``teacher_logits`` [B, C]."""
    logp = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy / math.log(max(teacher_logits.shape[1], 2))


def distill_weights(u: Tensor) -> Tensor:
    """``r_i = softmax_i((1 - u_i)^2)``: the distillation weight of each sample."""
    return torch.softmax((1.0 - u) ** 2, dim=0)


def uniform_weights(batch: int, device=None) -> Tensor:
    return torch.full((batch,), 1.0 / batch, device=device)


def dynamic_weights(teacher_logits: Tensor, temperature: float = 1.0) -> Tuple[Tensor, Tensor]:
    """``(w, r)``: self-learning and distillation weights of each sample (both sum to 1, no gradient)."""
    w = entropy_share(teacher_logits, temperature)
    return w, distill_weights(normalised_entropy(teacher_logits, temperature))


def _share(values: Tensor) -> Tensor:
    values = values.detach().float().clamp(min=0.0)
    total = values.sum()
    if not torch.isfinite(total) or total <= 0:
        return uniform_weights(values.shape[0], values.device)
    return values / total


def gap_weights(self_losses: Tensor, distill_losses: Tensor) -> Tuple[Tensor, Tensor]:
    """``(w, r)`` from the student's per-sample self-learning and distillation losses [B] (both sum to 1)."""
    return _share(self_losses), _share(distill_losses)


def gap_alpha(distill: Tensor, self_learning: Tensor, high: float, low: float) -> float:
    """The distillation share of the loss from how far the student is from the teacher (``distill``, its mean
    KL) against how far from its labels (``self_learning``), kept within ``[low, high]``."""
    low, high = min(low, high), max(low, high)
    d, s = float(distill.detach()), float(self_learning.detach())
    share = d / (d + s) if d + s > 0 else high
    return min(max(share, low), high)


@dataclass
class AlphaSchedule:
    """``alpha`` (the distillation share of the loss) as a function of training progress in [0, 1].

    ``constant``: ``start`` throughout. ``linear`` / ``cosine``: from ``start`` to ``end`` over training.
    ``gap``: set each step from the student's losses (:func:`gap_alpha`, between ``end`` and ``start``); calling
    the schedule gives ``start``.
    """

    start: float = 0.2
    end: float = 0.2
    kind: str = "constant"

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear", "cosine", "gap"):
            raise ValueError(f"alpha_schedule must be constant, linear, cosine or gap, not {self.kind!r}")
        for name in ("start", "end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"alpha {name} must lie in [0, 1], got {getattr(self, name)}")

    def __call__(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.kind in ("constant", "gap"):
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * progress))
