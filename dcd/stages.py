"""Content-addressed stage folders: a changed setting makes a new folder, and a run never deletes one.

Every stage of a run (the embedded teacher, a score cache, each student, each ablation record) lives in a
folder named by a readable prefix and a short hash of its identity (:meth:`dcd.recipes.Recipe.identity`):
``students/dual-dcd-seed0-3f9c2a1b/``. The folder's ``stage.json`` holds that identity in full, so a finished
stage is found again by the same settings and never confused with another; a half-finished one resumes.

Two processes pointed at the same stage take turns (:func:`stage_lock`, an ``fcntl`` lock beside the folder):
the second waits, then finds the first's result and reuses it. The run folder's ``latest.json`` names the stages
of the last run (:func:`write_latest`); ``dcd runs`` lists them and deletes only when a person asks for it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch

from teachers.files import write_json

__all__ = ["STAGE_FILE", "LATEST_FILE", "StageConflict", "canonical", "fingerprint", "weights_sha256",
           "content_sha256", "stage_dir", "claim_stage", "lock_path", "stage_lock", "stage_busy", "read_stage",
           "write_latest", "read_latest", "student_dir", "find_stages"]

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
LATEST_FILE = "latest.json"
#: hex digits of the identity hash in a folder name: 4 billion names per prefix, and still readable
SHORT = 8


class StageConflict(RuntimeError):
    """A stage folder whose ``stage.json`` holds another identity than its name says (a hash collision, or a
    folder edited by hand): it is left alone and the run stops, naming it."""


def canonical(identity: Mapping[str, Any]) -> str:
    """The identity as canonical JSON: sorted keys, no spaces, tuples as lists; what the hash is taken of."""
    return json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(identity: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``identity``."""
    return hashlib.sha256(canonical(identity).encode()).hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every state-dict entry (name, dtype, shape and raw bytes), in name order: the one weight hash
    (score caches, score matrices, student identities and indexes all use it)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def content_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and contents, in name order): what a
    stage made from a user's file (an annotation file, a checkpoint to fine-tune) is keyed by, not its path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def stage_dir(parent: str | Path, prefix: str, identity: Mapping[str, Any]) -> Path:
    """``parent/<prefix>-<hash>``: the folder of the stage with ``identity``."""
    return Path(parent) / f"{prefix}-{fingerprint(identity)[:SHORT]}"


def read_stage(directory: str | Path) -> Optional[Dict[str, Any]]:
    """The ``stage.json`` of ``directory`` (identity, kind, created), or None when it has none."""
    path = Path(directory) / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def claim_stage(directory: str | Path, identity: Mapping[str, Any], kind: str, main_process: bool = True) -> bool:
    """Make ``directory`` the home of the stage with ``identity``; True when it already was (reuse or resume).

    Never deletes: a folder that holds another identity raises :class:`StageConflict`. Only ``main_process``
    writes (the other ranks of a torchrun job just read)."""
    directory = Path(directory)
    identity = json.loads(canonical(identity))  # as it reads back (tuples -> lists)
    stored = read_stage(directory)
    if stored is not None:
        if stored.get("identity") != identity:
            raise StageConflict(f"{directory}: its {STAGE_FILE} holds another {kind} than its name says; it is left "
                                f"as it is: move it away (or delete it) to train this one")
        return True
    if main_process:
        directory.mkdir(parents=True, exist_ok=True)
        write_json(directory / STAGE_FILE, {"kind": kind, "fingerprint": fingerprint(identity),
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "identity": identity},
                   indent=1, sort_keys=False, newline=False)
    return False


def lock_path(directory: str | Path) -> Path:
    """The hidden lock file of a stage folder, beside it (a folder being replaced cannot hold its own lock)."""
    directory = Path(directory)
    return directory.with_name(f".{directory.name}.lock")


@contextlib.contextmanager
def stage_lock(directory: str | Path, poll: float = 1.0, log_after: float = 2.0) -> Iterator[None]:
    """Hold the stage ``directory`` alone: another process (or rank) asking for it waits until this one is done.

    An ``fcntl`` lock on ``.<directory>.lock`` beside the folder: the kernel drops it when the holder exits,
    killed or not, so a crashed run never leaves a stage locked. The waiting side logs once, after ``log_after``
    seconds, whom it waits for."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(directory)
    with open(path, "a+") as handle:
        waited, said = 0.0, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited >= log_after and not said:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    log.info("%s: waiting for %s, which is writing it", directory.name, holder)
                    said = True
                time.sleep(poll)
                waited += poll
        handle.seek(0), handle.truncate()
        handle.write(f"pid {os.getpid()}"), handle.flush()
        try:
            yield
        finally:
            handle.seek(0), handle.truncate(), handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def stage_busy(directory: str | Path) -> bool:
    """Whether a process holds ``directory``'s lock right now (it trains or writes that stage)."""
    path = lock_path(directory)
    if not path.is_file():
        return False
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def write_latest(run_dir: str | Path, stages: Mapping[str, str | Path], **extra: Any) -> Path:
    """``run_dir/latest.json``: the stage folders (relative to ``run_dir`` where they are inside it) of the last
    run, by role; ``dcd runs`` marks them and ``prune --keep-latest`` keeps them."""
    run_dir = Path(run_dir)
    named = {}
    for role, path in stages.items():
        path = Path(path)
        try:
            named[role] = str(path.resolve().relative_to(run_dir.resolve()))
        except ValueError:
            named[role] = str(path.resolve())
    path = run_dir / LATEST_FILE
    write_json(path, {"written": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": named, **extra}, indent=1,
               sort_keys=False)
    return path


def read_latest(run_dir: str | Path) -> Dict[str, Path]:
    """The stages ``latest.json`` names, as paths (empty when the run folder has none)."""
    run_dir = Path(run_dir)
    path = run_dir / LATEST_FILE
    if not path.is_file():
        return {}
    stages = json.loads(path.read_text()).get("stages", {})
    return {role: (run_dir / p if not Path(p).is_absolute() else Path(p)) for role, p in stages.items()}


def student_dir(path: str | Path, role: str = "dcd") -> Path:
    """A saved student from what a user names: a ``save_pretrained`` folder, a stage folder (its ``student/``), or
    a run folder (the ``role`` student its ``latest.json`` names: ``runs/meter-synthetic`` -> the DCD dual)."""
    path = Path(path)
    if (path / LATEST_FILE).is_file() and role in read_latest(path):
        path = read_latest(path)[role]
    return path / "student" if (path / "student" / "config.json").is_file() else path


def find_stages(run_dir: str | Path) -> List[Path]:
    """Every stage folder under ``run_dir`` (any depth), sorted by path."""
    return sorted(p.parent for p in Path(run_dir).rglob(STAGE_FILE))
