"""The files every layer writes and reads, one helper each: atomic writes, JSON, arrays, safetensors weights.

Every write goes to a temporary file next to its target, is flushed to disk and renamed over the
target (``os.replace`` is atomic on POSIX), so a crash at any moment leaves either the old file or the
new one, never a torn one. Reads raise errors that name the file. This module sits at the bottom of the
layering (teachers <- students <- dcd) so that teachers, students, the pipeline, the index and the
benchmarks share it; it imports nothing of the project.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

__all__ = ["atomic_write", "load_weights", "read_json", "save_array", "save_weights", "write_json", "write_text"]


def atomic_write(path: str | Path, write_fn: Callable[[str], None]) -> None:
    """``write_fn(tmp)`` into a temporary file next to ``path``, fsync, then ``os.replace`` it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) to ``path``, atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)


def write_json(path: str | Path, obj: Any, indent: int = 2, sort_keys: bool = True, newline: bool = True,
               default: Optional[Callable[[Any], Any]] = None) -> None:
    """``obj`` as JSON to ``path``, atomically (configs: ``indent=2``, sorted keys, a final newline)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + ("\n" if newline else "")
    write_text(path, text)


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The JSON value in ``path``; a missing or unparsable file raises an error naming it as ``what``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def save_array(path: str | Path, array) -> None:
    """A numpy array (``np.save``), or a dict of named arrays (``np.savez``), atomically.

    Written through a handle: ``np.save`` / ``np.savez`` would append ``.npy`` / ``.npz`` to a bare temporary name.
    """
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            if isinstance(array, dict):
                np.savez(handle, **array)
            else:
                np.save(handle, array)

    atomic_write(path, write)


def save_weights(path: str | Path, state_dict: Mapping[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """A state dict as safetensors, atomically (tensors copied to contiguous CPU storage)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})}))


def load_weights(path: str | Path) -> Dict[str, Any]:
    """The tensors of a safetensors file, on the CPU; a missing or unreadable file raises an error naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # truncated or foreign file
        raise RuntimeError(f"{path} could not be read as safetensors ({type(err).__name__}: {err})") from err
