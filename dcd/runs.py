"""``dcd runs [DIR]``: what the stage folders under a run folder hold, and ``dcd runs prune`` to let some go.

Stages are never deleted by a run (:mod:`dcd.stages`), so folders add up; this is where a person looks at them
(kind, method, seed, the settings that differ between them, val / test RSUM, age, size on disk) and deletes
the ones they no longer want. ``prune --keep-latest`` keeps what each run folder's ``latest.json`` names (and
every stage an ablation record points at) and deletes the other stage folders of that run folder.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from .stages import LATEST_FILE, STAGE_FILE, find_stages, read_latest, read_stage, stage_busy

__all__ = ["list_stages", "format_table", "prune"]

#: identity fields too long or too internal to show as a differing setting (weights hashes, paths, the whole
#: consumed identities)
HIDDEN = ("start", "teacher_weights", "source", "scoring", "training.overrides", "stage")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _flatten(value: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(value, dict):
        out: Dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(value) if isinstance(value, (list, dict)) else value}


def _records(root: Path) -> Dict[str, Dict[str, Any]]:
    """Stage folder (resolved) -> the ablation record that measured it, for every record under ``root``."""
    found: Dict[str, Dict[str, Any]] = {}
    for path in root.rglob("records/*.json"):
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        record = stored.get("record", {}) if isinstance(stored, dict) else {}
        stage = stored.get("stage") or record.get("stage")
        if stage:
            found[str(Path(stage).resolve())] = record
    return found


def _metrics(stage: Path, record: Optional[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """val / test RSUM of a stage: its ablation record, the rows ``dcd distill`` wrote beside it, a teacher's info."""
    if record:
        return {"val_rsum": record.get("val_rsum"), "test_rsum": record.get("test_rsum")}
    results = stage / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        rows = data.get("rows") or []
        rsum = rows[0]["rsum"] if rows else None
        on_val = str(data.get("eval_split", "test")).endswith("val")  # `--eval-split val` reports on val
        return {"val_rsum": rsum if on_val else None, "test_rsum": None if on_val else rsum}
    info = stage / "teacher.json"
    if info.is_file():
        data = json.loads(info.read_text())
        return {"val_rsum": (data.get("synthetic-val") or {}).get("rsum"),
                "test_rsum": (data.get("synthetic-test") or {}).get("rsum")}
    return {"val_rsum": None, "test_rsum": None}


def list_stages(root: str | Path) -> List[Dict[str, Any]]:
    """One row per stage folder under ``root``: what it is, how it did, how old and how big it is."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no run folder {root}")
    named = {p.resolve(): role for run in {s.parent for s in root.rglob(LATEST_FILE)}
             for role, p in read_latest(run).items()}
    latest = {str(p) for p in named}
    records = _records(root)
    # stage folders, and the folders of an earlier dcd that the last run used in place (no stage.json)
    earlier = [p for p in {*named, *(Path(k) for k in records)}
               if p.is_dir() and not (p / STAGE_FILE).is_file() and root.resolve() in p.parents]
    rows = []
    for stage in sorted(set(find_stages(root)) | {root / p.relative_to(root.resolve()) for p in earlier}):
        meta = read_stage(stage) or _earlier_stage(stage, named.get(stage.resolve()))
        identity = meta.get("identity") or {}
        record = records.get(str(stage.resolve()))
        role = identity.get("role") or meta.get("kind", "?")
        rows.append({
            "stage": str(stage.relative_to(root)), "kind": meta.get("kind", "?"), "role": role,
            "method": (record or {}).get("method") or role,
            "seed": identity.get("seed", (record or {}).get("seed")),
            **_metrics(stage, record), "latest": str(stage.resolve()) in latest,
            "age_s": round(time.time() - _written(stage)), "bytes": _size(stage),
            "identity": identity,
        })
    _differing(rows)
    return rows


def _earlier_stage(stage: Path, role: Optional[str]) -> Dict[str, Any]:
    """What a folder of an earlier dcd says of itself: its recipe.json (the old identity), and its role."""
    recipe = stage / "recipe.json"
    identity = json.loads(recipe.read_text()) if recipe.is_file() else {}
    return {"kind": "score cache" if role == "score_cache" else "student", "identity": {**identity, "role": role}}


def _written(stage: Path) -> float:
    marker = stage / STAGE_FILE
    return (marker if marker.is_file() else stage).stat().st_mtime


def _differing(rows: List[Dict[str, Any]]) -> None:
    """Fill ``differs``: the identity fields whose value is not the same across the stages of one role (the
    baseline against the other baselines, DCD against DCD: what a role implies is no difference worth showing)."""
    flat = [_flatten(r["identity"]) if r["kind"] == "student" else {} for r in rows]
    groups: Dict[Any, List[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["kind"], row["role"]), []).append(i)
    for members in groups.values():
        keys = {k for i in members for k in flat[i] if not _hidden(k)}
        varying = sorted(k for k in keys if len({json.dumps(flat[i].get(k), default=str) for i in members}) > 1)
        for i in members:
            rows[i]["differs"] = {_short_key(k): flat[i].get(k) for k in varying}


def _hidden(key: str) -> bool:
    """Identity fields too long or too internal to show: weights hashes, paths, consumed identities, the seed."""
    head = key.split(".")[0]
    return head in ("teacher", "score_cache", "train", "data", "role", "seed", "device_type") or \
        any(key == h or key.endswith("." + h) or key.startswith(h + ".") for h in HIDDEN)


def _short_key(key: str) -> str:
    return key.split(".", 1)[1] if key.startswith(("dcd.", "budget.")) else key


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def format_table(rows: Iterable[Dict[str, Any]]) -> str:
    """The rows as a plain-text table; ``*``: a stage of the last run (``latest.json``)."""
    rows = list(rows)
    if not rows:
        return "no stage folders"

    def cell(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    table = [("", "stage", "kind", "method", "seed", "val RSUM", "test RSUM", "age", "size", "differs")]
    for r in rows:
        differs = " ".join(f"{k}={v}" for k, v in r["differs"].items())
        table.append(("*" if r["latest"] else "", r["stage"], r["kind"], str(r["method"]),
                      "-" if r["seed"] is None else str(r["seed"]), cell(r.get("val_rsum")), cell(r.get("test_rsum")),
                      _age(r["age_s"]), _bytes(r["bytes"]), differs))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    return "\n".join(line.rstrip() for line in lines) + "\n* named by latest.json (the last run)"


def prune(root: str | Path, dry_run: bool = False) -> List[Path]:
    """Delete the stage folders of each run folder under ``root`` that its ``latest.json`` does not name and no
    ablation record points at, and that no process holds (its lock); a run folder without ``latest.json`` is left
    whole. Returns what was deleted."""
    root = Path(root)
    kept_by_records = set(_records(root))
    deleted = []
    for latest_file in sorted(root.rglob(LATEST_FILE)):
        run = latest_file.parent
        keep = {str(p.resolve()) for p in read_latest(run).values()} | kept_by_records
        for stage in find_stages(run):
            if str(stage.resolve()) in keep or any(str(stage.resolve()).startswith(k + "/") for k in keep):
                continue
            if any(k.startswith(str(stage.resolve()) + "/") for k in keep):
                continue  # holds a stage that is kept
            if stage_busy(stage):  # another process is writing it right now: not ours to delete
                continue
            deleted.append(stage)
            if not dry_run:
                shutil.rmtree(stage)
    return deleted

