"""Save / load helpers shared by the students: atomic writes, ``config.json`` with a family tag, safetensors.

A student directory always holds ``config.json`` whose ``"family"`` names the class that reads it
(``students.load_student`` dispatches on it). Every file is written to a temporary name in the same
folder and renamed over the target (``os.replace`` is atomic on POSIX), so an interrupted save never
leaves a half-written file under the final name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

from teachers.base import atomic_write

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_json(path: Path, obj: Mapping[str, Any]) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(Path(path), write)


def save_config(directory: Path, family: str, config: Mapping[str, Any]) -> Path:
    """Write ``directory/config.json`` = ``{"family": family, **config}``."""
    path = Path(directory) / CONFIG_NAME
    write_json(path, {"family": family, **config})
    return path


def read_config(directory: Path, family: str | None = None, required: Iterable[str] = ()) -> Dict[str, Any]:
    """Read ``directory/config.json``; check its family and that the ``required`` fields are present."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"student directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {directory} is not a saved student (save_pretrained writes it)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, found {type(config).__name__}")
    if "family" not in config:
        raise KeyError(f"{path} has no 'family' field (expected e.g. 'dual' or 'fusion')")
    if family is not None and config["family"] != family:
        raise ValueError(f"{path} holds a {config['family']!r} student, not a {family!r} one")
    missing = [key for key in required if key not in config]
    if missing:
        raise KeyError(f"{path} lacks the field(s) {', '.join(repr(k) for k in missing)}")
    return config


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Write a state dict as safetensors, atomically (tensors are copied to contiguous CPU storage)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def load_weights(path: Path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} is missing")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # truncated or foreign file
        raise RuntimeError(f"{path} could not be read as safetensors ({type(err).__name__}: {err})") from err


def load_state_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict(strict=True)`` with an error that names the file and the offending keys."""
    result = module.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        parts = []
        if result.missing_keys:
            parts.append(f"missing {len(result.missing_keys)} key(s), e.g. {result.missing_keys[:5]}")
        if result.unexpected_keys:
            parts.append(f"unexpected {len(result.unexpected_keys)} key(s), e.g. {result.unexpected_keys[:5]}")
        raise RuntimeError(f"{source} does not match the architecture in its config.json: " + "; ".join(parts))
