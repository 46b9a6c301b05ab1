"""Student registry (timm style): ``create_student(name, **config)``, ``register_student``, ``load_student(dir)``.

Two kinds of student ship with dcd, both ``teachers.Scorer`` subclasses:

* ``"dual"`` (:class:`DualEncoder`): independent image / text towers, dot-product scores; the fast
  first stage. ``create_student("dual", **config_fields)`` builds one from a :class:`DualEncoderConfig`;
  ``create_student("dual", teacher=meter)`` copies a METER teacher's unimodal towers.
* ``"fusion"`` (:class:`FusionStudent`): a shallower copy of the teacher's own cross-encoder; the
  re-ranker. ``create_student("fusion", teacher=teacher, layers=(0, 3, 5))``.

Presets: ``"dual_tiny"`` (the embedded default), ``"dual_test"`` (unit-test size). A third party adds
a student with the decorator ``@students.register_student("name")`` on a factory
``factory(teacher=None, **config) -> Scorer``, or with an entry point in group ``dcd.students``.

``load_student(dir)`` reads ``dir/config.json``, whose ``"family"`` names the class whose
``from_pretrained(dir)`` rebuilds it (families: ``"dual"``, ``"fusion"``, or any registered with
``register_family``).
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, List, Optional

from teachers.base import Scorer

from . import hub
from .dual import SMALL_DUAL, DualEncoder, DualEncoderConfig, dual_minilm1_vit128x2, dual_test, dual_tiny
from .fusion import FusionStudent, default_fusion_layers

ENTRY_POINT_GROUP = "dcd.students"

_FACTORIES: Dict[str, Callable[..., Scorer]] = {}
_FAMILIES: Dict[str, type] = {"dual": DualEncoder, "fusion": FusionStudent}
_entry_points_loaded = False


def register_student(name: str) -> Callable:
    """Decorator: register ``factory(teacher=None, **config) -> Scorer`` under ``name``."""

    def decorate(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"student {name!r} is already registered by {_FACTORIES[name]!r}")
        _FACTORIES[name] = factory
        return factory

    return decorate


def register_family(family: str, cls: type) -> type:
    """Make ``load_student`` read directories whose config.json says ``"family": family`` with ``cls``."""
    if not hasattr(cls, "from_pretrained"):
        raise TypeError(f"{cls.__name__} has no from_pretrained(directory)")
    _FAMILIES[family] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _FACTORIES:
            _FACTORIES[ep.name] = ep.load()


def list_students() -> List[str]:
    _load_entry_points()
    return sorted(_FACTORIES)


def create_student(name: str, teacher: Optional[Scorer] = None, **config) -> Scorer:
    """Build student ``name``; ``teacher`` is passed to factories that initialise from it."""
    if name not in _FACTORIES:
        _load_entry_points()
    if name not in _FACTORIES:
        raise KeyError(f"unknown student {name!r}; registered students: {', '.join(list_students())}")
    return _FACTORIES[name](teacher=teacher, **config)


def load_student(directory: str | Path, **kwargs) -> Scorer:
    """Rebuild a student saved with ``save_pretrained(directory)``, whatever its family."""
    family = hub.read_config(Path(directory))["family"]
    if family not in _FAMILIES:
        raise KeyError(
            f"{Path(directory) / hub.CONFIG_NAME} names family {family!r}; known student families: "
            f"{', '.join(sorted(_FAMILIES))} (add one with students.register_family)"
        )
    return _FAMILIES[family].from_pretrained(directory, **kwargs)


# --------------------------------------------------------------------------------------------- built-ins
@register_student("dual")
def _dual(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
    """Config fields of ``DualEncoderConfig`` (defaults: the embedded default); with a METER teacher, its towers."""
    if teacher is not None:
        return DualEncoder.from_teacher(teacher, **config)
    pretrained = config.pop("pretrained", True)
    return DualEncoder(DualEncoderConfig(**config), pretrained=pretrained)


@register_student("dual_tiny")
def _dual_tiny(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
    _no_teacher("dual_tiny", teacher)
    return dual_tiny(**config)


@register_student(SMALL_DUAL)
def _dual_small(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
    _no_teacher(SMALL_DUAL, teacher)
    return dual_minilm1_vit128x2(**config)


@register_student("dual_test")
def _dual_test(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
    _no_teacher("dual_test", teacher)
    return dual_test(**config)


@register_student("fusion")
def _fusion(teacher: Optional[Scorer] = None, **config) -> FusionStudent:
    if teacher is None:
        raise ValueError("the 'fusion' student is a shallower copy of its teacher: pass teacher=...")
    return FusionStudent.from_teacher(teacher, **config)


def _no_teacher(name: str, teacher: Optional[Scorer]) -> None:
    if teacher is not None:
        raise ValueError(f"{name!r} builds its own towers and takes no teacher; use create_student('dual', teacher=...)")


__all__ = [
    "DualEncoder", "DualEncoderConfig", "FusionStudent", "create_student", "default_fusion_layers", "dual_test",
    "dual_tiny", "list_students", "load_student", "register_family", "register_student",
]
