"""What earlier versions of dcd wrote, used where it lies: a run of today never retrains what one of them made.

Before stage folders were content-addressed (:mod:`dcd.stages`) they were named by role alone and told apart by
a ``recipe.json`` and SHA-1 weight fingerprints. Those folders are read here, in place and read-only (a sweep
still running on the older code keeps working beside a new one):

* the embedded teacher in ``$DCD_HOME/teachers/<family>-<data build>[-<overrides>][-bf16]`` whose
  ``recipe.json`` is today's recipe (:func:`legacy_teacher_dir`);
* a run's ``teacher_scores/`` score cache whose header matches today's but for the SHA-1 of the teacher
  (:func:`legacy_score_cache`); the same for a score matrix header (:func:`legacy_header_matches`);
* an ablation record ``records/<kind>-<method>-seed<s>.json`` whose identity is today's written the old way
  (:func:`legacy_record`): it is copied to its content-addressed name, pointing at the student where it is;
* a ``dcd distill`` student in ``runs/<run>/<role>/`` whose ``recipe.json`` is today's identity written the old
  way (:func:`legacy_student`): reused where it is.

Nothing here deletes or rewrites an old file, except a preset renamed since (:func:`rename_stored_preset`).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

import torch

import teachers
from teachers.files import write_json, write_text

from .data import CaptionSplit, dcd_home
from .trainer import is_main_process

log = logging.getLogger(__name__)

__all__ = ["legacy_sha1", "legacy_teacher_dir", "legacy_score_cache", "legacy_header_matches", "legacy_record",
           "legacy_student", "old_student_identity", "rename_stored_preset"]

RECIPE_NAME = "recipe.json"


def legacy_sha1(model: torch.nn.Module) -> str:
    """The SHA-1 weight fingerprint earlier versions recorded (names, shapes, dtypes and bytes, in name order)."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- teacher
def legacy_teacher_dir(family: str, train: CaptionSplit, overrides: Optional[Dict[str, Any]], precision: str,
                       recipe: Dict[str, Any]) -> Optional[Path]:
    """The folder an earlier version trained this embedded teacher in, when it holds a finished one made by
    ``recipe`` (today's :func:`~dcd.recipes.embedded_recipe`); else None."""
    suffix = ""
    if overrides:
        suffix = "-" + hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if precision != "fp32":
        suffix += f"-{precision}"
    directory = dcd_home() / "teachers" / f"{family}-{Path(str(train.source)).parent.name}{suffix}"
    if not (directory / "teacher.json").is_file():
        return None
    rename_stored_preset(directory, family, recipe)
    stored = directory / RECIPE_NAME
    if stored.is_file() and json.loads(stored.read_text()) == json.loads(json.dumps(recipe)):
        return directory
    return None


def rename_stored_preset(directory: Path, family: str, recipe: Dict[str, Any]) -> None:
    """A teacher trained when its preset had an older name ("tiny") keeps its identity under the new one.

    The stored ``recipe.json`` (and the preset named in ``teacher.json``) is rewritten when it differs from
    ``recipe`` only by a deprecated preset name that resolves to ``recipe["preset"]``; without this,
    renaming a preset would retrain every cached teacher (hours on CPU) for weights that are the same.
    """
    path = directory / RECIPE_NAME
    stored = json.loads(path.read_text()) if path.is_file() else None
    old = stored.get("preset") if isinstance(stored, dict) else None
    presets = getattr(teachers.TEACHERS.get(family), "presets", None)
    aliases = presets.aliases() if presets is not None else {}
    same = old is not None and {**stored, "preset": recipe["preset"]} == json.loads(json.dumps(recipe))
    if same and old != recipe["preset"] and aliases.get(old) == recipe["preset"] and is_main_process():
        log.info("teacher: %s names preset %r by its old name; now %r", path, old, recipe["preset"])
        write_json(path, {**stored, "preset": recipe["preset"]}, indent=1, sort_keys=False, newline=False)
    info_path = directory / "teacher.json"
    if same and info_path.is_file() and is_main_process():  # also when an earlier version renamed the recipe only
        info = json.loads(info_path.read_text())
        if aliases.get(info.get("preset")) == recipe["preset"]:
            write_text(info_path, json.dumps({**info, "preset": recipe["preset"]}, indent=1))


# ---------------------------------------------------------------------------------------------- score files
def legacy_header_matches(stored: Dict[str, Any], expected: Dict[str, Any], key: str, model: torch.nn.Module) -> bool:
    """``stored`` is ``expected`` with the model's weights named by their SHA-1 under ``key`` (an older header)."""
    if stored.get(key) == expected.get(key) or len(str(stored.get(key, ""))) != 40:
        return False
    return stored == {**expected, key: legacy_sha1(model)}


def legacy_score_cache(run_dir: Path, teacher: torch.nn.Module, train: CaptionSplit, pool: Dict[str, Any]):
    """The run folder's ``teacher_scores/`` from an earlier version, opened, when it is today's cache for
    ``teacher``; else None."""
    from .score_cache import TeacherScoreCache, cache_header

    directory = Path(run_dir) / "teacher_scores"
    if not (directory / "header.json").is_file():
        return None
    stored = json.loads((directory / "header.json").read_text())
    expected = cache_header(teacher, train, pool["pool_size"], pool["seed"], pool["near"])
    if not legacy_header_matches(stored, expected, "teacher", teacher):
        return None
    log.info("score cache: using %s, written by an earlier dcd", directory)
    return TeacherScoreCache.open(directory, expect=stored)


# ---------------------------------------------------------------------------------------------- students
def old_student_identity(identity: Dict[str, Any], student: torch.nn.Module, teacher: Optional[torch.nn.Module],
                         cache) -> Dict[str, Any]:
    """Today's student ``identity`` (:meth:`dcd.recipes.Recipe.identity`) as earlier versions wrote it: SHA-1
    fingerprints of the student's start and of the teacher, the score cache's header, no step count."""
    uses = identity["teacher"] is not None
    header = None
    if uses and cache is not None:
        header = {**dict(cache.header), "teacher": legacy_sha1(teacher)}
    old = {
        "student": {"name": getattr(student, "family", type(student).__name__), "start": legacy_sha1(student)},
        "teacher": legacy_sha1(teacher) if uses else None, "data": identity["train"], "score_cache": header,
        "budget": identity["budget"], "dcd": {**identity["dcd"], "total_steps": None},
        "group_size": identity["group_size"], "seed": identity["seed"], "precision": identity["precision"],
        "device_type": identity["device_type"],
    }
    return json.loads(json.dumps(old, default=str))


def legacy_student(directory: Path, identity: Dict[str, Any], student: torch.nn.Module,
                   teacher: Optional[torch.nn.Module], cache) -> Optional[Dict[str, Any]]:
    """The summary of a finished student an earlier ``dcd distill`` trained in ``directory`` (``runs/<run>/dcd``,
    its ``recipe.json`` the old form of ``identity``), or None."""
    directory = Path(directory)
    recipe, summary = directory / RECIPE_NAME, directory / "summary.json"
    if not (recipe.is_file() and summary.is_file() and (directory / "student" / "config.json").is_file()):
        return None
    if json.loads(recipe.read_text()) != old_student_identity(identity, student, teacher, cache):
        return None
    old = json.loads(summary.read_text())
    log.info("%s: using the student an earlier dcd trained there", directory)
    return {"stage": str(directory), "role": old.get("name"), "label": old.get("name"), "teacher": old.get("teacher"),
            "train_seconds": old.get("train_seconds"), "steps": old.get("steps"), "migrated_from": str(directory)}


# ---------------------------------------------------------------------------------------------- records
def legacy_record(root: Path, kind: str, method: str, seed: int, identity: Dict[str, Any],
                  student: torch.nn.Module, teacher: Optional[torch.nn.Module], cache) -> Optional[Dict[str, Any]]:
    """An ablation record an earlier version wrote for this row, when its identity is today's ``identity`` in the
    old form (:func:`old_student_identity`); else None. Returns ``{"identity", "record", "stage" (the student's
    folder), "migrated_from"}``.
    """
    path = Path(root) / "records" / f"{kind}-{method}-seed{seed}.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("identity") != old_student_identity(identity, student, teacher, cache):
        return None
    stage = Path(root) / kind / method / f"seed{seed}"
    log.info("%s %s seed %d: using the record an earlier dcd wrote (%s)", kind, method, seed, path)
    return {"identity": identity, "record": {**stored["record"], "stage": str(stage)}, "stage": str(stage),
            "migrated_from": str(path)}
