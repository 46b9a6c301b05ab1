"""Which student made an index: its family, architecture config, training recipe and a hash of its weights.

Vectors from two students live in different spaces even when their shapes agree, so a query encoded
by any student other than the one that built the index is refused (:func:`check_student`).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..checkpoint import RECIPE_NAME
from ..data import DataError

__all__ = ["StudentMismatch", "check_student", "student_identity", "weights_sha256"]


class StudentMismatch(DataError):
    """A query through an index built by another student (or by other weights of the same one)."""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape and raw bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def student_identity(student: torch.nn.Module, path: Optional[Path] = None) -> Dict[str, Any]:
    """JSON-able identity of ``student`` (saved in ``path``, if it came from a directory).

    ``recipe`` is the training recipe ``dcd distill`` records beside a stage's ``student/`` folder
    (``recipe.json`` one level up), when there is one.
    """
    config = getattr(student, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    recipe = None
    if path is not None and (Path(path).parent / RECIPE_NAME).is_file():
        recipe = json.loads((Path(path).parent / RECIPE_NAME).read_text())
    return json.loads(json.dumps({
        "family": getattr(student, "family", type(student).__name__),
        "weights_sha256": weights_sha256(student),
        "path": str(Path(path).resolve()) if path is not None else None,
        "config": config,
        "recipe": recipe,
    }, default=str))


def check_student(recorded: Dict[str, Any], student: torch.nn.Module, index_path: Path) -> None:
    """Raise :class:`StudentMismatch` unless ``student`` has the weights the index was built with."""
    actual = weights_sha256(student)
    if actual != recorded["weights_sha256"]:
        built_by = recorded.get("path") or "an in-memory student"
        raise StudentMismatch(
            f"index {index_path} was built by another student ({built_by}, weights sha256 "
            f"{recorded['weights_sha256'][:12]}), not this one (weights sha256 {actual[:12]}): its vectors are "
            "in another space. Search with the student that built it, or rebuild the index with this one")
