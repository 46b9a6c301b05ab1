"""``Registry``: name -> builder, the one lookup behind every registry of dcd (as timm's ``register_model``).

Teachers, their raw-model hooks, students, student families and data sets are each a ``Registry``::

    TEACHERS = Registry("teacher", entry_points="dcd.teachers")

    @TEACHERS.register("blip-itm")
    def build_blip(checkpoint=None, **config): ...

    TEACHERS.create("blip-itm", checkpoint=...)   # -> build_blip(checkpoint=..., ...)
    TEACHERS.list()                                # ["blip-itm", "meter", "vilt"]

A name looked up but not registered raises :class:`UnknownName` (a ``KeyError``) with one message
format for every registry: ``unknown <kind> '<name>'; registered: a, b, c`` (plus a hint saying how to
add one). An old name can stay as a deprecated alias of a new one: it still resolves, with a
``DeprecationWarning``, and is not listed. The module sits at the bottom of the layering (teachers <-
students <- dcd) so that every layer can use it; it imports nothing of the project.
"""
from __future__ import annotations

import warnings
from importlib import metadata
from typing import Any, Callable, Dict, Hashable, Iterable, List, Optional

__all__ = ["Registry", "UnknownName"]


class UnknownName(KeyError, ValueError):
    """A name no registry entry has; ``str(err)`` is the message itself (not its repr, as KeyError's is).

    A ``KeyError`` and a ``ValueError`` both, so that callers of the lookups it replaced (some raised one,
    some the other) keep catching it.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry:
    """Entries by name, filled by ``register`` (a decorator too), read by ``get`` / ``create`` / ``list``.

    Args:
        kind: what an entry is, for messages ("teacher", "student family", "data set").
        entry_points: an ``importlib.metadata`` entry-point group whose entries (``module:object``) are
            registered on the first miss or listing, so that installed packages add entries by declaring
            them; the project's own entries never need it.
        builtins: called once before the first lookup, to import the modules that register the
            built-in entries (lets a package register lazily, without import cycles).
        hint: appended to the unknown-name message, e.g. "(add one with teachers.register_teacher)".
    """

    def __init__(self, kind: str, entry_points: Optional[str] = None,
                 builtins: Optional[Callable[[], None]] = None, hint: str = ""):
        self.kind = kind
        self.hint = hint
        self._entries: Dict[Hashable, Any] = {}
        self._aliases: Dict[Hashable, Hashable] = {}
        self._entry_points = entry_points
        self._builtins = builtins
        self._loaded_builtins = builtins is None
        self._loaded_entry_points = entry_points is None

    # ----------------------------------------------------------------- writing
    def register(self, name: Hashable, obj: Any = None, *, replace: bool = False) -> Any:
        """Register ``obj`` under ``name``; without ``obj``, a decorator that registers what it decorates.

        Registering another object under a taken name raises ``ValueError`` unless ``replace=True``
        (registering the same object again is a no-op).
        """
        if obj is None:
            return lambda target: self.register(name, target, replace=replace)
        current = self._entries.get(name)
        if current is not None and current is not obj and not replace:
            raise ValueError(f"{self.kind} {self._label(name)!r} is already registered by {current!r}")
        self._entries[name] = obj
        return obj

    def alias(self, old: Hashable, new: Hashable) -> None:
        """Keep ``old`` working as a deprecated name of ``new`` (resolves with a ``DeprecationWarning``)."""
        self._aliases[old] = new

    # ----------------------------------------------------------------- reading
    def get(self, name: Hashable) -> Any:
        """The entry registered under ``name`` (or under the name a deprecated alias points to)."""
        self._load()
        if name in self._aliases and name not in self._entries:
            new = self._aliases[name]
            warnings.warn(f"{self.kind} {self._label(name)!r} is deprecated: use {self._label(new)!r}",
                          DeprecationWarning, stacklevel=3)
            name = new
        if name not in self._entries:
            self._load_entry_points()
        if name not in self._entries:
            raise UnknownName(self.unknown(name))
        return self._entries[name]

    __getitem__ = get

    def create(self, name: Hashable, *args, **kwargs) -> Any:
        """``get(name)(*args, **kwargs)``: build what a factory entry makes."""
        return self.get(name)(*args, **kwargs)

    def list(self) -> List[str]:
        """The registered names, sorted (deprecated aliases left out)."""
        self._load()
        self._load_entry_points()
        return sorted(self._label(name) for name in self._entries)

    def aliases(self) -> Dict[str, str]:
        """Deprecated name -> the name it resolves to."""
        return {self._label(old): self._label(new) for old, new in sorted(self._aliases.items(), key=str)}

    def items(self) -> Iterable:
        self._load()
        self._load_entry_points()
        return list(self._entries.items())

    def __contains__(self, name: Hashable) -> bool:
        self._load()
        if name in self._entries or name in self._aliases:
            return True
        self._load_entry_points()
        return name in self._entries

    def unknown(self, name: Hashable, known: Optional[Iterable[str]] = None) -> str:
        """The one message of every registry for a name it does not have, listing the ones it has."""
        names = sorted(known) if known is not None else self.list()
        return (f"unknown {self.kind} {self._label(name)!r}; registered: {', '.join(names) or '(none)'}"
                + (f" {self.hint}" if self.hint else ""))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.list())})"

    # ----------------------------------------------------------------- loading
    @staticmethod
    def _label(name: Hashable) -> str:
        return name.__name__ if isinstance(name, type) else str(name)

    def _load(self) -> None:
        if not self._loaded_builtins:
            self._loaded_builtins = True
            self._builtins()

    def _load_entry_points(self) -> None:
        if self._loaded_entry_points:
            return
        self._loaded_entry_points = True
        for ep in metadata.entry_points(group=self._entry_points):
            if ep.name not in self._entries:
                self._entries[ep.name] = ep.load()
