"""Student registry (timm style): ``create_student(name, **config)``, ``register_student``, ``load_student(dir)``.

Two kinds of student ship with dcd, both ``teachers.Scorer`` subclasses:

* ``"dual"`` (:class:`DualEncoder`): independent image / text towers, dot-product scores; the fast
  first stage. ``create_student("dual", **config_fields)`` builds one from a :class:`DualEncoderConfig`;
  ``create_student("dual", teacher=meter)`` copies a cross-encoder teacher's unimodal towers.
* ``"fusion"`` (:class:`FusionStudent`): a shallower copy of the teacher's own cross-encoder; the
  re-ranker. ``create_student("fusion", teacher=teacher, layers=(0, 3, 5))``.

Presets, each named after its size (``dual-<text tower><layers>-vit<width>x<blocks>``):
``"dual-minilm1-vit128x2"`` (``SMALL_DUAL``, the embedded default's student), ``"dual-minilm2-vit192x4"``,
``"dual-minilm6-vit192x4"`` (``DualEncoderConfig``'s defaults) and ``"dual-bert32x1-vit32x1"`` (unit-test
size; deprecated alias ``"dual_test"``). A third party adds a student with the decorator
``@students.register_student("name")`` on a factory ``factory(teacher=None, **config) -> Scorer``, or with
an entry point in group ``dcd.students``.

``load_student(dir)`` reads ``dir/config.json``, whose ``"family"`` names the class whose
``from_pretrained(dir)`` rebuilds it (families: ``"dual"``, ``"fusion"``, or any registered with
``register_family``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from teachers.base import Scorer
from teachers.registry import Registry, UnknownName

from . import hub
from .dual import (
    SMALL_DUAL, DualEncoder, DualEncoderConfig, dual_bert32x1_vit32x1, dual_minilm1_vit128x2, dual_minilm2_vit192x4,
    dual_minilm6_vit192x4, dual_test,
)
from .fusion import FusionStudent, default_fusion_layers

ENTRY_POINT_GROUP = "dcd.students"

#: student name -> ``factory(teacher=None, **config) -> Scorer``
STUDENTS = Registry("student", entry_points=ENTRY_POINT_GROUP, hint="(add one with students.register_student)")
#: the ``"family"`` of a saved student's config.json -> the class whose ``from_pretrained(dir)`` reads it
FAMILIES = Registry("student family", hint="(add one with students.register_family)")


def register_student(name: str) -> Callable:
    """Decorator: register ``factory(teacher=None, **config) -> Scorer`` under ``name``."""
    return STUDENTS.register(name)


def register_family(family: str, cls: type) -> type:
    """Make ``load_student`` read directories whose config.json says ``"family": family`` with ``cls``."""
    if not hasattr(cls, "from_pretrained"):
        raise TypeError(f"{cls.__name__} has no from_pretrained(directory)")
    return FAMILIES.register(family, cls, replace=True)


def list_students() -> List[str]:
    return STUDENTS.list()


def create_student(name: str, teacher: Optional[Scorer] = None, **config) -> Scorer:
    """Build student ``name``; ``teacher`` is passed to factories that initialise from it."""
    return STUDENTS.create(name, teacher=teacher, **config)


def load_student(directory: str | Path, **kwargs) -> Scorer:
    """Rebuild a student saved with ``save_pretrained(directory)``, whatever its family."""
    family = hub.read_config(Path(directory))["family"]
    try:
        cls = FAMILIES.get(family)
    except UnknownName as err:
        raise UnknownName(f"{Path(directory) / hub.CONFIG_NAME}: {err}") from None
    return cls.from_pretrained(directory, **kwargs)


# --------------------------------------------------------------------------------------------- built-ins
register_family("dual", DualEncoder)
register_family("fusion", FusionStudent)


@register_student("dual")
def _dual(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
    """Config fields of ``DualEncoderConfig``; with a teacher that has unimodal towers (METER), its towers."""
    if teacher is not None:
        return DualEncoder.from_teacher(teacher, **config)
    pretrained = config.pop("pretrained", True)
    return DualEncoder(DualEncoderConfig(**config), pretrained=pretrained)


def _preset(name: str, build: Callable[..., DualEncoder]) -> None:
    """Register ``build`` as the student ``name``, a preset that builds its own towers (it takes no teacher)."""

    def factory(teacher: Optional[Scorer] = None, **config) -> DualEncoder:
        if teacher is not None:
            raise ValueError(f"{name!r} builds its own towers and takes no teacher; "
                             "use create_student('dual', teacher=...)")
        return build(**config)

    factory.__doc__ = build.__doc__
    STUDENTS.register(name, factory)


_preset(SMALL_DUAL, dual_minilm1_vit128x2)
_preset("dual-minilm2-vit192x4", dual_minilm2_vit192x4)
_preset("dual-minilm6-vit192x4", dual_minilm6_vit192x4)
_preset("dual-bert32x1-vit32x1", dual_bert32x1_vit32x1)
STUDENTS.alias("dual_test", "dual-bert32x1-vit32x1")


@register_student("fusion")
def _fusion(teacher: Optional[Scorer] = None, **config) -> FusionStudent:
    """A shallower copy of the teacher's own cross-encoder (half its fusion layers by default); needs teacher=."""
    if teacher is None:
        raise ValueError("the 'fusion' student is a shallower copy of its teacher: pass teacher=...")
    return FusionStudent.from_teacher(teacher, **config)


__all__ = [
    "DualEncoder", "DualEncoderConfig", "FAMILIES", "FusionStudent", "SMALL_DUAL", "STUDENTS", "create_student",
    "default_fusion_layers", "dual_bert32x1_vit32x1", "dual_minilm1_vit128x2", "dual_minilm2_vit192x4",
    "dual_minilm6_vit192x4", "dual_test", "list_students", "load_student", "register_family", "register_student",
]
