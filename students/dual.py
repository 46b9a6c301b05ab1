"""Dual-encoder student: independent image and text towers, linear projections, L2-normalised embeddings.

The first stage of a retrieve-then-rerank pipeline: images and captions are embedded once, and a
score is ``exp(logit_scale) * <image embedding, text embedding>`` (CLIP-style), so scoring a whole
gallery is one matrix product.

Towers are chosen in :class:`DualEncoderConfig`:

* image: a timm model built from its name (``pretrained=False``: no network; ``image_checkpoint`` may
  name a local weights file), or a teacher family's name (``"meter"``) -- that teacher's image tower;
* text: a transformers ``AutoModel`` from a local path / hub id (``"minilm"`` = the packaged pretrained
  MiniLM-L6, usable offline) or from a config dict, optionally truncated to its first ``text_layers``
  layers; or a teacher family's name -- that teacher's text tower.

``DualEncoder.from_teacher(teacher)`` copies a cross-encoder teacher's towers (``teacher.unimodal_towers()``,
:mod:`teachers.base`), so a user holding only a METER checkpoint gets a pretrained student offline; no
teacher family's module is imported here, the family is reached through the teacher registry. ``save_pretrained`` / ``from_pretrained`` store ``config.json``
(``"family": "dual"``) and ``model.safetensors``; the config alone rebuilds the architecture.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import teachers
from teachers.base import Features, Inputs, Scorer, unimodal_towers
from teachers.tokenizers import load_tokenizer, minilm_path

from . import hub

__all__ = ["DualEncoder", "DualEncoderConfig", "SMALL_DUAL", "dual_bert32x1_vit32x1", "dual_minilm1_vit128x2",
           "dual_minilm2_vit192x4", "dual_minilm6_vit192x4", "dual_test", "truncate_text_layers"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DualEncoderConfig:
    """Everything needed to rebuild a :class:`DualEncoder` (JSON round trip via ``to_dict``/``from_dict``)."""

    # ---- image tower
    image_tower: str = "timm"  # "timm" | a teacher family with towers ("meter")
    timm_model: str = "vit_tiny_patch16_224"
    timm_kwargs: Dict[str, Any] = field(default_factory=lambda: {"img_size": 64, "patch_size": 8, "depth": 4})
    image_checkpoint: Optional[str] = None  # local timm weights file, loaded when building pretrained towers
    image_position_init: str = "default"  # "sincos": a from-scratch ViT's position table starts as the 2-D table
    image_size: int = 64
    image_mean: Optional[Tuple[float, float, float]] = None  # None: the timm model's own pretrained_cfg
    image_std: Optional[Tuple[float, float, float]] = None
    train_augment: bool = False  # mild RandomResizedCrop(scale 0.9-1) in image_transform(train=True)
    # ---- text tower
    text_tower: str = "hf"  # "hf" | a teacher family with towers ("meter")
    text_model: Optional[str] = "minilm"  # "minilm" (packaged), local directory or hub id
    text_config: Optional[Dict[str, Any]] = None  # transformers config dict (with "model_type")
    text_layers: Optional[int] = None  # keep only the first N transformer layers
    text_pooling: str = "mean"  # "mean" (over real tokens) | "cls"
    freeze_word_embeddings: bool = False  # keep the pretrained word table fixed (on a small caption set)
    tokenizer: str = "minilm"
    max_text_len: int = 40
    # ---- a teacher's towers (image_tower / text_tower name its family): the ``Towers.config`` that rebuilds
    # them (the field kept its first family's name, so that saved students load)
    meter_config: Optional[Dict[str, Any]] = None
    # ---- heads
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)

    def __post_init__(self) -> None:
        families = {t for t, own in ((self.image_tower, "timm"), (self.text_tower, "hf")) if t != own}
        if len(families) > 1:
            raise ValueError(f"image_tower {self.image_tower!r} and text_tower {self.text_tower!r} name two teacher "
                             "families; a dual student takes its teacher towers from one")
        if self.text_pooling not in ("mean", "cls"):
            raise ValueError(f"text_pooling must be 'mean' or 'cls', got {self.text_pooling!r}")
        family = self.teacher_family
        if family is not None and self.meter_config is None:
            raise ValueError(f"a {family!r} tower needs meter_config, the teacher's Towers.config "
                             "(use DualEncoder.from_teacher(teacher))")
        if family is not None and family not in teachers.TEACHERS:
            raise ValueError(f"image_tower {self.image_tower!r} / text_tower {self.text_tower!r}: "
                             f"{teachers.TEACHERS.unknown(family)} (or 'timm' / 'hf' towers)")
        if self.text_tower == "hf" and self.text_model is None and self.text_config is None:
            raise ValueError("the 'hf' text tower needs text_model (path / hub id / 'minilm') or text_config")
        if self.freeze_word_embeddings and self.text_tower != "hf":
            raise ValueError("freeze_word_embeddings applies to the 'hf' text tower only")
        if self.text_layers is not None and self.text_layers < 1:
            raise ValueError(f"text_layers must be >= 1, got {self.text_layers}")
        if self.image_tower == "timm":
            img_size = self.timm_kwargs.get("img_size")
            if img_size is not None and int(img_size) != int(self.image_size):
                raise ValueError(f"timm_kwargs img_size={img_size} differs from image_size={self.image_size}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None:
                if len(value) != 3:
                    raise ValueError(f"{name} must have 3 entries, got {value!r}")
                setattr(self, name, tuple(float(v) for v in value))
        if self.embed_dim < 1 or self.max_text_len < 2 or self.image_size < 1:
            raise ValueError("embed_dim, image_size must be >= 1 and max_text_len >= 2")

    @property
    def teacher_family(self) -> Optional[str]:
        """The teacher family whose towers this student has (None: timm / transformers towers)."""
        if self.image_tower != "timm":
            return self.image_tower
        return self.text_tower if self.text_tower != "hf" else None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "DualEncoderConfig":
        data = {k: v for k, v in data.items() if k != "family"}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise KeyError(f"unknown DualEncoderConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)


# --------------------------------------------------------------------------------------------- towers
def _text_layer_list(model: nn.Module) -> Tuple[nn.Module, str]:
    """The (parent, attribute) holding a transformers encoder's ``ModuleList`` of layers."""
    for path in ("encoder.layer", "encoder.layers", "transformer.layer", "layers", "layer"):
        *parents, attr = path.split(".")
        parent = model
        for part in parents:
            parent = getattr(parent, part, None)
            if parent is None:
                break
        if parent is not None and isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr
    raise ValueError(f"cannot find the layer list of a {type(model).__name__} to truncate (text_layers)")


def truncate_text_layers(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep the first ``num_layers`` layers of a transformers text encoder (in place); updates its config."""
    parent, attr = _text_layer_list(model)
    layers = getattr(parent, attr)
    if num_layers > len(layers):
        raise ValueError(f"text_layers={num_layers} but the text model has only {len(layers)} layers")
    setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
    if hasattr(model, "config") and hasattr(model.config, "num_hidden_layers"):
        model.config.num_hidden_layers = num_layers
    return model


def _text_config_dict(config) -> Dict[str, Any]:
    data = config.to_diff_dict()
    data["model_type"] = config.model_type
    for key in ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_attn_implementation"):
        data.pop(key, None)
    return data


def _build_hf_text_model(cfg: DualEncoderConfig, pretrained: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    source = str(minilm_path()) if cfg.text_model == "minilm" else cfg.text_model
    if pretrained and source is not None:
        try:
            model = AutoModel.from_pretrained(source)
        except OSError as err:
            raise OSError(f"could not load text model {cfg.text_model!r} (offline? use text_model='minilm')") from err
    else:
        if cfg.text_config is not None:
            config_dict = dict(cfg.text_config)
            model_type = config_dict.pop("model_type", None)
            if model_type is None:
                raise ValueError("text_config needs a 'model_type' entry (e.g. 'bert')")
            config = AutoConfig.for_model(model_type, **config_dict)
        else:
            config = AutoConfig.from_pretrained(source)
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:  # unused: pooling is ours; unused params upset DDP
        model.pooler = None
    if cfg.text_layers is not None:
        truncate_text_layers(model, cfg.text_layers)
    return model


class HFTextTower(nn.Module):
    """transformers encoder -> pooled [N, width] (mean over real tokens or the first token)."""

    def __init__(self, model: nn.Module, pooling: str):
        super().__init__()
        self.model = model
        self.pooling = pooling
        self.width = int(model.config.hidden_size)

    def forward(self, texts: Inputs) -> Tensor:
        mask = texts["attention_mask"]
        hidden = self.model(input_ids=texts["input_ids"], attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class TimmImageTower(nn.Module):
    """timm model with its classifier removed -> pooled [N, width]."""

    def __init__(self, cfg: DualEncoderConfig, pretrained: bool):
        super().__init__()
        import timm

        kwargs = dict(cfg.timm_kwargs)
        if pretrained and cfg.image_checkpoint:
            path = Path(cfg.image_checkpoint)
            if not path.is_file():
                raise FileNotFoundError(f"image_checkpoint {path} does not exist")
            self.model = timm.create_model(
                cfg.timm_model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, **kwargs
            )
        else:
            self.model = timm.create_model(cfg.timm_model, pretrained=False, num_classes=0, **kwargs)
            if cfg.image_position_init == "sincos":
                _sincos_position_table(self.model)
        self.width = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def forward(self, images: Inputs) -> Tensor:
        return self.model(images["pixel_values"])


def _sincos_position_table(vit: nn.Module) -> None:
    """Start a timm ViT's learned position table as the fixed 2-D sin-cos table (as the embedded teachers do)."""
    from teachers.position_tables import sincos_2d

    table = vit.pos_embed  # [1, tokens, width], class token first unless no_embed_class
    grid = int(round((table.shape[1] - (0 if getattr(vit, "no_embed_class", False) else 1)) ** 0.5))
    start = sincos_2d(grid, table.shape[-1], cls_token=table.shape[1] != grid * grid)
    with torch.no_grad():
        table.copy_(start[None])


def _build_towers(config: DualEncoderConfig, pretrained: bool) -> Tuple[nn.Module, nn.Module]:
    """The towers ``config`` names; fills in what the towers decide (timm mean/std, the text config)."""
    visual = text = None
    family = config.teacher_family
    if family is not None:  # a teacher's towers (random weights: from_pretrained loads the saved ones)
        towers = teachers.build_towers(family, config.meter_config)
        visual = towers.image if config.image_tower == family else None
        text = towers.text if config.text_tower == family else None
    if config.image_tower == "timm":
        visual = TimmImageTower(config, pretrained)
        if config.image_mean is None or config.image_std is None:
            pcfg = getattr(visual.model, "pretrained_cfg", None) or {}
            config.image_mean = tuple(float(v) for v in (config.image_mean or pcfg.get("mean", IMAGENET_MEAN)))
            config.image_std = tuple(float(v) for v in (config.image_std or pcfg.get("std", IMAGENET_STD)))
    if config.text_tower == "hf":
        text_model = _build_hf_text_model(config, pretrained)
        config.text_config = _text_config_dict(text_model.config)
        text = HFTextTower(text_model, config.text_pooling)
    return visual, text


# --------------------------------------------------------------------------------------------- model
class DualEncoder(Scorer):
    """CLIP-style student: ``score = exp(logit_scale) * img_emb @ txt_emb.T`` on L2-normalised embeddings."""

    family = "dual"

    def __init__(
        self,
        config: DualEncoderConfig | None = None,
        pretrained: bool = True,
        towers: Optional[Tuple[nn.Module, nn.Module]] = None,
        **overrides,
    ):
        """Build from ``config`` (defaults: :func:`dual_minilm6_vit192x4`).

        Args:
            config: the architecture; keyword ``overrides`` replace its fields.
            pretrained: load the text tower's pretrained weights (``text_model``) and ``image_checkpoint``;
                ``from_pretrained`` passes False and loads the saved weights instead.
            towers: ready ``(image_tower, text_tower)`` modules (each with a ``width``) matching ``config``,
                instead of building them (``from_teacher`` passes the teacher's copied towers).
        """
        super().__init__()
        config = DualEncoderConfig() if config is None else copy.deepcopy(config)
        if overrides:
            config = DualEncoderConfig.from_dict({**config.to_dict(), **overrides})
        visual, text = towers if towers is not None else _build_towers(config, pretrained)
        self.config = config
        self.visual = visual
        self.text = text
        self.image_projection = nn.Linear(visual.width, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(text.width, config.embed_dim, bias=False)
        for proj in (self.image_projection, self.text_projection):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.init_logit_scale)))
        if config.freeze_word_embeddings:
            self.text.model.get_input_embeddings().weight.requires_grad_(False)

    # ----------------------------------------------------------------- preprocessing
    @property
    def tokenizer(self):
        return load_tokenizer(self.config.tokenizer)

    def image_transform(self, train: bool = False) -> Callable:
        from torchvision import transforms as T

        size = self.config.image_size
        bicubic = T.InterpolationMode.BICUBIC
        if train and self.config.train_augment:
            geometry = [T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic)]
        else:
            geometry = [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)]
        return T.Compose([
            _ToRGB(), *geometry, T.ToTensor(), T.Normalize(self.config.image_mean, self.config.image_std),
        ])

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.config.max_text_len, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    # ----------------------------------------------------------------- per-modality part
    def encode_images(self, images: Inputs) -> Features:
        return {"embedding": F.normalize(self.image_projection(self.visual(images)), dim=-1)}

    def encode_texts(self, texts: Inputs) -> Features:
        return {"embedding": F.normalize(self.text_projection(self.text(texts)), dim=-1)}

    # ----------------------------------------------------------------- per-pair part
    def scale(self) -> Tensor:
        """``exp(logit_scale)`` with the log-scale clamped to ``[0, max_logit_scale]`` (CLIP)."""
        return self.logit_scale.clamp(0.0, self.config.max_logit_scale).exp()

    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        return self.scale() * image_features["embedding"] @ text_features["embedding"].t()

    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        return self.scale() * (image_features["embedding"] * text_features["embedding"]).sum(-1)

    def forward(self, images: Inputs | None = None, texts: Inputs | None = None) -> Dict[str, Tensor]:
        """Training entry point (one call, so DDP sees every used parameter): embeddings and the scale."""
        out: Dict[str, Tensor] = {"logit_scale": self.scale()}
        if images is not None:
            out["image_embedding"] = self.encode_images(images)["embedding"]
        if texts is not None:
            out["text_embedding"] = self.encode_texts(texts)["embedding"]
        return out

    def no_weight_decay(self) -> set:
        return {"logit_scale"}

    # ----------------------------------------------------------------- teachers
    @classmethod
    def from_teacher(cls, teacher_model: Scorer, embed_dim: int = 256, **overrides) -> "DualEncoder":
        """A dual encoder whose towers are deep copies of a cross-encoder teacher's unimodal towers.

        The towers come from the teacher's ``unimodal_towers()`` (:class:`teachers.Towers`; METER: its CLIP
        ViT + ``cross_modal_image_transform`` on the class token, ``text_transformer`` +
        ``cross_modal_text_transform`` on the first token), with the tokenizer, image size and normalisation
        they expect. Projections and ``logit_scale`` are new. A single-stream teacher (ViLT) has no towers
        and is refused with ``NotImplementedError``.
        """
        towers = unimodal_towers(teacher_model)
        prep = towers.preprocessing
        config = DualEncoderConfig(
            image_tower=towers.family, text_tower=towers.family, meter_config=dict(towers.config), timm_kwargs={},
            text_model=None, text_pooling="cls", tokenizer=str(prep["tokenizer"]),
            max_text_len=int(prep["max_text_len"]), image_size=int(prep["image_size"]),
            image_mean=tuple(prep["image_mean"]), image_std=tuple(prep["image_std"]),
            train_augment=bool(prep.get("train_augment", False)), embed_dim=embed_dim,
        )
        if overrides:
            config = DualEncoderConfig.from_dict({**config.to_dict(), **overrides})
        student = cls(config, towers=(copy.deepcopy(towers.image), copy.deepcopy(towers.text)))
        for p in student.parameters():  # a Teacher's parameters are frozen; the copies are ours to train
            p.requires_grad_(True)
        return student.train()

    # ----------------------------------------------------------------- serialisation
    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        hub.save_weights(directory / hub.WEIGHTS_NAME, self.state_dict())
        hub.save_config(directory, self.family, self.config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "DualEncoder":
        directory = Path(directory)
        data = hub.read_config(directory, family=cls.family)
        config = DualEncoderConfig.from_dict(data)
        weights_path = directory / hub.WEIGHTS_NAME
        if not weights_path.is_file():
            raise FileNotFoundError(f"{weights_path} is missing (save_pretrained writes it next to config.json)")
        model = cls(config, pretrained=False)
        hub.load_state_strict(model, hub.load_weights(weights_path), weights_path)
        return model.to(map_location)


class _ToRGB:
    def __call__(self, image):
        return image.convert("RGB") if hasattr(image, "convert") else image

    def __repr__(self) -> str:
        return "ToRGB()"


# --------------------------------------------------------------------------------------------- presets
# Each preset's name states its size, dual-<text tower><layers>-vit<width>x<blocks>, with one spelling: the
# registry (students/__init__.py), the pipeline, --help and the README use these names, and the function of
# the same name (dashes as underscores) builds it.

def dual_minilm6_vit192x4(**overrides) -> DualEncoder:
    """4-block ViT-Tiny (192 wide, 64 px, patch 8, random init) + the packaged pretrained MiniLM-L6, all 6 layers.

    ``DualEncoderConfig``'s defaults."""
    return DualEncoder(DualEncoderConfig(), **overrides)


def dual_minilm2_vit192x4(**overrides) -> DualEncoder:
    """4-block ViT-Tiny (192 wide, 64 px, patch 8, random init) + the packaged MiniLM's first 2 layers.

    The index benchmark's end-to-end model."""
    return DualEncoder(DualEncoderConfig(text_layers=2), **overrides)


#: the embedded students' size, strictly below the embedded METER teacher in every tower: a 2-block 128-wide
#: ViT at patch 16 (the teacher's: 4 blocks) and the packaged MiniLM's first layer (the teacher's: 2 layers).
#: Its 11.7 M-entry pretrained word table stays fixed: 7,500 training captions use a few hundred words, and
#: AdamW over the whole table was a sixth of each step's time on 2 CPU cores.
SMALL_DUAL = "dual-minilm1-vit128x2"


def dual_minilm1_vit128x2(**overrides) -> DualEncoder:
    """The embedded benchmark's dual student: 2-block 128-wide ViT (64 px, patch 16) + MiniLM layer 1."""
    config = DualEncoderConfig(
        timm_kwargs={"img_size": 64, "patch_size": 16, "depth": 2, "embed_dim": 128, "num_heads": 2},
        image_position_init="sincos", text_layers=1, freeze_word_embeddings=True,
    )
    return DualEncoder(config, **overrides)


def dual_bert32x1_vit32x1(**overrides) -> DualEncoder:
    """Unit-test size: a 1-block 32-wide ViT (32 px, patch 8) + a 1-layer 32-wide BERT, random init."""
    config = DualEncoderConfig(
        timm_model="vit_tiny_patch16_224",
        timm_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2},
        image_size=32,
        text_model=None,
        text_config={
            "model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "vocab_size": 30522, "max_position_embeddings": 64,
        },
        text_pooling="mean",
        embed_dim=16,
    )
    return DualEncoder(config, **overrides)


#: the unit-test preset's earlier name, kept because the test suite builds its students with it (deprecated
#: in the registry: ``create_student("dual_test")`` warns and builds ``dual-bert32x1-vit32x1``)
dual_test = dual_bert32x1_vit32x1
