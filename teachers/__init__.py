"""Teacher registry: ``create_teacher(name, checkpoint=None, **config)``, plug-in registration, raw-model hooks.

Built-ins are "meter" and "vilt". A third party adds a teacher without editing dcd, either with the
decorator::

    @teachers.register_teacher("blip-itm")
    def build_blip(checkpoint=None, **config) -> teachers.Scorer: ...

or by declaring an entry point in its own package (group ``dcd.teachers``, value ``module:factory``).
``as_teacher(obj)`` turns what a user hands to ``dcd.wrap`` into a frozen ``Teacher``: a ``Scorer``
is wrapped directly; a raw model (say a transformers ``ViltForImageAndTextRetrieval``) goes through
the hook registered for its class with ``register_hook``.
"""
from __future__ import annotations

from importlib import metadata
from typing import Callable, Dict, List

from .base import Features, Inputs, Scorer, Teacher, concat, num_items, pad_images, select, to_device

ENTRY_POINT_GROUP = "dcd.teachers"

_FACTORIES: Dict[str, Callable[..., Scorer]] = {}
_HOOKS: Dict[type, Callable[[object], Scorer]] = {}
_entry_points_loaded = False


def register_teacher(name: str) -> Callable:
    """Decorator: register ``factory(checkpoint=None, **config) -> Scorer`` under ``name``."""

    def decorate(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"teacher {name!r} is already registered by {_FACTORIES[name]!r}")
        _FACTORIES[name] = factory
        return factory

    return decorate


def register_hook(model_class: type) -> Callable:
    """Decorator: register ``hook(raw_model) -> Scorer`` for instances of ``model_class``."""

    def decorate(hook: Callable[[object], Scorer]) -> Callable[[object], Scorer]:
        _HOOKS[model_class] = hook
        return hook

    return decorate


def _load_builtins() -> None:
    from . import meter, vilt  # noqa: F401  (their decorators register them)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _FACTORIES:
            _FACTORIES[ep.name] = ep.load()


def list_teachers() -> List[str]:
    _load_builtins()
    _load_entry_points()
    return sorted(_FACTORIES)


def create_model(name: str, checkpoint: str | None = None, **config) -> Scorer:
    """Build the (trainable) architecture of teacher ``name``; ``create_teacher`` freezes it."""
    _load_builtins()
    if name not in _FACTORIES:
        _load_entry_points()
    if name not in _FACTORIES:
        raise KeyError(f"unknown teacher {name!r}; registered teachers: {', '.join(list_teachers())}")
    return _FACTORIES[name](checkpoint=checkpoint, **config)


def create_teacher(name: str, checkpoint: str | None = None, **config) -> Teacher:
    """A frozen teacher ``name``, loaded from ``checkpoint`` (hub id, directory or file) when given."""
    return Teacher(create_model(name, checkpoint=checkpoint, **config))


def as_teacher(obj: object) -> Teacher:
    """Whatever a user passes as the teacher -> a frozen ``Teacher``."""
    if isinstance(obj, Teacher):
        return obj
    if isinstance(obj, Scorer):
        return Teacher(obj)
    if isinstance(obj, str):
        return create_teacher(obj)
    _load_builtins()
    for cls in type(obj).__mro__:
        if cls in _HOOKS:
            return Teacher(_HOOKS[cls](obj))
    raise TypeError(
        f"cannot use a {type(obj).__name__} as a teacher: pass a teachers.Scorer, a registered teacher "
        f"name ({', '.join(list_teachers())}), or register a hook with teachers.register_hook({type(obj).__name__})"
    )


__all__ = [
    "Features", "Inputs", "Scorer", "Teacher", "as_teacher", "concat", "create_model", "create_teacher",
    "list_teachers", "num_items", "pad_images", "register_hook", "register_teacher", "select", "to_device",
]
