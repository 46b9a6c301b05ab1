"""METER (Dou et al., CVPR 2022) as a ``Scorer``, loading the official retrieval checkpoints directly.

Architecture (teachers.md §A; parameter names are the official Lightning ``state_dict``'s):

* ``vit_model.visual.*``: CLIP ViT (11 blocks for ViT-B/16, QuickGELU, fp32 LayerNorm, ``ln_post`` on
  every token, no ``proj``) -> ``cross_modal_image_transform`` -> + ``token_type_embeddings[1]``;
* ``text_transformer``: a transformers model (``roberta-base`` for the official weights) ->
  ``cross_modal_text_transform`` -> + ``token_type_embeddings[0]``;
* ``cross_modal_{text,image}_layers.{i}``: co-attention layers; both streams update in parallel from the
  previous layer's outputs;
* ``cross_modal_{text,image}_pooler`` (dense + tanh on token 0), score =
  ``rank_output(cat[text_pool, image_pool])`` (Linear(2H -> 1)); ``itm_score.fc`` (Linear(2H -> 2)) is
  kept so that the checkpoint loads, frozen and unused as in METER's retrieval fine-tuning.

Scoring splits as the ``Scorer`` interface wants: ``encode_images`` / ``encode_texts`` run the towers once
per image / caption (features ``{"tokens": [N, T, H], "mask": [N, T]}``), the fusion layers run per
pair. ``score_features`` (all pairs) also computes the per-item parts of the first co-attention layer
(each stream's self-attention, the cross-attention keys/values and queries) once per image / caption.
``score_pairs_naive`` / ``score_naive`` run the whole model for every pair, as the official evaluation
does. Presets: ``meter_preset(name)`` builds a model of each; ``METERConfig.preset``
gives their configs. Registry: ``teachers.create_teacher("meter", checkpoint=..., preset=...)``.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import register_teacher
from .base import Features, Inputs, Scorer, Towers, check_layer_indices
from .clip_vit import CLIPVisionModel, load_openai_clip_visual
from .files import load_weights, save_weights
from .meter_checkpoint import (
    KNOWN_LEFTOVERS, CheckpointError, config_from_checkpoint, load_state_into, read_checkpoint,
)
from .meter_config import CLIP_MEAN, CLIP_STD, CONFIG_NAME, PRESETS, METERConfig
from .meter_layers import BertCrossLayer, Pooler
from .tokenizers import minilm_path

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "CheckpointError", "KNOWN_LEFTOVERS", "METER", "METERConfig", "MeterImageTower",
    "MeterTextTower", "create_meter", "load_official_checkpoint", "meter_preset",
]

WEIGHTS_NAME = "model.safetensors"


def build_text_transformer(text_config: Dict) -> nn.Module:
    """``AutoModel.from_config`` of a config dict (``model_type`` + fields), without its pooler."""
    from transformers import AutoConfig, AutoModel

    fields = dict(text_config)
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    try:
        return AutoModel.from_config(config, add_pooling_layer=False)
    except TypeError:  # a model type without a pooler option
        return AutoModel.from_config(config)


class _ToRGB:
    def __call__(self, image):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


class MeterImageTower(nn.Module):
    """A METER's CLIP ViT + ``cross_modal_image_transform``; the class token (a dual student's image tower)."""

    def __init__(self, vit_model: nn.Module, transform: nn.Linear):
        super().__init__()
        self.vit_model = vit_model
        self.cross_modal_image_transform = transform
        self.width = int(transform.out_features)

    def forward(self, images: Inputs) -> Tensor:
        tokens = self.vit_model(images["pixel_values"])
        return self.cross_modal_image_transform(tokens[:, 0])


class MeterTextTower(nn.Module):
    """A METER's text encoder + ``cross_modal_text_transform``; the ``<s>`` / [CLS] token (a dual student's text tower)."""

    def __init__(self, text_transformer: nn.Module, transform: nn.Linear):
        super().__init__()
        self.text_transformer = text_transformer
        self.cross_modal_text_transform = transform
        self.width = int(transform.out_features)

    def forward(self, texts: Inputs) -> Tensor:
        out = self.text_transformer(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"])
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return self.cross_modal_text_transform(hidden[:, 0])


class METER(Scorer):
    """METER cross-encoder (trainable; ``teachers.Teacher`` freezes it)."""

    family = "meter"
    #: a fusion student keeps the unimodal towers, the cross-modal transforms and the type embeddings fixed (as
    #: DCD's released METER student does) and the unused ``itm_score`` head; its fusion layers, poolers and head train
    fusion_frozen = ("vit_model", "text_transformer", "cross_modal_image_transform", "cross_modal_text_transform",
                     "token_type_embeddings", "itm_score")

    def __init__(self, config: Optional[METERConfig | Dict] = None, **overrides):
        super().__init__()
        if config is None:
            config = METERConfig.preset("base")
        elif isinstance(config, dict):
            config = METERConfig.from_dict(config)
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        c = config
        h = c.hidden_size
        self.vit_model = CLIPVisionModel(c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_heads,
                                         c.vision_mlp_ratio, c.vision_layer_norm_eps, c.vision_position_init)
        self.text_transformer = build_text_transformer(c.text_config)
        self.cross_modal_text_transform = nn.Linear(c.text_hidden_size, h)
        self.cross_modal_image_transform = nn.Linear(c.vision_width, h)
        self.token_type_embeddings = nn.Embedding(2, h)

        def layers() -> nn.ModuleList:
            return nn.ModuleList([
                BertCrossLayer(h, c.num_heads, c.intermediate_size, c.hidden_dropout_prob,
                               c.attention_probs_dropout_prob, c.layer_norm_eps, c.hidden_act)
                for _ in range(c.num_fusion_layers)
            ])

        self.cross_modal_image_layers = layers()
        self.cross_modal_text_layers = layers()
        self.cross_modal_image_pooler = Pooler(h)
        self.cross_modal_text_pooler = Pooler(h)
        self.itm_score = nn.Module()
        self.itm_score.fc = nn.Linear(2 * h, 2)
        self.rank_output = nn.Linear(2 * h, 1)
        self._init_weights()
        for p in self.itm_score.parameters():  # frozen in METER's retrieval fine-tuning; unused for scoring
            p.requires_grad_(False)
        # pairs per fusion call in score_features: ~128 MB per [pairs, image tokens, H] fp32 activation
        budget = 2 ** 25 // max(1, c.num_image_tokens * h)
        self.pair_chunk = 1 << max(4, min(10, budget.bit_length() - 1))

    @torch.no_grad()
    def _init_weights(self) -> None:
        """BERT-style init of the METER-specific parts (the towers have their own)."""
        std = self.config.initializer_range
        fused = [self.cross_modal_text_transform, self.cross_modal_image_transform, self.token_type_embeddings,
                 self.cross_modal_image_layers, self.cross_modal_text_layers, self.cross_modal_image_pooler,
                 self.cross_modal_text_pooler, self.itm_score]
        for root in fused:
            for m in root.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=std)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=std)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        # METER initialises the ranking head from the ITM head's "match" row (a copy, never shared storage)
        self.rank_output.weight.copy_(self.itm_score.fc.weight[1:])
        self.rank_output.bias.copy_(self.itm_score.fc.bias[1:])

    # ----------------------------------------------------------------- construction helpers
    @classmethod
    def from_config(cls, config: METERConfig | Dict, **overrides) -> "METER":
        return cls(config, **overrides)

    @property
    def num_fusion_layers(self) -> int:
        return len(self.cross_modal_text_layers)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    # ----------------------------------------------------------------- preprocessing
    def image_transform(self, train: bool = False) -> Callable:
        """METER's ``clip`` transform: shorter side -> image_size (bicubic), center crop, RGB, CLIP normalise.

        ``train=True`` adds a random resized crop (scale 0.8-1) only when ``config.train_augment``.
        """
        from torchvision import transforms as T

        size = self.config.image_size
        bicubic = T.InterpolationMode.BICUBIC
        if train and self.config.train_augment:
            geometry = [T.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=bicubic)]
        else:
            geometry = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
        return T.Compose([*geometry, _ToRGB(), T.ToTensor(), T.Normalize(self.config.image_mean, self.config.image_std)])

    @property
    def tokenizer(self):
        from .tokenizers import load_tokenizer

        tok = load_tokenizer(self.config.tokenizer)
        if not getattr(self, "_tokenizer_checked", False):
            pad = self.config.text_config.get("pad_token_id")
            vocab = int(self.config.text_config.get("vocab_size", len(tok)))
            if pad is not None and tok.pad_token_id is not None and tok.pad_token_id != pad:
                raise ValueError(f"tokenizer {self.config.tokenizer!r} pads with id {tok.pad_token_id} but the text tower "
                                 f"expects pad_token_id {pad}: config.tokenizer does not match config.text_config")
            if len(tok) > vocab:
                raise ValueError(f"tokenizer {self.config.tokenizer!r} has {len(tok)} tokens, more than the text tower's "
                                 f"vocabulary of {vocab}")
            self._tokenizer_checked = True
        return tok

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        """Captions -> ``input_ids`` / ``attention_mask``, padded to the longest, truncated to ``max_text_len``."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.config.max_text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    # ----------------------------------------------------------------- per-modality part
    def encode_images(self, images: Inputs) -> Features:
        """ViT -> ``cross_modal_image_transform`` -> + type embedding 1: ``tokens`` [N, 1+P, H], ``mask`` [N, 1+P]."""
        pixels = images["pixel_values"] if isinstance(images, dict) else images
        tokens = self.cross_modal_image_transform(self.vit_model(pixels))
        tokens = tokens + self.token_type_embeddings.weight[1].to(tokens.dtype)
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        return {"tokens": tokens, "mask": mask}

    def encode_texts(self, texts: Inputs) -> Features:
        """Text tower -> ``cross_modal_text_transform`` -> + type embedding 0: ``tokens`` [N, L, H], ``mask`` [N, L]."""
        ids, mask = texts["input_ids"], texts["attention_mask"]
        out = self.text_transformer(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        tokens = self.cross_modal_text_transform(hidden)
        tokens = tokens + self.token_type_embeddings.weight[0].to(tokens.dtype)
        return {"tokens": tokens, "mask": mask}

    # ----------------------------------------------------------------- per-pair part
    @staticmethod
    def _trim(features: Features) -> Tuple[Tensor, Optional[Tensor]]:
        """Drop trailing token columns that are padding for every item; ``None`` mask when nothing is padded."""
        tokens, mask = features["tokens"], features.get("mask")
        if mask is None:
            return tokens, None
        keep = mask.bool().any(0)
        length = int(keep.nonzero().max()) + 1 if bool(keep.any()) else 1
        tokens, mask = tokens[:, :length], mask[:, :length]
        return tokens, (None if bool(mask.bool().all()) else mask)

    def _head(self, x: Tensor, y: Tensor) -> Tensor:
        pooled = torch.cat([self.cross_modal_text_pooler(x), self.cross_modal_image_pooler(y)], dim=-1)
        return self.rank_output(pooled)[:, 0]

    def fuse(self, text_tokens: Tensor, text_mask: Optional[Tensor], image_tokens: Tensor,
             image_mask: Optional[Tensor], start: int = 0) -> Tensor:
        """Co-attention layers ``start..`` on aligned pairs, poolers, ``rank_output`` -> logits [N]."""
        x, y = text_tokens, image_tokens
        for text_layer, image_layer in list(zip(self.cross_modal_text_layers, self.cross_modal_image_layers))[start:]:
            x, y = text_layer(x, y, text_mask, image_mask), image_layer(y, x, image_mask, text_mask)
        return self._head(x, y)

    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        """Aligned pairs (image i, text i) -> logits [N]: the fusion layers, poolers and ``rank_output``."""
        if image_features["tokens"].shape[0] != text_features["tokens"].shape[0]:
            raise ValueError(f"score_feature_pairs needs as many images as texts, got {image_features['tokens'].shape[0]} "
                             f"and {text_features['tokens'].shape[0]}")
        x, x_mask = self._trim(text_features)
        y, y_mask = self._trim(image_features)
        return self.fuse(x, x_mask, y, y_mask)

    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        """Every image with every text -> [n_images, n_texts].

        Layer 0 of each stream starts from per-item inputs, so its self-attention and the projections
        that depend on one modality only (cross-attention queries of the stream, keys/values of the other
        stream) are computed once per image / caption; only the cross-attention itself, the FFN and the
        later layers run per pair, in chunks of ``pair_chunk`` pairs.
        """
        x0, x_mask = self._trim(text_features)
        y0, y_mask = self._trim(image_features)
        n_img, n_txt = y0.shape[0], x0.shape[0]
        text_layer, image_layer = self.cross_modal_text_layers[0], self.cross_modal_image_layers[0]
        # per caption: self-attention, its cross-attention queries, and the keys/values the image stream reads
        x_att = text_layer.self_attend(x0, x_mask)
        x_q = text_layer.crossattention.self.project_query(x_att)
        x_k, x_v = image_layer.crossattention.self.project_key_value(x0)
        # per image: likewise
        y_att = image_layer.self_attend(y0, y_mask)
        y_q = image_layer.crossattention.self.project_query(y_att)
        y_k, y_v = text_layer.crossattention.self.project_key_value(y0)

        device = y0.device
        pair_img = torch.arange(n_img, device=device).repeat_interleave(n_txt)
        pair_txt = torch.arange(n_txt, device=device).repeat(n_img)
        out = []
        for s in range(0, n_img * n_txt, max(1, self.pair_chunk)):
            i, t = pair_img[s:s + self.pair_chunk], pair_txt[s:s + self.pair_chunk]
            tm = x_mask[t] if x_mask is not None else None
            im = y_mask[i] if y_mask is not None else None
            x_ctx = text_layer.crossattention.self.attend(x_q[t], y_k[i], y_v[i], im)
            y_ctx = image_layer.crossattention.self.attend(y_q[i], x_k[t], x_v[t], tm)
            x = text_layer.cross_and_feed_forward(x_att[t], x_ctx)
            y = image_layer.cross_and_feed_forward(y_att[i], y_ctx)
            out.append(self.fuse(x, tm, y, im, start=1))
        if not out:
            return y0.new_zeros(n_img, n_txt)
        return torch.cat(out).view(n_img, n_txt)

    def forward(self, images: Inputs, texts: Inputs) -> Tensor:
        """Aligned pairs -> logits [N] (one call, so DDP sees every used parameter)."""
        return self.score_pairs(images, texts)

    # ----------------------------------------------------------------- naive (official evaluation)
    def forward_naive(self, images: Inputs, texts: Inputs) -> Tensor:
        """The whole model for every aligned pair (towers included, nothing reused) -> logits [N]."""
        img = self.encode_images(images)
        txt = self.encode_texts(texts)
        return self.fuse(txt["tokens"], txt["mask"], img["tokens"], img["mask"])

    score_pairs_naive = forward_naive

    def score_naive(self, images: Inputs, texts: Inputs, text_batch: int = 64) -> Tensor:
        """[n_images, n_texts] as METER's ``compute_irtr_recall``: per image, per text batch, the whole model."""
        pixels = images["pixel_values"]
        n_txt = texts["input_ids"].shape[0]
        rows = []
        for i in range(pixels.shape[0]):
            row = []
            for s in range(0, n_txt, text_batch):
                ids = texts["input_ids"][s:s + text_batch]
                batch = {"input_ids": ids, "attention_mask": texts["attention_mask"][s:s + text_batch]}
                img = {"pixel_values": pixels[i:i + 1].expand(ids.shape[0], -1, -1, -1)}
                row.append(self.forward_naive(img, batch))
            rows.append(torch.cat(row))
        return torch.stack(rows)

    # ----------------------------------------------------------------- students
    def unimodal_towers(self) -> Towers:
        """The CLIP ViT and the text encoder, each with its cross-modal transform, pooled on the first token.

        ``config`` is this METER's with a single co-attention layer: the towers alone rebuild from it.
        """
        c = self.config
        return Towers(
            family=self.family,
            image=MeterImageTower(self.vit_model, self.cross_modal_image_transform),
            text=MeterTextTower(self.text_transformer, self.cross_modal_text_transform),
            config=c.replace(num_fusion_layers=1).to_dict(),
            preprocessing={"tokenizer": c.tokenizer, "max_text_len": c.max_text_len, "image_size": c.image_size,
                           "image_mean": tuple(c.image_mean), "image_std": tuple(c.image_std),
                           "train_augment": c.train_augment},
        )

    def shrink(self, layer_indices: Sequence[int] = (0, 3, 5)) -> "METER":
        """A new METER with the co-attention layers ``layer_indices`` (per stream) of this one.

        Everything is a deep copy (towers, transforms, type embeddings, the chosen layers, poolers, heads):
        the result shares no storage with ``self``, so training it never touches this model. Requires-grad
        flags and train/eval modes are copied as they are.
        """
        indices = check_layer_indices(layer_indices, self.num_fusion_layers, "layer_indices")
        config = self.config.replace(num_fusion_layers=len(indices))
        with torch.device("meta"):
            new = METER(config)
        for name, child in self.named_children():
            if name in ("cross_modal_text_layers", "cross_modal_image_layers"):
                setattr(new, name, nn.ModuleList([copy.deepcopy(child[i]) for i in indices]))
            else:
                setattr(new, name, copy.deepcopy(child))
        new.pair_chunk = self.pair_chunk
        new.training = self.training
        source_meta = any(t.is_meta for t in self.parameters())
        leftover = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
        if leftover and not source_meta:  # pragma: no cover - every child is replaced above
            raise RuntimeError(f"shrink left meta tensors: {leftover[:5]}")
        return new

    # ----------------------------------------------------------------- serialisation
    def save_pretrained(self, directory: str | Path) -> Path:
        """``directory/model.safetensors`` + ``directory/config.json`` (``family: "meter"``), each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(directory / WEIGHTS_NAME, self.state_dict(), metadata={"family": self.family})
        self.config.save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu", **overrides) -> "METER":
        """Rebuild a METER written by ``save_pretrained`` (``overrides`` may change non-shape fields)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"METER directory {directory} does not exist")
        config = METERConfig.load(directory)
        if overrides:
            config = config.replace(**overrides)
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing (save_pretrained writes it next to {CONFIG_NAME})")
        with torch.device("meta"):
            model = cls(config)
        state = load_weights(weights)
        load_state_into(model, state, source=str(weights), assign=True)
        return model.to(map_location)

    def load_official_checkpoint(self, path: str | Path, trusted: bool = False) -> Dict[str, List[str]]:
        return load_official_checkpoint(self, path, trusted=trusted)


def load_official_checkpoint(model: METER, path: str | Path | Dict[str, Tensor], trusted: bool = False) -> Dict[str, List[str]]:
    """Load an official METER ``.ckpt`` (or a bare state dict / its file) into ``model``.

    Interpolates ``vit_model.visual.positional_embedding`` to the model's grid, ignores the known leftovers
    (returned under ``"ignored"``) and raises ``CheckpointError`` naming any other missing or unexpected key.
    """
    if isinstance(path, dict):
        state, source = path, "state dict"
    else:
        state, _ = read_checkpoint(path, trusted=trusted)
        source = str(path)
    return load_state_into(model, state, source=source)


# --------------------------------------------------------------------------------------------- presets
def meter_preset(name: str = "base", **overrides) -> METER:
    """A METER of preset ``name`` (:data:`~teachers.meter_config.PRESETS`), random weights: ``"base"`` is the
    official size (load a checkpoint for real scores), ``"minilm2-vit128x4"`` the embedded teacher's, ``"roberta32x1-vit32x2"`` unit-test size."""
    return METER(METERConfig.preset(name, **overrides))


# --------------------------------------------------------------------------------------------- registry
@register_teacher("meter")
def create_meter(checkpoint: Optional[str | Path] = None, config: Optional[METERConfig | Dict] = None,
                 preset: str = "base", trusted: bool = False, clip_checkpoint: Optional[str | Path] = None,
                 text_pretrained: Optional[str] = None, **overrides) -> METER:
    """Build a METER (trainable; ``create_teacher`` wraps it frozen).

    Args:
        checkpoint: an official Lightning ``.ckpt`` (or any file holding a METER state dict; the config is
            derived from its shapes and ``hyper_parameters.config``), a directory written by
            ``save_pretrained``, or None for random weights.
        config: a ``METERConfig`` / dict; default: the ``preset``.
        preset: "base" (official sizes), "minilm2-vit128x4" or "roberta32x1-vit32x2"; the base config a checkpoint refines.
        trusted: allow a ``.ckpt`` holding arbitrary pickled objects (``weights_only=False``).
        clip_checkpoint: with no ``checkpoint``, fill the image tower from an OpenAI CLIP file (``ViT-B-16.pt``).
        text_pretrained: with no ``checkpoint``, load the text tower from a hub id / directory ("roberta-base"),
            or "minilm": the packaged MiniLM-L6 (offline; fits the "minilm2-vit128x4" preset).
        overrides: ``METERConfig`` fields (e.g. ``image_size=384``).
    """
    if isinstance(config, dict):
        config = METERConfig.from_dict(config)
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.is_dir():
            if config is not None:
                raise ValueError("pass either a save_pretrained directory or a config, not both")
            return METER.from_pretrained(path, **overrides)
        if not path.is_file():
            raise FileNotFoundError(f"METER checkpoint {checkpoint} is neither a file nor a save_pretrained directory")
        state, hparams = read_checkpoint(path, trusted=trusted)
        if config is None:
            config = config_from_checkpoint(state, hparams, base=METERConfig.preset(preset), **overrides)
        elif overrides:
            config = config.replace(**overrides)
        with torch.device("meta"):
            model = METER(config)
        load_state_into(model, state, source=str(path), assign=True)
        return model
    if config is None:
        config = METERConfig.preset(preset, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    model = METER(config)
    if clip_checkpoint is not None:
        load_openai_clip_visual(model.vit_model, clip_checkpoint)
    if text_pretrained is not None:
        from transformers import AutoModel

        if text_pretrained == "minilm":
            text_pretrained = str(minilm_path())
        pretrained = AutoModel.from_pretrained(text_pretrained)
        missing, unexpected = model.text_transformer.load_state_dict(pretrained.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("pooler.")]
        if missing:
            raise CheckpointError(f"{text_pretrained} does not fit the text tower: missing {', '.join(missing[:10])}")
    return model


create_meter.presets = PRESETS  # what ``preset=`` takes (``dcd list`` shows them)
