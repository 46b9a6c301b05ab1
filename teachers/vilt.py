"""ViLT teacher: transformers' ``ViltForImageAndTextRetrieval`` behind the ``Scorer`` interface.

ViLT is single-stream: text and image tokens run through one transformer together, so nothing past
the embeddings can be cached per modality. What can be cached is what the official evaluation
caches too: each image's patch embedding (``visual_embed``: patch conv + interpolated position
embeddings + CLS) is computed once and reused for every caption it is paired with; captions keep
their word embeddings. ``max_image_length=-1`` keeps every valid patch, so scores are deterministic
(ViLT's random patch order does not change the text-[CLS] pooled output).

Loads hub ids (``dandelin/vilt-b32-finetuned-coco`` / ``-flickr30k``), ``save_pretrained``
directories, and the original Lightning checkpoints (``vilt_irtr_coco.ckpt``) through
:func:`convert_original_state_dict`, an explicit key map (the fused ``attn.qkv`` split into query /
key / value). Preprocessing is the official ``pixelbert`` transform: shorter side ``image_size``
(384), longer side at most 1333/800 of it, both floored to multiples of 32, mean / std 0.5;
bert-base-uncased WordPiece (the packaged ``minilm`` vocabulary is the same one), 40 tokens.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers import ViltConfig, ViltForImageAndTextRetrieval

from . import register_hook, register_teacher
from .base import Features, Inputs, Scorer
from .meter_checkpoint import CheckpointError
from .tokenizers import load_tokenizer

__all__ = ["ViLT", "convert_original_state_dict", "create_vilt", "vilt_base", "vilt_test", "vilt_tiny"]

#: original-checkpoint keys that the retrieval model does not use (ITM / MLM heads, buffers)
IGNORED_ORIGINAL = re.compile(r"^(itm_score\.|mlm_score\.|mpp_score\.|vqa_classifier\.|nlvr2_classifier\.)|position_ids$")


class _MinMaxResize:
    """Shorter side -> ``shorter``, longer side capped at ``longer``, both floored to multiples of ``divisor``."""

    def __init__(self, shorter: int, longer: int, divisor: int):
        self.shorter, self.longer, self.divisor = shorter, longer, divisor

    def __call__(self, image):
        from PIL import Image

        image = image.convert("RGB")
        w, h = image.size
        scale = self.shorter / min(w, h)
        nh, nw = (self.shorter, scale * w) if h < w else (scale * h, self.shorter)
        if max(nh, nw) > self.longer:
            factor = self.longer / max(nh, nw)
            nh, nw = nh * factor, nw * factor
        nh, nw = int(nh + 0.5), int(nw + 0.5)
        nh, nw = max(self.divisor, nh // self.divisor * self.divisor), max(self.divisor, nw // self.divisor * self.divisor)
        return image.resize((nw, nh), Image.BICUBIC)


class ViLT(Scorer):
    """A ViLT retrieval cross-encoder (``self.hf``: the transformers model)."""

    family = "vilt"
    pair_chunk = 256

    def __init__(self, model: ViltForImageAndTextRetrieval | ViltConfig, tokenizer: str = "minilm"):
        super().__init__()
        self.hf = model if isinstance(model, ViltForImageAndTextRetrieval) else ViltForImageAndTextRetrieval(model)
        self.tokenizer_name = getattr(self.hf.config, "dcd_tokenizer", tokenizer)
        self.hf.config.dcd_tokenizer = self.tokenizer_name

    @property
    def config(self) -> ViltConfig:
        return self.hf.config

    @property
    def num_fusion_layers(self) -> int:
        return self.config.num_hidden_layers

    # ----------------------------------------------------------------- preprocessing
    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    def image_transform(self, train: bool = False) -> Callable:
        from torchvision import transforms as T

        size = self.config.image_size
        divisor = max(32, self.config.patch_size) if size >= 224 else self.config.patch_size
        return T.Compose([_MinMaxResize(size, int(1333 / 800 * size), divisor), T.ToTensor(),
                          T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.config.max_position_embeddings, return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    # ----------------------------------------------------------------- per-modality part
    def encode_images(self, images: Inputs) -> Features:
        """``visual_embed`` once per image: ``tokens`` [N, 1+P, H] (CLS + patches + positions), ``mask``."""
        pixels = images["pixel_values"]
        mask = images.get("pixel_mask")
        if mask is None:
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=pixels.device)
        tokens, token_mask, _ = self.hf.vilt.embeddings.visual_embed(
            pixels, mask, max_image_length=self.config.max_image_length)
        return {"tokens": tokens, "mask": token_mask.long()}

    def encode_texts(self, texts: Inputs) -> Features:
        """Word embeddings ``tokens`` [N, L, H] and ``mask`` (positions and LayerNorm are added per pair)."""
        ids = texts["input_ids"]
        return {"tokens": self.hf.vilt.embeddings.text_embeddings.word_embeddings(ids),
                "mask": texts["attention_mask"].long()}

    # ----------------------------------------------------------------- per-pair part
    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        """The whole transformer on aligned (image i, text i) pairs -> rank logits [N]."""
        text_mask = text_features["mask"]
        length = max(1, int(text_mask.sum(1).max()))
        out = self.hf(
            inputs_embeds=text_features["tokens"][:, :length], attention_mask=text_mask[:, :length],
            token_type_ids=torch.zeros_like(text_mask[:, :length]),
            image_embeds=image_features["tokens"], pixel_mask=image_features["mask"],
        )
        return out.logits[:, 0]

    def forward_naive(self, images: Inputs, texts: Inputs) -> Tensor:
        """What the official evaluation does per pair: pixels and ids straight through the HF model."""
        return self.hf(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                       token_type_ids=torch.zeros_like(texts["input_ids"]), pixel_values=images["pixel_values"],
                       pixel_mask=images.get("pixel_mask")).logits[:, 0]

    def score_naive(self, images: Inputs, texts: Inputs) -> Tensor:
        """Full matrix by running the whole model on every (image, text) pair, nothing cached."""
        n_img, n_txt = images["pixel_values"].shape[0], texts["input_ids"].shape[0]
        rows = []
        for i in range(n_img):
            expanded = {k: v[i:i + 1].expand(n_txt, *v.shape[1:]) for k, v in images.items()}
            rows.append(self.forward_naive(expanded, texts))
        return torch.stack(rows)

    # ----------------------------------------------------------------- students and files
    def shrink(self, layers: Sequence[int]) -> "ViLT":
        """A deep copy keeping only encoder ``layers`` (a shallower ViLT for the fusion student)."""
        layers = tuple(int(i) for i in layers)
        if not layers or any(not 0 <= i < self.num_fusion_layers for i in layers):
            raise ValueError(f"layers {layers} must be indices of the {self.num_fusion_layers} ViLT layers")
        small = copy.deepcopy(self)
        small.hf.vilt.encoder.layer = nn.ModuleList([small.hf.vilt.encoder.layer[i] for i in layers])
        small.hf.config.num_hidden_layers = len(layers)
        return small

    def save_pretrained(self, directory: str | Path) -> Path:
        """transformers format (config.json + model.safetensors): loadable by HF and by :func:`create_vilt`."""
        self.hf.save_pretrained(str(directory))
        return Path(directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> "ViLT":
        return cls(ViltForImageAndTextRetrieval.from_pretrained(str(directory), **kwargs))


# --------------------------------------------------------------------------------------------- presets
def _config(**fields) -> ViltConfig:
    return ViltConfig(max_position_embeddings=40, max_image_length=-1, **fields)


PRESETS: Dict[str, Dict] = {
    "base": dict(image_size=384, patch_size=32),  # dandelin/vilt-b32: 768 wide, 12 layers
    "tiny": dict(image_size=64, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512),
    "test": dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
}


def vilt_base(**overrides) -> ViLT:
    """Official sizes (ViT-B/32 at 384, 12 layers, 768 wide), random weights."""
    return ViLT(_config(**{**PRESETS["base"], **overrides}))


def vilt_tiny(**overrides) -> ViLT:
    """The embedded default's size: 64 px, patch 8, 4 layers of width 128."""
    return ViLT(_config(**{**PRESETS["tiny"], **overrides}))


def vilt_test(**overrides) -> ViLT:
    """Unit-test size: 32 px, patch 16, 2 layers of width 32."""
    return ViLT(_config(**{**PRESETS["test"], **overrides}))


# --------------------------------------------------------------------------------------------- checkpoints
_LAYER_MAP = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
_DIRECT_MAP = {
    "token_type_embeddings.weight": "vilt.embeddings.token_type_embeddings.weight",
    "transformer.cls_token": "vilt.embeddings.cls_token",
    "transformer.pos_embed": "vilt.embeddings.position_embeddings",
    "transformer.patch_embed.proj.weight": "vilt.embeddings.patch_embeddings.projection.weight",
    "transformer.patch_embed.proj.bias": "vilt.embeddings.patch_embeddings.projection.bias",
    "transformer.norm.weight": "vilt.layernorm.weight", "transformer.norm.bias": "vilt.layernorm.bias",
    "pooler.dense.weight": "vilt.pooler.dense.weight", "pooler.dense.bias": "vilt.pooler.dense.bias",
    "rank_output.weight": "rank_output.weight", "rank_output.bias": "rank_output.bias",
}


def convert_original_state_dict(state: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Original ViLT names -> transformers names; returns the converted dict and the unmapped keys."""
    out: Dict[str, Tensor] = {}
    unmapped: List[str] = []
    for key, value in state.items():
        if IGNORED_ORIGINAL.search(key):
            continue
        if key in _DIRECT_MAP:
            out[_DIRECT_MAP[key]] = value
        elif key.startswith("text_embeddings."):
            out["vilt.embeddings." + key] = value
        elif (m := re.match(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$", key)):
            layer, module, kind = m.groups()
            prefix = f"vilt.encoder.layer.{layer}."
            if module == "attn.qkv":
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
            elif module in _LAYER_MAP:
                out[f"{prefix}{_LAYER_MAP[module]}.{kind}"] = value
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    return out, unmapped


def load_original_checkpoint(path: str | Path, trusted: bool = False, **overrides) -> ViLT:
    """A ViLT Lightning ``.ckpt`` (``state_dict`` with the original names) -> :class:`ViLT`."""
    path = Path(path)
    raw = torch.load(path, map_location="cpu", weights_only=not trusted)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a Lightning checkpoint with a 'state_dict' mapping")
    converted, unmapped = convert_original_state_dict(state)
    if unmapped:
        raise CheckpointError(f"{path}: unexpected keys not in ViLT's key map: {sorted(unmapped)[:10]}")
    layers = 1 + max((int(m.group(1)) for k in converted if (m := re.match(r"vilt\.encoder\.layer\.(\d+)\.", k))),
                     default=-1)
    hidden = converted["vilt.embeddings.cls_token"].shape[-1] if "vilt.embeddings.cls_token" in converted else 768
    fields = {**PRESETS["base"], "num_hidden_layers": layers or 12, "hidden_size": hidden,
              "num_attention_heads": max(1, hidden // 64)}
    model = ViLT(_config(**{**fields, **overrides}))
    missing = sorted(set(model.hf.state_dict()) - set(converted))
    if missing:
        raise CheckpointError(f"{path}: missing ViLT keys (after the key map): {missing[:10]}")
    model.hf.load_state_dict(converted, strict=True)
    return model


@register_teacher("vilt")
def create_vilt(checkpoint: Optional[str | Path] = None, config: Optional[ViltConfig | Dict] = None,
                preset: str = "base", trusted: bool = False, **overrides) -> ViLT:
    """Build a ViLT (trainable; ``create_teacher`` wraps it frozen).

    Args:
        checkpoint: a hub id (``dandelin/vilt-b32-finetuned-coco``), a ``save_pretrained`` directory,
            an original Lightning ``.ckpt``, or None for random weights of ``preset``.
        config: a ``ViltConfig`` or dict instead of the preset.
        trusted: allow a ``.ckpt`` holding arbitrary pickled objects (``weights_only=False``).
        overrides: ``ViltConfig`` fields.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_file():
            return load_original_checkpoint(path, trusted=trusted, **overrides)
        return ViLT(ViltForImageAndTextRetrieval.from_pretrained(str(checkpoint), **overrides))
    if config is not None:
        config = ViltConfig(**config) if isinstance(config, dict) else config
        for key, value in overrides.items():
            setattr(config, key, value)
        return ViLT(config)
    if preset not in PRESETS:
        raise ValueError(f"unknown ViLT preset {preset!r}; presets: {sorted(PRESETS)}")
    return ViLT(_config(**{**PRESETS[preset], **overrides}))


@register_hook(ViltForImageAndTextRetrieval)
def _wrap_hf_vilt(model: ViltForImageAndTextRetrieval) -> ViLT:
    """``dcd.wrap(ViltForImageAndTextRetrieval.from_pretrained(...), student)`` works as is."""
    return ViLT(model)
