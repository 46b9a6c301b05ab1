"""The CLIP vision transformer as METER builds it (teachers.md §A.1), with METER's parameter names.

Module tree (names are the checkpoint's, below the ``vit_model.`` prefix):

* ``visual.conv1`` Conv2d(3 -> width, patch, stride patch, no bias), ``visual.class_embedding`` [width],
  ``visual.positional_embedding`` [(image_size / patch)^2 + 1, width], ``visual.ln_pre``;
* ``visual.transformer.resblocks.{i}``: pre-LN blocks, ``attn`` (``nn.MultiheadAttention``:
  ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``ln_1``, ``mlp.c_fc`` -> QuickGELU -> ``mlp.c_proj``,
  ``ln_2``. METER builds ``layers - 1`` of CLIP's blocks, so ViT-B/16 has 11 (``resblocks.0..10``);
  ``CLIPVisualConfig.layers`` counts the blocks actually built;
* ``visual.ln_post`` applied to every token; there is no ``proj``: the output is [B, 1 + P, width].

LayerNorms compute in float32 and cast back (as CLIP does for fp16). ``interpolate_pos_embed`` resizes a
stored positional table to another grid (bicubic over the 2-D grid, class row kept), as METER does when a
checkpoint was trained at another resolution. ``load_openai_clip_visual`` fills the tower from an OpenAI
CLIP file (``ViT-B-16.pt``, TorchScript or a plain state dict) when building a METER from scratch.
"""
from __future__ import annotations

import math
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_tables import POSITION_INITS, sincos_2d

__all__ = [
    "CLIPVisionModel", "LayerNorm32", "QuickGELU", "ResidualAttentionBlock", "VisualTransformer",
    "interpolate_pos_embed", "load_openai_clip_visual",
]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32, result cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(dtype)


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = LayerNorm32(width, eps=eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(hidden, width)),
        ]))
        self.ln_2 = LayerNorm32(width, eps=eps)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, width]
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.width = width
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, mlp_ratio, eps) for _ in range(layers)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class VisualTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, eps: float = 1e-5, position_init: str = "default"):
        super().__init__()
        if position_init not in POSITION_INITS:
            raise ValueError(f"position_init must be one of {POSITION_INITS}, got {position_init!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"vision width {width} is not divisible by {heads} heads")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.position_init = position_init
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(self.grid ** 2 + 1, width))
        self.ln_pre = LayerNorm32(width, eps=eps)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, eps)
        self.ln_post = LayerNorm32(width, eps=eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP's initialisation (for random towers; checkpoints overwrite it); with ``position_init="sincos"``
        the position table starts as the fixed 2-D sin-cos table (:mod:`teachers.position_tables`)."""
        width = self.conv1.out_channels
        layers = max(1, len(self.transformer.resblocks))
        scale = width ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        if self.position_init == "sincos":
            self.positional_embedding.copy_(sincos_2d(self.grid, width))
        else:
            nn.init.normal_(self.positional_embedding, std=scale)
        proj_std = scale * (2 * layers) ** -0.5
        fc_std = (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=scale)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    @property
    def num_tokens(self) -> int:
        return self.grid ** 2 + 1

    def forward(self, pixel_values: Tensor) -> Tensor:
        """[B, 3, image_size, image_size] -> [B, 1 + grid^2, width] (ln_post on every token)."""
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel_values of shape [B, 3, H, W], got {tuple(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"this CLIP tower takes {self.image_size}x{self.image_size} images (its positional table is "
                f"{self.grid}x{self.grid} patches of {self.patch_size}); got {h}x{w}: use the model's image_transform"
            )
        x = self.conv1(pixel_values.to(self.conv1.weight.dtype))  # [B, width, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        x = self.transformer(x)
        return self.ln_post(x)


class CLIPVisionModel(nn.Module):
    """``vit_model``: METER's trimmed CLIP, holding only ``visual`` (the text-tower leftovers are not built)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 mlp_ratio: float = 4.0, eps: float = 1e-5, position_init: str = "default"):
        super().__init__()
        self.visual = VisualTransformer(image_size, patch_size, width, layers, heads, mlp_ratio, eps, position_init)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.visual(pixel_values)


def interpolate_pos_embed(pos: Tensor, num_tokens: int) -> Tensor:
    """Resize a [1 + g^2, D] (or [1, 1 + g^2, D]) positional table to ``num_tokens`` rows.

    The class row is kept; the g x g grid is resized bicubically (``align_corners=False``), as METER's
    ``adapt_position_encoding`` does. Identity when the sizes already match.
    """
    squeeze = pos.dim() == 2
    table = pos if squeeze else pos[0]
    if table.shape[0] == num_tokens:
        return pos
    old, new = table.shape[0] - 1, num_tokens - 1
    g_old, g_new = math.isqrt(old), math.isqrt(new)
    if g_old * g_old != old or g_new * g_new != new:
        raise ValueError(f"cannot interpolate a positional table of {table.shape[0]} rows to {num_tokens}: "
                         "both must be 1 + a square number of patches")
    dim = table.shape[1]
    grid = table[1:].float().reshape(g_old, g_old, dim).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.squeeze(0).permute(1, 2, 0).reshape(g_new * g_new, dim).to(table.dtype)
    out = torch.cat([table[:1], grid], dim=0)
    return out if squeeze else out.unsqueeze(0)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with ``code/`` and ``constants.pkl`` (``torch.save`` writes neither)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_openai_clip_visual(vit_model: CLIPVisionModel, path: str | Path) -> Dict[str, List[str]]:
    """Fill ``vit_model`` from an OpenAI CLIP file (e.g. ``ViT-B-16.pt``) the way METER does.

    Takes the ``visual.*`` entries, keeps the first ``len(resblocks)`` blocks (METER drops CLIP's last
    one), interpolates the positional table to the tower's grid, ignores ``visual.proj``. Returns
    ``{"ignored": [...]}`` with the skipped visual keys. TorchScript archives are read with
    ``torch.jit.load`` (they hold no pickled Python objects); other files with ``weights_only=True``.
    """
    path = Path(path)
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, OpenAI's files are TorchScript
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    target = vit_model.state_dict()
    picked: Dict[str, Tensor] = {}
    ignored: List[str] = []
    for key, value in state.items():
        if not key.startswith("visual."):
            continue
        if key in target:
            picked[key] = value
        else:
            ignored.append(key)
    if "visual.positional_embedding" in picked:
        picked["visual.positional_embedding"] = interpolate_pos_embed(
            picked["visual.positional_embedding"], target["visual.positional_embedding"].shape[0])
    missing = sorted(set(target) - set(picked))
    if missing:
        raise KeyError(f"{path} lacks CLIP vision weights for: {', '.join(missing[:10])}"
                       + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""))
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in picked.items()
           if tuple(v.shape) != tuple(target[k].shape)]
    if bad:
        raise ValueError(f"{path} does not fit this CLIP tower: " + "; ".join(bad[:10]))
    vit_model.load_state_dict(picked, strict=True)
    return {"ignored": ignored}
