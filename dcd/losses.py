"""DCD's loss terms, each returned **per sample** so the dynamic weights can act on them.

Score matrices are ``[B, C]``: row ``i`` is sample ``i``'s candidate set with the positive in column 0
(see :mod:`dcd.hard_negatives`).

* distillation: ``"kl"`` -- ``T^2 * KL(softmax(t/(tau*T)) || softmax(s/T))`` (Hinton, with ColBERTv2's
  teacher-side scale ``tau``: a cross-encoder's raw logits make a near one-hot target, which carries no
  more than the label); ``"mse"`` -- mean squared difference of raw logits over the candidates (the
  reference's choice); ``"margin_mse"`` -- squared difference of the margins ``positive - negative``
  (Hofstaetter et al.), free of the two models' offsets.
* self-learning: ``"ce"`` -- softmax cross-entropy with the positive as the class (METER / ViLT
  fine-tuning); ``"bce"`` -- mean binary cross-entropy, label 1 for the positive and 0 for the rest
  (the reference's choice).
* :func:`contrastive_loss`: a dual student's symmetric in-batch InfoNCE, with embeddings gathered from
  every rank (``torch.distributed.nn.functional.all_gather`` keeps the gradient) so the negatives are
  the global batch, as open_clip does.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DISTILL_LOSSES", "SELF_LOSSES", "distill_loss", "self_loss", "contrastive_loss", "gather_with_grad"]

DISTILL_LOSSES = ("kl", "mse", "margin_mse")
SELF_LOSSES = ("ce", "bce")


def distill_loss(student: Tensor, teacher: Tensor, kind: str = "kl", temperature: float = 1.0,
                 teacher_temperature: float = 1.0) -> Tensor:
    """Per-sample distillation loss ``[B]`` between student and (detached) teacher logits ``[B, C]``.

    ``teacher_temperature`` divides the teacher's logits only (KL): it sets how soft the target is.
    """
    teacher = teacher.detach().to(student.dtype)
    if kind == "kl":
        t_logp = torch.log_softmax(teacher / (teacher_temperature * temperature), dim=-1)
        s_logp = torch.log_softmax(student / temperature, dim=-1)
        return temperature ** 2 * (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    if kind == "mse":
        return ((student - teacher) ** 2).mean(-1)
    if kind == "margin_mse":
        return (((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2).mean(-1)
    raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, not {kind!r}")


def self_loss(student: Tensor, kind: str = "ce", keep: Optional[Tensor] = None) -> Tensor:
    """Per-sample ground-truth loss ``[B]``; the positive is column 0 of ``student`` ``[B, C]``.

    ``keep`` (bool ``[B, C]``, optional): candidates that count; the others (false negatives) are left out.
    """
    if keep is not None:
        keep = keep.clone()
        keep[:, 0] = True
    if kind == "ce":
        logits = student if keep is None else student.masked_fill(~keep, float("-inf"))
        return -torch.log_softmax(logits, dim=-1)[:, 0]
    if kind == "bce":
        labels = torch.zeros_like(student)
        labels[:, 0] = 1.0
        losses = F.binary_cross_entropy_with_logits(student, labels, reduction="none")
        if keep is None:
            return losses.mean(-1)
        return (losses * keep).sum(-1) / keep.sum(-1)
    raise ValueError(f"self_loss must be one of {SELF_LOSSES}, not {kind!r}")


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank (rank order); the local slice keeps its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def contrastive_loss(image_embedding: Tensor, text_embedding: Tensor, scale: Tensor, image_ids: Tensor) -> Tensor:
    """Symmetric InfoNCE over the global batch; per local sample ``[B]``.

    Rows of the batch that show the same image (two of its captions drawn together) are all
    positives of each other: the target is uniform over them instead of a false negative.
    """
    all_images, all_texts = gather_with_grad(image_embedding), gather_with_grad(text_embedding)
    all_ids = gather_with_grad(image_ids)
    i2t = scale * image_embedding @ all_texts.t()  # [B, N]
    t2i = scale * text_embedding @ all_images.t()  # [B, N]
    targets = (image_ids[:, None] == all_ids[None, :]).float()
    targets = targets / targets.sum(-1, keepdim=True)
    loss_i2t = -(targets * torch.log_softmax(i2t, dim=-1)).sum(-1)
    loss_t2i = -(targets * torch.log_softmax(t2i, dim=-1)).sum(-1)
    return 0.5 * (loss_i2t + loss_t2i)
