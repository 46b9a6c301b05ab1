"""ViLT teacher: transformers' ``ViltForImageAndTextRetrieval`` behind the ``Scorer`` interface.

Why a wrapper rather than calling the HF model per pair: ViLT is single-stream (text and image tokens
go through one transformer together), so nothing past the embeddings can be cached per modality, but
the embeddings can, as the official evaluation does. :meth:`ViLT.encode_images` runs the patch
embedding once per image (patch conv + per-image interpolated position table + CLS + modality type),
:meth:`ViLT.encode_texts` the text embeddings once per caption (word + position + type + LayerNorm +
modality type); :meth:`ViLT.score_feature_pairs` concatenates them per pair and runs the HF encoder
layers, final LayerNorm, pooler (text ``[CLS]``) and ``rank_output`` -- the same modules and arithmetic
as ``ViltForImageAndTextRetrieval.forward``. :meth:`ViLT.forward_naive` (alias ``score_pairs_naive``)
is the HF forward itself, nothing reused, for the latency benchmark and the equivalence tests.

Patch selection is deterministic here. HF's ``ViltEmbeddings.visual_embed`` draws the kept patches with
``torch.multinomial`` (a random order, and with ``max_image_length > 0`` a random subset: ViLT's training
augmentation), which consumes the global RNG. :meth:`ViLT.encode_images` keeps the valid patches in
raster order instead, padding patches after them; with ``max_image_length > 0`` and more valid patches
than that, an evenly spaced fixed subset. With the presets' ``max_image_length=-1`` every valid patch is
kept, so scores equal HF's up to float rounding (attention is permutation-equivariant, the pooled token
is the text ``[CLS]`` and padding patches are masked out).

Checkpoints: hub ids (``dandelin/vilt-b32-finetuned-coco`` / ``-flickr30k``), ``save_pretrained``
directories (HF format: ``config.json`` + ``model.safetensors``), and the original Lightning checkpoints
(``vilt_irtr_coco.ckpt``) through :func:`convert_original_state_dict`, an explicit key map (the fused
``attn.qkv`` split into query / key / value). Missing or unexpected keys raise ``CheckpointError`` naming
them (HF alone would silently random-initialise a missing ``rank_output``).

Preprocessing is the official ``pixelbert`` transform: shorter side ``image_size`` (384), longer side at
most ``int(1333 / 800 * image_size)`` (639), both floored to multiples of the patch size (32), bicubic,
mean / std 0.5; bert-base-uncased WordPiece, at most ``max_position_embeddings`` (40) tokens. The
offline default tokenizer is the packaged ``minilm`` one, whose vocabulary *is* bert-base-uncased's
(30,522 entries, lower-casing), so ids are the same as with the hub's ``bert-base-uncased``.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from transformers import ViltConfig, ViltForImageAndTextRetrieval

from . import register_hook, register_teacher
from .base import Features, Inputs, Scorer, Towers, check_layer_indices
from .meter_checkpoint import CheckpointError, read_checkpoint
from .position_tables import POSITION_INITS, sincos_2d
from .registry import Registry
from .tokenizers import load_tokenizer

__all__ = [
    "CheckpointError", "PRESETS", "ViLT", "config_from_original", "convert_original_state_dict", "create_vilt",
    "load_original_checkpoint", "original_state_dict", "vilt_preset",
]

DEFAULT_TOKENIZER = "minilm"  # the packaged bert-base-uncased WordPiece vocabulary (offline)

#: original-checkpoint keys that the retrieval model does not use (ITM / MLM / task heads, buffers)
IGNORED_ORIGINAL = re.compile(
    r"^(itm_score\.|mlm_score\.|mpp_score\.|vqa_classifier\.|nlvr2_classifier\.|snli_classifier\.)|position_ids$"
)
#: keys of a transformers-format state dict that are not parameters of the retrieval model
IGNORED_HF = re.compile(r"position_ids$|token_type_ids$")


def _listing(keys: Sequence[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


class _MinMaxResize:
    """Shorter side -> ``shorter``, longer side capped at ``longer``, both floored to multiples of ``divisor``.

    The arithmetic of the official ``vilt/transforms/utils.py`` ``MinMaxResize`` (and of HF's
    ``ViltImageProcessor.resize``): scale, ``int(x + 0.5)``, floor to the divisor, PIL bicubic.
    """

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
        d = self.divisor
        nh, nw = max(d, nh // d * d), max(d, nw // d * d)
        return image.resize((nw, nh), Image.BICUBIC)

    def __repr__(self) -> str:
        return f"MinMaxResize(shorter={self.shorter}, longer={self.longer}, divisor={self.divisor})"


def _trim(tokens: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Drop trailing token columns that are padding for every row (at least one column is kept)."""
    keep = mask.bool().any(0)
    length = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
    return tokens[:, :length], mask[:, :length]


class ViLT(Scorer):
    """A ViLT retrieval cross-encoder; ``self.hf`` is the transformers ``ViltForImageAndTextRetrieval``."""

    family = "vilt"
    pair_chunk = 128  # pairs per fused call: at base size 128 x ~280 tokens x 12 layers

    def __init__(self, model: ViltForImageAndTextRetrieval | ViltConfig, tokenizer: Optional[str] = None):
        """Wrap an HF retrieval model (or build one, random weights, from a ``ViltConfig``).

        ``tokenizer``: a :func:`teachers.tokenizers.load_tokenizer` name; default the one recorded in the
        config (``config.dcd_tokenizer``, written by :meth:`save_pretrained`), else ``"minilm"``.
        """
        super().__init__()
        built = not isinstance(model, ViltForImageAndTextRetrieval)
        self.hf = ViltForImageAndTextRetrieval(model) if built else model
        if built:
            self._init_image_positions(getattr(self.hf.config, "dcd_position_init", "default"))
        self.tokenizer_name = tokenizer or getattr(self.hf.config, "dcd_tokenizer", None) or DEFAULT_TOKENIZER
        self.hf.config.dcd_tokenizer = self.tokenizer_name

    @torch.no_grad()
    def _init_image_positions(self, how: str) -> None:
        """``config.dcd_position_init``: "default" keeps HF's all-zero image position table, "sincos" starts it
        as the fixed 2-D sin-cos table (:mod:`teachers.position_tables`); weights loaded later overwrite it."""
        if how not in POSITION_INITS:
            raise ValueError(f"dcd_position_init must be one of {POSITION_INITS}, got {how!r}")
        if how == "sincos":
            table = self.hf.vilt.embeddings.position_embeddings
            table[0].copy_(sincos_2d(self.config.image_size // self.config.patch_size, table.shape[-1]))

    @property
    def config(self) -> ViltConfig:
        return self.hf.config

    @property
    def num_fusion_layers(self) -> int:
        """Transformer blocks (every ViLT block is a fusion layer); what :meth:`shrink` selects among."""
        return len(self.hf.vilt.encoder.layer)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def input_image_hw(self) -> Tuple[int, int]:
        """A 2:3 image after :meth:`image_transform`: shorter side ``image_size``, the longer 1.5 times it
        (floored to the patch size): 384 x 576 = 12 x 18 patches at base size. ViLT takes any aspect ratio."""
        size, patch = self.config.image_size, self.config.patch_size
        return size, max(patch, size * 3 // 2 // patch * patch)

    def unimodal_towers(self) -> Towers:
        raise NotImplementedError(
            "ViLT is single-stream: it has no unimodal image or text tower to copy into a dual encoder. "
            "Build the dual student from timm / transformers towers instead, e.g. create_student('dual') "
            "or DualEncoder(DualEncoderConfig(timm_model=..., text_model=...))."
        )

    # ----------------------------------------------------------------- preprocessing
    @property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_name)

    def image_transform(self, train: bool = False) -> Callable:
        """PIL image -> [3, H, W]: the official ``pixelbert`` resize (shorter side ``image_size``, longer side
        <= 1333/800 of it, multiples of the patch size), ``ToTensor``, mean / std 0.5.

        ``train`` gives the same transform: no flips (captions say "left of"), no crops (ViLT takes any
        aspect ratio); the teacher is never trained by dcd and a fusion student sees what its teacher saw.
        """
        from torchvision import transforms as T

        size = self.config.image_size
        return T.Compose([_MinMaxResize(size, int(1333 / 800 * size), self.config.patch_size), T.ToTensor(),
                          T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        """Captions -> ``input_ids`` / ``attention_mask`` / ``token_type_ids``, padded to the longest in the
        batch, truncated to ``max_position_embeddings`` (40) tokens, ``[CLS]`` and ``[SEP]`` included."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=self.config.max_position_embeddings, return_tensors="pt")
        ids = enc["input_ids"].long()
        types = enc.get("token_type_ids")
        return {"input_ids": ids, "attention_mask": enc["attention_mask"].long(),
                "token_type_ids": types.long() if types is not None else torch.zeros_like(ids)}

    # ----------------------------------------------------------------- per-modality part
    def visual_embed(self, pixel_values: Tensor, pixel_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """HF ``ViltEmbeddings.visual_embed`` with a deterministic patch choice -> (tokens [N, 1+P, H], mask [N, 1+P]).

        Patch conv, the position table bilinearly interpolated to each image's valid patch grid, CLS
        first. Valid patches come in raster order, then (masked) padding patches; ``P`` is the largest
        valid count in the batch, capped at ``max_image_length`` when that is positive (then an evenly
        spaced fixed subset of an image's valid patches is kept).
        """
        emb = self.hf.vilt.embeddings
        if pixel_mask is None:
            pixel_mask = torch.ones(pixel_values.shape[0], *pixel_values.shape[2:], dtype=torch.long,
                                    device=pixel_values.device)
        x = emb.patch_embeddings(pixel_values)  # [N, H, gh, gw]
        n, hidden, gh, gw = x.shape
        mask = nn.functional.interpolate(pixel_mask[:, None].float(), size=(gh, gw)).long()[:, 0]  # nearest, as HF
        heights, widths = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)

        grid = self.config.image_size // self.config.patch_size
        table = emb.position_embeddings
        spatial = table[:, 1:, :].transpose(1, 2).reshape(1, hidden, grid, grid)
        pos = table.new_zeros(n, hidden, gh, gw)
        sizes = torch.stack([heights, widths], 1).tolist()
        for h, w in {tuple(s) for s in sizes}:
            if h == 0 or w == 0:
                continue
            rows = [i for i, s in enumerate(sizes) if tuple(s) == (h, w)]
            resized = nn.functional.interpolate(spatial, size=(h, w), mode="bilinear", align_corners=True)
            pos[rows, :, :h, :w] = resized[0].to(pos.dtype)

        x, pos, mask = x.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2), mask.flatten(1)
        order = torch.sort(mask, dim=1, descending=True, stable=True).indices  # valid first, raster order
        valid = mask.sum(1)
        keep = max(1, int(valid.max()))
        limit = self.config.max_image_length
        if isinstance(limit, int) and limit > 0 and keep > limit:
            keep = limit
            slots = torch.arange(keep, device=x.device)
            spaced = slots[None, :] * valid[:, None] // keep  # evenly spaced among an image's valid patches
            order = order.gather(1, torch.where(valid[:, None] > keep, spaced, slots[None, :].expand(n, -1)))
        else:
            order = order[:, :keep]
        x = x.gather(1, order[..., None].expand(-1, -1, hidden))
        pos = pos.gather(1, order[..., None].expand(-1, -1, hidden))
        mask = mask.gather(1, order)

        tokens = torch.cat([emb.cls_token.expand(n, -1, -1), x], dim=1)
        tokens = tokens + torch.cat([table[:, :1].expand(n, -1, -1), pos], dim=1)
        tokens = emb.dropout(tokens)
        return tokens, torch.cat([mask.new_ones(n, 1), mask], dim=1)

    def encode_images(self, images: Inputs) -> Features:
        """Patch embedding + image modality type, once per image: ``tokens`` [N, 1+P, H], ``mask`` [N, 1+P]."""
        if isinstance(images, Tensor):
            images = {"pixel_values": images}
        tokens, mask = self.visual_embed(images["pixel_values"], images.get("pixel_mask"))
        tokens = tokens + self.hf.vilt.embeddings.token_type_embeddings.weight[1].to(tokens.dtype)
        return {"tokens": tokens, "mask": mask}

    def encode_texts(self, texts: Inputs) -> Features:
        """Text embeddings (word + position + type, LayerNorm) + text modality type, once per caption:
        ``tokens`` [N, L, H], ``mask`` [N, L]."""
        ids = texts["input_ids"]
        emb = self.hf.vilt.embeddings
        tokens = emb.text_embeddings(input_ids=ids, token_type_ids=texts.get("token_type_ids"))
        tokens = tokens + emb.token_type_embeddings.weight[0].to(tokens.dtype)
        mask = texts.get("attention_mask")
        return {"tokens": tokens, "mask": torch.ones_like(ids) if mask is None else mask.long()}

    # ----------------------------------------------------------------- per-pair part
    def encode_sequence(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Encoder layers and the final LayerNorm over embedded tokens (padding masked) -> hidden states."""
        additive = None
        if not bool(mask.bool().all()):
            additive = (1.0 - mask[:, None, None, :].to(tokens.dtype)) * torch.finfo(tokens.dtype).min
        for layer in self.hf.vilt.encoder.layer:
            tokens = layer(tokens, additive)[0]
        return self.hf.vilt.layernorm(tokens)

    def fuse(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Encoder layers, final LayerNorm, pooler (token 0: the text ``[CLS]``) and ``rank_output`` -> logits [N]."""
        return self.hf.rank_output(self.hf.vilt.pooler(self.encode_sequence(tokens, mask)))[:, 0]

    def unimodal_summary(self, features: Features) -> Tensor:
        """One modality alone through the shared transformer -> its first token (text ``[CLS]`` / image CLS) [N, H].

        ViLT has no per-modality towers; training the embedded teacher from scratch
        (:mod:`dcd.teacher_training`) reads this for its contrastive warm-up, which trains the shared
        layers on each modality alone, as VLMo does, instead of comparing bags of embeddings.
        """
        tokens, mask = _trim(features["tokens"], features["mask"])
        return self.encode_sequence(tokens, mask)[:, 0]

    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        """Aligned pairs (image i, text i): [text tokens; image tokens] through the transformer -> logits [N]."""
        n_img, n_txt = image_features["tokens"].shape[0], text_features["tokens"].shape[0]
        if n_img != n_txt:
            raise ValueError(f"score_feature_pairs needs as many images as texts, got {n_img} and {n_txt}")
        text, text_mask = _trim(text_features["tokens"], text_features["mask"])
        image, image_mask = _trim(image_features["tokens"], image_features["mask"])
        return self.fuse(torch.cat([text, image.to(text.dtype)], dim=1),
                         torch.cat([text_mask.long(), image_mask.long()], dim=1))

    def forward(self, images: Inputs, texts: Inputs) -> Tensor:
        """Aligned pairs -> logits [N] (one call, so DDP sees every used parameter)."""
        return self.score_pairs(images, texts)

    # ----------------------------------------------------------------- naive (official evaluation)
    def forward_naive(self, images: Inputs, texts: Inputs) -> Tensor:
        """Aligned pairs straight through the HF model (pixels and ids, nothing reused) -> logits [N].

        HF's own ``visual_embed`` runs here (random patch order, global RNG), so the result equals
        :meth:`score_pairs` up to float rounding.
        """
        if isinstance(images, Tensor):
            images = {"pixel_values": images}
        pixels, ids = images["pixel_values"], texts["input_ids"]
        mask = images.get("pixel_mask")
        if mask is None:  # HF would assume image_size x image_size
            mask = torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.long, device=pixels.device)
        types = texts.get("token_type_ids")
        return self.hf(input_ids=ids, attention_mask=texts.get("attention_mask"),
                       token_type_ids=torch.zeros_like(ids) if types is None else types,
                       pixel_values=pixels, pixel_mask=mask).logits[:, 0]

    score_pairs_naive = forward_naive

    def score_naive(self, images: Inputs, texts: Inputs, text_batch: int = 64) -> Tensor:
        """[n_images, n_texts] as ViLT's ``compute_irtr_recall`` without its cache: per image, per text batch
        of ``text_batch``, the whole HF model."""
        if isinstance(images, Tensor):
            images = {"pixel_values": images}
        n_img, n_txt = images["pixel_values"].shape[0], texts["input_ids"].shape[0]
        rows = []
        for i in range(n_img):
            row = []
            for s in range(0, n_txt, text_batch):
                batch = {k: v[s:s + text_batch] for k, v in texts.items()}
                size = batch["input_ids"].shape[0]
                image = {k: v[i:i + 1].expand(size, *v.shape[1:]) for k, v in images.items()}
                row.append(self.forward_naive(image, batch))
            rows.append(torch.cat(row))
        return torch.stack(rows)

    # ----------------------------------------------------------------- students
    def shrink(self, layers: Sequence[int]) -> "ViLT":
        """A deep copy keeping only encoder blocks ``layers`` (increasing indices), for the fusion student.

        Embeddings, final LayerNorm, pooler and rank head are copied too; nothing shares storage with
        ``self``. Requires-grad flags and train / eval modes are copied as they are.
        """
        layers = check_layer_indices(layers, self.num_fusion_layers)
        encoder = self.hf.vilt.encoder
        full = encoder.layer
        encoder.layer = nn.ModuleList([full[i] for i in layers])  # copy only the kept blocks
        try:
            small = copy.deepcopy(self)
        finally:
            encoder.layer = full
        small.hf.config.num_hidden_layers = len(layers)
        return small

    # ----------------------------------------------------------------- serialisation
    def save_pretrained(self, directory: str | Path) -> Path:
        """transformers format (``config.json`` + ``model.safetensors``): loadable by HF and :func:`create_vilt`."""
        directory = Path(directory)
        self.hf.save_pretrained(str(directory))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, strict: bool = True, tokenizer: Optional[str] = None,
                        **kwargs) -> "ViLT":
        """A ``save_pretrained`` directory or a hub id (``dandelin/vilt-b32-finetuned-coco``).

        ``strict``: raise ``CheckpointError`` naming the weights the file lacks (say, ``rank_output.*`` of an
        MLM-only checkpoint) instead of HF's warning and random initialisation. ``kwargs`` go to
        ``ViltForImageAndTextRetrieval.from_pretrained`` (config fields, ``revision``, ...).
        """
        hf, info = ViltForImageAndTextRetrieval.from_pretrained(str(directory), output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", ()) if not IGNORED_HF.search(k)]
        mismatched = [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ())]
        if strict and (missing or mismatched):
            problems = [f"missing {_listing(missing)}"] if missing else []
            problems += [f"mis-shaped {_listing(mismatched)}"] if mismatched else []
            raise CheckpointError(f"{directory} does not hold a complete ViLT retrieval model: {'; '.join(problems)}")
        return cls(hf.eval(), tokenizer=tokenizer)


# --------------------------------------------------------------------------------------------- presets
def _config(**fields) -> ViltConfig:
    fields = {"max_position_embeddings": 40, "max_image_length": -1, **fields}
    return ViltConfig(**fields)


#: preset name -> ``ViltConfig`` fields
PRESETS = Registry("ViLT preset")
for _name, _fields in {
    # dandelin/vilt-b32-*: ViT-B/32 at 384, 12 layers x 768, 12 heads, BERT vocabulary, 40 text positions
    "base": dict(image_size=384, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
    # the embedded default, trained from scratch: 64 px in 16 patches of 16 px, the image position table
    # starting as the 2-D sin-cos table (HF starts it at zero); measured on the embedded validation
    # split, both made the embedded recipe learn (RSUM 101 on test before, 453 on validation after)
    "vit128x4": dict(image_size=64, patch_size=16, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 intermediate_size=512, dcd_position_init="sincos"),
    "vit32x2": dict(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
}.items():
    PRESETS.register(_name, _fields)
# the names the sizes had before they stated them (deprecated: they resolve with a warning)
PRESETS.alias("tiny", "vit128x4")
PRESETS.alias("test", "vit32x2")


def vilt_preset(name: str = "base", **overrides) -> ViLT:
    """A ViLT of preset ``name`` (:data:`PRESETS`), random weights: ``"base"`` is the official size
    (ViT-B/32 at 384, 12 layers, 768 wide), ``"vit128x4"`` the embedded teacher's, ``"vit32x2"`` unit-test size."""
    return ViLT(_config(**{**PRESETS[name], **overrides}))


# --------------------------------------------------------------------------------------------- original checkpoints
#: per-block module names: original (timm ``Block``) -> transformers ``ViltLayer``
_LAYER_MAP = {
    "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense",
}
#: everything outside the blocks and the text embeddings
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
_BLOCK_RE = re.compile(r"transformer\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_RE = re.compile(r"vilt\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def convert_original_state_dict(state: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    """Original ViLT names -> transformers names: ``(converted, unmapped keys)``.

    ``transformer.blocks.N.attn.qkv`` is split in three along its output rows (query, key, value);
    ITM / MLM / task heads and ``position_ids`` buffers are dropped; keys already in transformers naming
    (``vilt.*``: a ``pytorch_model.bin`` of the hub) pass through unchanged.
    """
    out: Dict[str, Tensor] = {}
    unmapped: List[str] = []
    for key, value in state.items():
        if IGNORED_ORIGINAL.search(key) or (key.startswith("vilt.") and IGNORED_HF.search(key)):
            continue
        if key in _DIRECT_MAP:
            out[_DIRECT_MAP[key]] = value
        elif key.startswith("vilt."):
            out[key] = value
        elif key.startswith("text_embeddings."):
            out["vilt.embeddings." + key] = value
        elif (m := _BLOCK_RE.match(key)):
            layer, module, kind = m.groups()
            prefix = f"vilt.encoder.layer.{layer}."
            if module == "attn.qkv":
                if value.shape[0] % 3:
                    unmapped.append(key)
                    continue
                for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.attention.{name}.{kind}"] = part.clone()
            elif module in _LAYER_MAP:
                out[f"{prefix}{_LAYER_MAP[module]}.{kind}"] = value
            else:
                unmapped.append(key)
        else:
            unmapped.append(key)
    return out, unmapped


def original_state_dict(hf_state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The inverse of :func:`convert_original_state_dict`: transformers names -> original ViLT names
    (``query`` / ``key`` / ``value`` fused back into ``attn.qkv``)."""
    inverse_direct = {v: k for k, v in _DIRECT_MAP.items()}
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    out: Dict[str, Tensor] = {}
    qkv: Dict[Tuple[str, str], Dict[str, Tensor]] = {}
    for key, value in hf_state.items():
        if IGNORED_HF.search(key):
            continue
        if key in inverse_direct:
            out[inverse_direct[key]] = value
        elif key.startswith("vilt.embeddings.text_embeddings."):
            out[key[len("vilt.embeddings."):]] = value
        elif (m := _HF_BLOCK_RE.match(key)):
            layer, module, kind = m.groups()
            if module.startswith("attention.attention."):
                qkv.setdefault((layer, kind), {})[module.rsplit(".", 1)[1]] = value
            elif module in inverse_layer:
                out[f"transformer.blocks.{layer}.{inverse_layer[module]}.{kind}"] = value
            else:
                raise KeyError(f"no original ViLT name for {key}")
        else:
            raise KeyError(f"no original ViLT name for {key}")
    for (layer, kind), parts in qkv.items():
        out[f"transformer.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def read_original_checkpoint(path: str | Path, trusted: bool = False) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """``(state_dict, hyper_parameters["config"])`` of a ViLT Lightning ``.ckpt``, a bare state-dict file or
    a ``.safetensors`` file (:func:`teachers.meter_checkpoint.read_checkpoint`: ``weights_only`` unless ``trusted``)."""
    state, hparams = read_checkpoint(path, trusted=trusted, family="ViLT")
    config = hparams.get("config", hparams)
    return state, dict(config) if isinstance(config, Mapping) else {}


def config_from_original(converted: Mapping[str, Tensor], hparams: Optional[Mapping[str, Any]] = None,
                         **overrides) -> ViltConfig:
    """A ``ViltConfig`` from a converted state dict's shapes (width, patch, grid, depth, MLP, vocabularies),
    ``num_heads`` / ``max_image_len`` from the Lightning ``hyper_parameters`` when present; ``overrides`` last."""
    fields: Dict[str, Any] = dict(PRESETS["base"])
    shape = lambda key: tuple(converted[key].shape) if key in converted else None  # noqa: E731
    if (cls := shape("vilt.embeddings.cls_token")) is not None:
        fields["hidden_size"] = cls[-1]
        fields["num_attention_heads"] = max(1, cls[-1] // 64)
    if (proj := shape("vilt.embeddings.patch_embeddings.projection.weight")) is not None:
        fields["patch_size"], fields["num_channels"] = proj[-1], proj[1]
    if (pos := shape("vilt.embeddings.position_embeddings")) is not None:
        grid = math.isqrt(pos[1] - 1)
        fields["image_size"] = grid * fields["patch_size"]
    layers = {int(m.group(1)) for k in converted if (m := _HF_BLOCK_RE.match(k))}
    if layers:
        fields["num_hidden_layers"] = max(layers) + 1
    if (fc1 := shape("vilt.encoder.layer.0.intermediate.dense.weight")) is not None:
        fields["intermediate_size"] = fc1[0]
    for key, field in (("vilt.embeddings.text_embeddings.word_embeddings.weight", "vocab_size"),
                       ("vilt.embeddings.text_embeddings.position_embeddings.weight", "max_position_embeddings"),
                       ("vilt.embeddings.text_embeddings.token_type_embeddings.weight", "type_vocab_size"),
                       ("vilt.embeddings.token_type_embeddings.weight", "modality_type_vocab_size")):
        if (s := shape(key)) is not None:
            fields[field] = s[0]
    if layers and "vilt.encoder.layer.0.attention.attention.query.bias" not in converted:
        fields["qkv_bias"] = False
    hparams = hparams or {}
    if isinstance(hparams.get("num_heads"), int):
        fields["num_attention_heads"] = hparams["num_heads"]
    if isinstance(hparams.get("max_image_len"), int):
        fields["max_image_length"] = hparams["max_image_len"]
    return _config(**{**fields, **overrides})


def load_original_checkpoint(path: str | Path, trusted: bool = False, config: Optional[ViltConfig] = None,
                             tokenizer: Optional[str] = None, **overrides) -> ViLT:
    """A ViLT Lightning ``.ckpt`` (``vilt_irtr_coco.ckpt``; or any state-dict file) -> :class:`ViLT`.

    The config comes from the tensor shapes (:func:`config_from_original`) unless ``config`` is given.
    Raises ``CheckpointError`` naming unmapped, missing, unexpected or mis-shaped keys.
    """
    state, hparams = read_original_checkpoint(path, trusted=trusted)
    converted, unmapped = convert_original_state_dict(state)
    if unmapped:
        raise CheckpointError(f"{path}: keys outside ViLT's key map: {_listing(unmapped)}")
    if config is None:
        config = config_from_original(converted, hparams, **overrides)
    else:
        config = copy.deepcopy(config)
        for key, value in overrides.items():
            setattr(config, key, value)
    model = ViLT(config, tokenizer=tokenizer)
    expected = model.hf.state_dict()
    expected = {k: v for k, v in expected.items() if not IGNORED_HF.search(k)}
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        problems = [f"missing {_listing(missing)}"] if missing else []
        problems += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{path} does not fit ViLT ({config.num_hidden_layers} layers, width "
                              f"{config.hidden_size}) after the key map: {'; '.join(problems)}")
    shaped = [f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if tuple(converted[k].shape) != tuple(v.shape)]
    if shaped:
        raise CheckpointError(f"{path}: mis-shaped ViLT weights (checkpoint vs model): {_listing(shaped)}")
    model.hf.load_state_dict(converted, strict=False)
    return model.eval()


# --------------------------------------------------------------------------------------------- registry
_WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


@register_teacher("vilt")
def create_vilt(checkpoint: Optional[str | Path] = None, config: Optional[ViltConfig | Dict] = None,
                preset: str = "base", trusted: bool = False, tokenizer: Optional[str] = None,
                strict: bool = True, **overrides) -> ViLT:
    """Build a ViLT (trainable; ``create_teacher`` wraps it frozen).

    Args:
        checkpoint: an original Lightning ``.ckpt`` (or any state-dict file), a ``save_pretrained``
            directory, a hub id (``dandelin/vilt-b32-finetuned-coco`` / ``-flickr30k``; needs the network
            or the HF cache), or None for random weights of ``preset``.
        config: a ``ViltConfig`` or dict instead of the preset (or of the shapes of a ``.ckpt``).
        preset: "base" (official sizes), "vit128x4" (embedded default) or "vit32x2" (unit tests).
        trusted: allow a ``.ckpt`` holding arbitrary pickled objects (``weights_only=False``).
        tokenizer: a :func:`teachers.tokenizers.load_tokenizer` name; default ``"minilm"`` (bert-base-uncased
            WordPiece, offline) or what a ``save_pretrained`` directory recorded.
        strict: for directories / hub ids, raise ``CheckpointError`` on missing weights.
        overrides: ``ViltConfig`` fields.
    """
    if isinstance(config, dict):
        config = ViltConfig(**config)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_file():
            return load_original_checkpoint(path, trusted=trusted, config=config, tokenizer=tokenizer, **overrides)
        if config is not None:
            raise ValueError("pass either a save_pretrained directory / hub id or a config, not both")
        if not path.is_dir() and (path.suffix in _WEIGHT_SUFFIXES or path.is_absolute() or str(checkpoint).startswith(".")):
            raise FileNotFoundError(f"ViLT checkpoint {checkpoint} does not exist")
        return ViLT.from_pretrained(checkpoint, strict=strict, tokenizer=tokenizer, **overrides)
    if config is not None:
        config = copy.deepcopy(config)
        for key, value in overrides.items():
            setattr(config, key, value)
        return ViLT(config, tokenizer=tokenizer)
    return ViLT(_config(**{**PRESETS.get(preset), **overrides}), tokenizer=tokenizer)


create_vilt.presets = PRESETS  # what ``preset=`` takes (``dcd list`` shows them)


@register_hook(ViltForImageAndTextRetrieval)
def _wrap_hf_vilt(model: ViltForImageAndTextRetrieval) -> ViLT:
    """``teachers.as_teacher(ViltForImageAndTextRetrieval.from_pretrained(...))`` wraps the raw HF model."""
    return ViLT(model)
