"""Teacher registry: ``create_teacher(name, checkpoint=None, **config)``, plug-in registration, raw-model hooks.

Built-ins are "meter" and "vilt". A third party adds a teacher family without editing dcd, either with
the decorator::

    @teachers.register_teacher("blip-itm")
    def build_blip(checkpoint=None, **config) -> teachers.Scorer: ...

or by declaring an entry point in its own package (group ``dcd.teachers``, value ``module:factory``).
A factory builds the family's architecture from ``config`` (its fields, or ``config=`` a whole saved
config, or ``preset=``), and reads ``checkpoint`` -- at least the directory its model's
``save_pretrained`` writes. Students and benchmarks reach a family only through this registry and the
interface in :mod:`teachers.base` (``unimodal_towers``, ``shrink``, ...), never by importing its module,
so a family registered here gets dual and fusion students with no edit elsewhere.

``as_teacher(obj)`` turns what a user hands to ``dcd.wrap`` into a frozen ``Teacher``: a ``Scorer``
is wrapped directly; a raw model (say a transformers ``ViltForImageAndTextRetrieval``) goes through
the hook registered for its class with ``register_hook``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional

from .base import (
    Features, Inputs, Scorer, ScoringView, Teacher, Towers, concat, num_items, pad_images, select, to_device,
)
from .registry import Registry, UnknownName

ENTRY_POINT_GROUP = "dcd.teachers"


def _load_builtins() -> None:
    from . import meter, vilt  # noqa: F401  (their decorators register them)


#: teacher family -> ``factory(checkpoint=None, **config) -> Scorer`` (the trainable architecture)
TEACHERS = Registry("teacher", entry_points=ENTRY_POINT_GROUP, builtins=_load_builtins,
                    hint="(add one with teachers.register_teacher)")
#: raw model class -> ``hook(raw_model) -> Scorer`` (``as_teacher`` walks the class's MRO)
HOOKS = Registry("teacher hook", builtins=_load_builtins, hint="(add one with teachers.register_hook)")


def register_teacher(name: str) -> Callable:
    """Decorator: register ``factory(checkpoint=None, **config) -> Scorer`` under ``name``."""
    return TEACHERS.register(name)


def register_hook(model_class: type) -> Callable:
    """Decorator: register ``hook(raw_model) -> Scorer`` for instances of ``model_class``."""
    return HOOKS.register(model_class, replace=True)


def list_teachers() -> List[str]:
    return TEACHERS.list()


def create_model(name: str, checkpoint: str | Path | None = None, **config) -> Scorer:
    """Build the (trainable) architecture of teacher ``name``; ``create_teacher`` freezes it."""
    return TEACHERS.create(name, checkpoint=checkpoint, **config)


def create_teacher(name: str, checkpoint: str | Path | None = None, **config) -> Teacher:
    """A frozen teacher ``name``, loaded from ``checkpoint`` (hub id, directory or file) when given."""
    return Teacher(create_model(name, checkpoint=checkpoint, **config))


def saved_family(checkpoint: str | Path) -> Optional[str]:
    """The registered family a saved teacher says it is, from its directory's ``config.json``.

    The config names it as ``"family"`` (what dcd's ``save_pretrained`` writes) or as transformers'
    ``"model_type"``. None when there is no saved config to read (a checkpoint file, a hub id) or when
    the name is no registered family: then only the family's own loader can tell.
    """
    config_file = Path(checkpoint) / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    tag = str(config.get("family") or config.get("model_type") or "")
    return tag if tag and tag in TEACHERS else None


def build_towers(family: str, config: dict) -> Towers:
    """Rebuild (random weights) the towers that ``Towers.config`` of a ``family`` teacher describes."""
    return create_model(family, config=config).unimodal_towers()


def as_teacher(obj: object, precision: Optional[str] = None) -> Teacher:
    """Whatever a user passes as the teacher -> a frozen ``Teacher``.

    ``precision`` (``auto``, ``fp32``, ``bf16``, ``fp16``): what its passes compute in; None keeps a
    ``Teacher``'s own and gives a new one ``auto`` (bf16 where bf16 is fast, :mod:`teachers.precision`).
    A ``Teacher`` asked for another precision comes back as a new view of the same model.
    """
    if isinstance(obj, Teacher):  # another precision: a second view of the same model
        return obj if precision is None or precision == obj.precision else Teacher(obj.model, precision)
    if isinstance(obj, ScoringView):  # a student's scoring view: the student itself becomes the teacher
        return Teacher(obj.model, precision or obj.precision)
    precision = precision or "auto"
    if isinstance(obj, Scorer):
        return Teacher(obj, precision)
    if isinstance(obj, str):
        return as_teacher(create_teacher(obj), precision)
    for cls in type(obj).__mro__:
        if cls in HOOKS:
            return Teacher(HOOKS.get(cls)(obj), precision)
    raise TypeError(
        f"cannot use a {type(obj).__name__} as a teacher: pass a teachers.Scorer, a registered teacher "
        f"name ({', '.join(list_teachers())}), or register a hook with teachers.register_hook({type(obj).__name__})"
    )


__all__ = [
    "Features", "HOOKS", "Inputs", "Scorer", "ScoringView", "TEACHERS", "Teacher", "Towers", "UnknownName", "as_teacher",
    "build_towers", "concat", "create_model", "create_teacher", "list_teachers", "num_items", "pad_images",
    "register_hook", "register_teacher", "saved_family", "select", "to_device",
]
