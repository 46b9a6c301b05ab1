"""METER's co-attention layer (``BertCrossLayer``, teachers.md §A.1) and pooler, with the checkpoint's names.

One layer of one stream, post-LayerNorm BERT style:

1. self-attention over the stream (``attention.self.{query,key,value}``, ``attention.output.{dense,LayerNorm}``);
2. cross-attention: queries from step 1, keys/values from the *other* stream's layer input
   (``crossattention.self.*``, ``crossattention.output.*``), masked with the other stream's mask;
3. feed-forward ``intermediate.dense`` (gelu) -> ``output.dense`` -> dropout -> LayerNorm(+ residual).

Masks are ``bool``/``long`` [B, L] with 1 = a real token, or ``None`` for "no padding". Attention is
``F.scaled_dot_product_attention`` (scale 1/sqrt(head_dim), dropout on the probabilities in training).
``CrossAttention`` exposes its projections separately (``project_query``, ``project_key_value``,
``attend``) so that a scorer can compute the per-item parts of the first layer once (see
``METER.score_features``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BertCrossLayer", "Pooler", "activation"]


def activation(name: str):
    if name == "gelu":
        return F.gelu
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ValueError(f"unknown activation {name!r}")
    return ACT2FN[name]


def _key_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """[B, Lk] (1 = keep) -> bool [B, 1, 1, Lk] for SDPA, or None."""
    if mask is None:
        return None
    return mask.bool()[:, None, None, :]


class SelfAttention(nn.Module):
    """``*.self``: query/key/value projections and multi-head scaled dot-product attention."""

    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"fusion hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:  # [B, L, H] -> [B, heads, L, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def project_query(self, x: Tensor) -> Tensor:
        return self._split(self.query(x))

    def project_key_value(self, context: Tensor) -> Tuple[Tensor, Tensor]:
        return self._split(self.key(context)), self._split(self.value(context))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        """Split-head q [B, h, Lq, d], k/v [B, h, Lk, d] -> context [B, Lq, H]."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_key_mask(key_mask), dropout_p=self.dropout if self.training else 0.0
        )
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], self.heads * self.head_dim)

    def forward(self, x: Tensor, context: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        k, v = self.project_key_value(context)
        return self.attend(self.project_query(x), k, v, key_mask)


class SelfOutput(nn.Module):
    """``*.output``: dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, hidden: int, in_features: int, dropout: float, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    """``attention`` / ``crossattention``: ``self`` (projections + attention) and ``output``."""

    def __init__(self, hidden: int, heads: int, attn_dropout: float, dropout: float, eps: float):
        super().__init__()
        self.self = SelfAttention(hidden, heads, attn_dropout)
        self.output = SelfOutput(hidden, hidden, dropout, eps)

    def forward(self, x: Tensor, context: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        return self.output(self.self(x, context, key_mask), x)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = activation(act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))


class BertCrossLayer(nn.Module):
    """One co-attention layer of one stream: self-attention, cross-attention to the other stream, FFN."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float = 0.1,
                 attn_dropout: float = 0.1, eps: float = 1e-12, act: str = "gelu"):
        super().__init__()
        self.attention = Attention(hidden, heads, attn_dropout, dropout, eps)
        self.crossattention = Attention(hidden, heads, attn_dropout, dropout, eps)
        self.intermediate = Intermediate(hidden, intermediate, act)
        self.output = SelfOutput(hidden, intermediate, dropout, eps)

    def self_attend(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        return self.attention(x, x, mask)

    def cross_and_feed_forward(self, attended: Tensor, context_out: Tensor) -> Tensor:
        """Given the cross-attention context (before ``crossattention.output``), finish the layer."""
        x = self.crossattention.output(context_out, attended)
        return self.output(self.intermediate(x), x)

    def forward(self, x: Tensor, other: Tensor, mask: Optional[Tensor], other_mask: Optional[Tensor]) -> Tensor:
        attended = self.self_attend(x, mask)
        context = self.crossattention.self(attended, other, other_mask)
        return self.cross_and_feed_forward(attended, context)


class Pooler(nn.Module):
    """``dense`` + tanh on token 0."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))
