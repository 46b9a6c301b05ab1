"""Loading released Lightning ``.ckpt`` files without running anything they hold.

The official METER and ViLT checkpoints were written by pytorch-lightning 1.1 / 1.3, which pickles class objects
into the file (the ``callbacks`` entry is keyed by ``ModelCheckpoint``; hyper-parameters may be an
``AttributeDict`` or an ``argparse.Namespace``, and may hold numpy scalars). ``torch.load(weights_only=True)``
refuses such a file, and unpickling it in full needs those 1.x releases (which do not run on today's torch)
and trusts the file with arbitrary code.

:func:`load` is the middle way. Tensors, storages and plain containers come through as they are; every other
global becomes an :class:`Inert` placeholder that is never imported and never called: an object the file
rebuilds from one (``NEWOBJ`` + ``BUILD``: ``AttributeDict``, ``Namespace``) reads back as a plain dict of its
items and attributes, and a numpy scalar or dtype as a record of its arguments. A pickle that calls anything
else (``REDUCE`` on a placeholder: ``os.system``, ``builtins.eval``, any ``__reduce__`` payload) is refused with
:class:`UnsafePickle` before the call, naming what it tried to call: nothing from the file runs.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Dict, Tuple

import torch

__all__ = ["Inert", "UnsafePickle", "load", "plain"]


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that tries to call something outside the allow-list: refused, nothing called."""


class Inert(dict):
    """Stands in for a class (or an instance of one) named in a checkpoint and never imported.

    Subclasses are made per ``module.name`` (:func:`_placeholder`); an instance holds what the file gave it: dict
    items (``SETITEMS``) and attributes (``BUILD``) as dict entries, positional arguments in ``args``."""

    module = "?"
    name = "?"

    def __repr__(self) -> str:
        return f"<inert {self.module}.{self.name} {dict.__repr__(self)}>"


_PLACEHOLDERS: Dict[Tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(f"Inert_{name}", (Inert,), {"module": module, "name": name})
    return _PLACEHOLDERS[key]


#: globals a checkpoint may name and get for real: how torch rebuilds tensors, and plain containers
ALLOWED = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("builtins", "complex"), ("builtins", "bytearray"), ("torch", "Size"), ("torch", "device"),
    ("_codecs", "encode"),  # how protocol 2 writes bytes (a numpy scalar's): str -> bytes, nothing else
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
}
#: placeholders the file may "call" to rebuild a value: recorded, not called (numpy scalars, dtypes, arrays)
RECORDED_CALLS = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype"),
                  ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  # paths and dates in hyper-parameters (a data root, a run's start time)
                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "PureWindowsPath"), ("pathlib", "Path"), ("datetime", "datetime"), ("datetime", "date"),
                  ("datetime", "timedelta")}


class InertUnpickler(pickle._Unpickler):  # the Python unpickler: its opcodes can be intercepted one by one
    """``pickle.Unpickler`` with the allow-list above; see the module docstring."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _placeholder(module, name)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, type) and issubclass(func, Inert):
            if (func.module, func.name) not in RECORDED_CALLS:
                raise UnsafePickle(f"it calls {func.module}.{func.name}{_short(args)}")
            value = func()
            value["args"] = list(args)
            self.stack[-1] = value
            return
        if isinstance(func, Inert):
            raise UnsafePickle(f"it calls an instance of {func.module}.{func.name}")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if isinstance(cls, type) and issubclass(cls, Inert):
            value = cls()
            if args:
                value["args"] = list(args)
            self.append(value)
            return
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        if isinstance(cls, type) and issubclass(cls, Inert):
            value = cls()
            if args or kwargs:
                value.update({"args": list(args), "kwargs": dict(kwargs)})
            self.append(value)
            return
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, type):  # setting attributes on a class (a placeholder or an allowed one): refused
            raise UnsafePickle(f"it sets the state of the class {getattr(inst, 'module', '?')}."
                               f"{getattr(inst, 'name', inst.__name__)}")
        if isinstance(inst, Inert):
            parts = state if isinstance(state, tuple) else (state,)
            for part in parts:
                if isinstance(part, dict):
                    inst.update(part)
                elif part is not None:
                    inst["state"] = part
            return
        self.stack.append(state)
        super().load_build()

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build


def _short(args: Any) -> str:
    text = repr(args)
    return text if len(text) <= 80 else text[:77] + "..."


class _PickleModule:
    """What ``torch.load(pickle_module=...)`` reads: an ``Unpickler`` class (and ``load`` for old formats)."""

    Unpickler = InertUnpickler
    __name__ = "dcd_inert_pickle"

    @staticmethod
    def load(file, **kwargs):
        return InertUnpickler(file, **kwargs).load()


def load(path: str | Path) -> Any:
    """``torch.load`` of ``path`` with the allow-list: tensors as they are, other objects inert
    (:class:`UnsafePickle` when the file tries to call something)."""
    return torch.load(Path(path), map_location="cpu", weights_only=False, pickle_module=_PickleModule)


def plain(value: Any) -> Any:
    """``value`` with every :class:`Inert` turned into a plain dict (recursively): hyper-parameters as data."""
    if isinstance(value, dict):
        return {(k if not (isinstance(k, type) and issubclass(k, Inert)) else f"{k.module}.{k.name}"): plain(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value) if not hasattr(value, "_fields") else value
    return value
