"""A student directory: ``config.json`` with a family tag beside the weights, and the errors that name it.

A student directory always holds ``config.json`` whose ``"family"`` names the class that reads it
(``students.load_student`` dispatches on it). The files are written and read with the helpers of
:mod:`teachers.files` (atomic writes, safetensors), which the teachers and the pipeline use too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping

import torch

from teachers.files import load_weights, read_json, save_weights, write_json

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "load_state_strict", "load_weights", "read_config", "save_config",
           "save_weights", "write_json"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


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
    config = read_json(path)
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
