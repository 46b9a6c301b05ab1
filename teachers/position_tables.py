"""Fixed 2-D sine-cosine position tables: the initial image position embedding of a tower trained from scratch.

CLIP initialises its learned position table at random and HF's ViLT at zero; both start without any
notion of where a patch is, which a model trained from scratch for a few hundred steps never fully
learns (measured on the embedded set: words about layout stay unread). MAE and MoCo v3 start a ViT
from the fixed 2-D sin-cos table instead, so neighbouring patches have similar codes and "left of"
is a direction in the table from the first step; it stays learnable. Official checkpoints overwrite
it, so it only matters for towers built from scratch (the embedded default's teachers).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["POSITION_INITS", "sincos_2d"]

#: how a from-scratch image position table starts: the architecture's own init, or the fixed sin-cos table
POSITION_INITS = ("default", "sincos")


def sincos_2d(grid: int, width: int, cls_token: bool = True, temperature: float = 10000.0) -> Tensor:
    """``[grid * grid (+1), width]``: a quarter of the channels each for sin / cos of x / y (raster order).

    With ``cls_token`` a zero row comes first (the class token has no position). ``width`` must be a
    multiple of 4.
    """
    if width % 4:
        raise ValueError(f"a 2-D sin-cos table needs a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    parts = [fn(coordinate.reshape(-1, 1) * omega) for coordinate in (xs, ys) for fn in (torch.sin, torch.cos)]
    table = torch.cat(parts, dim=1).float()
    return torch.cat([table.new_zeros(1, width), table]) if cls_token else table
