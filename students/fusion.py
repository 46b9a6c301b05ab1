"""Fusion student: a shallower copy of the teacher's own cross-encoder, the re-ranker of retrieve-then-rerank.

DCD's released METER student (dcd_paper.md §3) keeps the teacher's unimodal towers frozen and trains
3 co-attention layers per stream copied from the teacher's fusion layers 0, 3 and 5, plus its own
poolers and score head. ``FusionStudent.from_teacher(teacher)`` builds exactly that with
``teacher.shrink(layers)`` -- a deep copy, so nothing shares storage with the teacher -- and freezes:

* METER: ``vit_model``, ``text_transformer``, ``cross_modal_{image,text}_transform`` and
  ``token_type_embeddings`` (frozen in the reference too), and the unused ``itm_score`` head; the
  fusion layers, poolers and ``rank_output`` train. Frozen modules stay in eval mode (``train()`` skips them) so the cached
  per-modality features are deterministic.
* ViLT: single stream, every layer is a fusion layer; nothing is frozen.

The student is a ``Scorer`` that delegates to the shrunken model, so METER's per-modality caching
still applies (towers once per image / caption, fusion per pair). ``save_pretrained(dir)`` writes the
inner model in its own format under ``dir/model/`` and ``dir/config.json`` with ``"family": "fusion"``,
``"teacher_family"``, ``"layers"`` and the frozen module names; ``from_pretrained`` reads the inner model
back through the teacher registry (``teachers.create_model(teacher_family, checkpoint=dir/model)``).

What this module needs of a teacher is the interface of :mod:`teachers.base` (``shrink``,
``num_fusion_layers``, ``fusion_frozen``, ``save_pretrained``); it imports no teacher family, so a family
registered with ``teachers.register_teacher`` gets a fusion student with no edit here.
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

import teachers
from teachers.base import Inputs, Scorer, Teacher, Wrapper, check_layer_indices, num_fusion_layers

from . import hub

__all__ = ["FusionStudent", "default_fusion_layers", "num_fusion_layers", "register_fusion_family"]

MODEL_DIR = "model"

#: teacher family -> modules frozen in its fusion students, for families registered through
#: ``register_fusion_family`` (a family's own default is its model's ``fusion_frozen``)
_FROZEN: Dict[str, Tuple[str, ...]] = {}

def register_fusion_family(family: str, model_class: str | type, frozen: Sequence[str] = ()) -> None:
    """Let ``FusionStudent`` wrap another cross-encoder family: a thin wrapper over ``teachers.register_teacher``.

    ``model_class`` (a class, or ``"module:Class"``) must implement ``shrink(layer_indices)`` (a deep-copied
    shallower model), ``save_pretrained(dir)`` and ``from_pretrained(dir)``, and expose its depth as
    ``num_fusion_layers``. It is registered as teacher family ``family`` (``checkpoint=dir`` reads a saved
    model, config fields build one) unless that family is registered already; ``frozen`` names the modules
    its fusion students keep fixed.
    """
    if isinstance(model_class, str):
        module_name, _, class_name = model_class.partition(":")
        obj = importlib.import_module(module_name)
        for part in class_name.split("."):
            obj = getattr(obj, part)
        model_class = obj
    if family not in teachers.TEACHERS:
        def factory(checkpoint=None, **config):
            return model_class.from_pretrained(Path(checkpoint)) if checkpoint is not None else model_class(**config)

        teachers.register_teacher(family)(factory)
    _FROZEN[family] = tuple(frozen)


def default_fusion_layers(num_layers: int) -> Tuple[int, ...]:
    """Half the layers (rounded up), spread evenly from the first to the last.

    6 -> (0, 3, 5), DCD's METER student; 3 -> (0, 2); 4 -> (0, 3); 2 -> (0,); 12 -> (0, 2, 4, 7, 9, 11).
    """
    if num_layers < 1:
        raise ValueError(f"the teacher has {num_layers} fusion layers; nothing to copy")
    keep = (num_layers + 1) // 2
    if keep == 1:
        return (0,)
    return tuple(int(math.floor(i * (num_layers - 1) / (keep - 1) + 0.5)) for i in range(keep))


def validate_layers(layers: Sequence[int], num_layers: int) -> Tuple[int, ...]:
    """The teacher layers a fusion student keeps, checked as every ``shrink`` checks them."""
    return check_layer_indices(layers, num_layers, "layers")


def _storage_ptrs(module: nn.Module) -> set:
    tensors = list(module.parameters()) + list(module.buffers())
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}


class FusionStudent(Wrapper):
    """A trainable, shallower cross-encoder of the teacher's family (delegates scoring to ``self.model``)."""

    family = "fusion"

    def __init__(
        self,
        model: Scorer,
        teacher_family: Optional[str] = None,
        layers: Sequence[int] = (),
        frozen: Sequence[str] = (),
        frozen_eval: bool = True,
    ):
        """Wrap an already shrunken ``model``; ``frozen`` names its submodules kept fixed (and in eval mode)."""
        super().__init__()
        if isinstance(model, Teacher):
            raise TypeError("FusionStudent wraps its own copy of a model; use FusionStudent.from_teacher(teacher)")
        self.model = model
        self.teacher_family = teacher_family or getattr(model, "family", type(model).__name__)
        self.layers = tuple(int(i) for i in layers)
        self.frozen = tuple(frozen)
        self.frozen_eval = frozen_eval
        for name in self.frozen:
            self.model.get_submodule(name)  # raises AttributeError naming the missing module
        self.set_frozen()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_teacher(
        cls,
        teacher_model: Scorer,
        layers: Optional[Sequence[int]] = None,
        frozen: Optional[Sequence[str]] = None,
        frozen_eval: bool = True,
    ) -> "FusionStudent":
        """``teacher.shrink(layers)`` (a deep copy), re-enabled for training, with the family's towers frozen.

        Args:
            teacher_model: a ``teachers.Teacher`` (its ``.model`` is used) or the raw architecture.
            layers: teacher layer indices to keep, increasing; default :func:`default_fusion_layers`
                (METER with 6 layers: (0, 3, 5) as in DCD).
            frozen: submodule names to freeze; default per family (METER: the unimodal towers, the
                cross-modal transforms and token-type embeddings; ViLT: none).
            frozen_eval: keep frozen submodules in eval mode when the student is in train mode.
        """
        model = teacher_model.model if isinstance(teacher_model, Teacher) else teacher_model
        if not isinstance(model, nn.Module) or not hasattr(model, "shrink"):
            raise TypeError(
                f"a fusion student needs a cross-encoder with shrink(layer_indices) (METER, ViLT), "
                f"got {type(teacher_model).__name__}"
            )
        family = getattr(model, "family", type(model).__name__)
        depth = num_fusion_layers(model)
        layers = validate_layers(default_fusion_layers(depth) if layers is None else layers, depth)
        if frozen is None:
            frozen = _FROZEN.get(family, getattr(model, "fusion_frozen", ()))
        inner = model.shrink(layers)
        if _storage_ptrs(inner) & _storage_ptrs(model):  # shrink must deep-copy; never train teacher storage
            raise RuntimeError(f"{type(model).__name__}.shrink returned a model sharing storage with the teacher")
        for p in inner.parameters():  # a Teacher's parameters were frozen; the copy is ours to train
            p.requires_grad_(True)
        student = cls(inner, teacher_family=family, layers=layers, frozen=frozen, frozen_eval=frozen_eval)
        return student.train()

    # ----------------------------------------------------------------- freezing
    def set_frozen(self) -> None:
        for name in self.frozen:
            for p in self.model.get_submodule(name).parameters():
                p.requires_grad_(False)
        if self.frozen_eval:
            for name in self.frozen:
                self.model.get_submodule(name).eval()

    def train(self, mode: bool = True) -> "FusionStudent":
        super().train(mode)
        if mode and self.frozen_eval:
            for name in self.frozen:
                self.model.get_submodule(name).eval()
        return self

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def named_trainable_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    # ----------------------------------------------------------------- Scorer: the inner model's (Wrapper)
    @property
    def pair_chunk(self) -> int:  # type: ignore[override]
        return self.model.pair_chunk

    def score(self, images: Inputs, texts: Inputs) -> Tensor:
        return self.model.score(images, texts)

    def score_pairs(self, images: Inputs, texts: Inputs) -> Tensor:
        return self.model.score_pairs(images, texts)

    def forward(self, images: Inputs, texts: Inputs) -> Tensor:
        """Aligned pairs -> logits [N] (one call, so DDP sees every used parameter)."""
        return self.score_pairs(images, texts)

    # ----------------------------------------------------------------- serialisation
    def config_dict(self) -> Dict[str, object]:
        return {
            "teacher_family": self.teacher_family,
            "layers": list(self.layers),
            "frozen": list(self.frozen),
            "frozen_eval": self.frozen_eval,
            "model_dir": MODEL_DIR,
        }

    def save_pretrained(self, directory: str | Path) -> Path:
        """``dir/model/`` in the inner model's own format, then ``dir/config.json`` (written last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory / MODEL_DIR)
        hub.save_config(directory, self.family, self.config_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "FusionStudent":
        directory = Path(directory)
        config = hub.read_config(directory, family=cls.family, required=("teacher_family", "layers", "frozen"))
        model_dir = directory / config.get("model_dir", MODEL_DIR)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir} is missing: the inner {config['teacher_family']} model of {directory}")
        family = config["teacher_family"]
        if family not in teachers.TEACHERS:
            raise KeyError(f"no fusion student for teacher family {family!r} ({directory / hub.CONFIG_NAME}): "
                           f"{teachers.TEACHERS.unknown(family)}")
        model = teachers.create_model(family, checkpoint=model_dir)
        for p in model.parameters():
            p.requires_grad_(True)
        student = cls(
            model, teacher_family=config["teacher_family"], layers=config["layers"], frozen=config["frozen"],
            frozen_eval=config.get("frozen_eval", True),
        )
        return student.to(map_location).train()
