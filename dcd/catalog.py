"""``dcd list``: what is registered -- teacher families, students, saved-student families and data sets.

Each section is a :class:`teachers.registry.Registry`; an entry shows the first line of its builder's
docstring, and deprecated names show the name they resolve to.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

__all__ = ["catalog", "format_catalog"]


def _summary(obj) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip().replace("``", "") if doc else ""


def catalog() -> Dict[str, Tuple[object, str]]:
    """Section title -> (its registry, a note printed under the title)."""
    import students
    import teachers
    from .data import DATA_SETS

    return {
        "teachers": (teachers.TEACHERS, "--teacher NAME; a fusion student can be made of each (FusionStudent)"),
        "students": (students.STUDENTS, "--student NAME (dual students; 'fusion' takes the teacher's layers)"),
        "student families": (students.FAMILIES, "the \"family\" of a saved student's config.json"),
        "data sets": (DATA_SETS, "--data NAME, or the path of a Karpathy / COCO .json file"),
    }


def format_catalog() -> str:
    lines: List[str] = []
    for title, (registry, note) in catalog().items():
        lines.append(f"{title}:  ({note})")
        entries = dict(registry.items())
        width = max((len(str(name)) for name in entries), default=0)
        for name in registry.list():
            summary = _summary(entries.get(name))
            presets = getattr(entries.get(name), "presets", None)
            if presets is not None:
                summary = f"{summary} Presets: {', '.join(presets.list())}."
            lines.append(f"  {name:<{width}}  {summary}".rstrip())
        for old, new in registry.aliases().items():
            lines.append(f"  {old} -> {new} (deprecated)")
        lines.append("")
    return "\n".join(lines).rstrip()
