"""Which student made an index: its family, architecture config, its stage (the training identity and its hash,
:mod:`dcd.stages`) and the sha256 of its weights.

Vectors from two students live in different spaces even when their shapes agree, so a query encoded
by any student other than the one that built the index is refused (:func:`check_student`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..data import DataError
from ..stages import read_stage, weights_sha256

__all__ = ["StudentMismatch", "check_student", "describe_student"]


class StudentMismatch(DataError):
    """A query through an index built by another student (or by other weights of the same one)."""


def describe_student(student: torch.nn.Module, path: Optional[Path] = None) -> Dict[str, Any]:
    """What the index records of ``student`` (saved in ``path``, if it came from a directory): the weights it must
    be queried with, and where it came from.

    ``stage`` is the hash of the student stage it was trained in and ``recipe`` that stage's identity
    (:meth:`dcd.recipes.Recipe.identity`, the ``stage.json`` one level up from a ``dcd distill`` student), when
    there is one.
    """
    config = getattr(student, "config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else None
    stage = read_stage(Path(path).parent) if path is not None else None
    return json.loads(json.dumps({
        "family": getattr(student, "family", type(student).__name__),
        "weights_sha256": weights_sha256(student),
        "path": str(Path(path).resolve()) if path is not None else None,
        "config": config,
        "stage": stage["fingerprint"] if stage else None,
        "recipe": stage["identity"] if stage else None,
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
