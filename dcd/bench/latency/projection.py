"""The cost model: per-unit costs -> whole-test-set and per-query times (COCO 5K, Flickr30K 1K, any size)."""
from __future__ import annotations

from typing import Dict, List, Tuple

from ..timing import extrapolate
from .measure import Cost, Measured
from .strategies import BASELINE, EXHAUSTIVE, RECIPES, STRATEGIES, Workload

__all__ = ["add_speedups", "modelled_seconds", "query_counts", "strategy_row", "summarise_measured_on", "unit_counts"]


def unit_counts(n_images: float, n_texts: float, k: int) -> Dict[str, float]:
    """How many units each kind of stage is charged for on a whole test set, both directions."""
    return {"images": n_images, "texts": n_texts, "pairs": n_images * n_texts, "candidates": (n_images + n_texts) * k}


def query_counts(direction: str, n_images: int, n_texts: int, k: int) -> Dict[str, float]:
    """Units charged to one query against a pre-encoded gallery: i2t = an image query over captions."""
    if direction == "i2t":
        return {"images": 1, "texts": 0, "pairs": n_texts, "candidates": k}
    return {"images": 0, "texts": 1, "pairs": n_images, "candidates": k}


def modelled_seconds(strategy: str, costs: Dict[str, Cost], n_images: float, n_texts: float, k: int,
                     stat: str = "median") -> float:
    """Whole-test-set time of ``strategy`` from per-unit costs alone (the curves of the plot)."""
    counts = unit_counts(n_images, n_texts, k)
    return sum(getattr(costs[stage].per_unit, stat) * counts[per] for stage, per in RECIPES[strategy])


def strategy_row(strategy: str, costs: Dict[str, Cost], full: Dict[Tuple[str, str], Measured],
                 workload: Workload, k: int) -> Dict:
    """One table row: total (full runs where there are, extrapolations elsewhere), per query, memory."""
    counts = unit_counts(workload.n_images, workload.n_texts, k)
    parts, total, peak, increase, kinds = [], None, 0.0, 0.0, set()
    for stage, per in RECIPES[strategy]:
        cost = costs[stage]
        if (stage, per) in full:
            m = full[(stage, per)]
            timing, note, peak_mb, increase_mb, kind = m.timing, m.note, m.peak_mb, m.increase_mb, m.memory_kind
        else:
            timing = extrapolate(cost.per_unit, 1, counts[per])
            note = f"{cost.describe()}, extrapolated to {counts[per]:,.0f}"
            peak_mb, increase_mb, kind = cost.peak_mb, cost.increase_mb, cost.memory_kind
        total = timing if total is None else total + timing
        peak, increase, kinds = max(peak, peak_mb), max(increase, increase_mb), kinds | {kind}
        parts.append({
            "stage": stage, "count": counts[per], "per": per, "seconds": timing.summary(), "measured_on": note,
            "full": (stage, per) in full, "unit": cost.unit, "sample": cost.sample, "repeats": cost.repeats,
        })

    per_query = {}
    for direction in ("i2t", "t2i"):
        q = query_counts(direction, workload.n_images, workload.n_texts, k)
        seconds = None
        for stage, per in RECIPES[strategy]:
            t = costs[stage].per_unit.scaled(q[per])
            seconds = t if seconds is None else seconds + t
        per_query[direction] = seconds.summary()

    n_items = workload.n_images + workload.n_texts
    if strategy in EXHAUSTIVE:
        throughput, unit = counts["pairs"] / total.median, "pairs/s"
    else:
        throughput, unit = n_items / total.median, "items/s"
    return {
        "strategy": strategy,
        "label": STRATEGIES[strategy].split(None, 1)[1],
        "total_seconds": total.summary(),
        "per_query_seconds": per_query,
        "throughput": throughput,
        "throughput_unit": unit,
        "peak_memory_mb": round(peak, 1),
        "peak_increase_mb": round(increase, 1),
        "memory_kind": "; ".join(sorted(kinds)),
        "measured_on": summarise_measured_on(parts),
        "parts": parts,
    }


def summarise_measured_on(parts: List[Dict]) -> str:
    """'full' when every stage ran in full; otherwise which stages were sampled (and how) and extrapolated."""
    full = [_STAGE_NAMES[p["stage"]] for p in parts if p["full"]]
    sampled = [p for p in parts if not p["full"]]
    if not sampled:
        return "full"
    units = {p["unit"] for p in sampled}
    sizes = {(p["sample"], p["repeats"]) for p in sampled}
    names = ", ".join(_STAGE_NAMES[p["stage"]] for p in sampled)
    if len(sizes) == 1:
        (n, reps), = sizes
        what = f"{n} {units.pop()}s" if len(units) == 1 else f"{n} per stage"
        text = f"sample of {what} x {reps} rep{'s' * (reps != 1)}, extrapolated" + ("" if len(sampled) == 1 else f": {names}")
    else:
        text = "extrapolated: " + ", ".join(
            f"{_STAGE_NAMES[p['stage']]} (sample of {p['sample']} x {p['repeats']})" for p in sampled)
    return (f"full: {', '.join(full)}; " if full else "") + text


_STAGE_NAMES = {
    "naive_pair": "pairs", "teacher_pair": "teacher pairs", "fusion_pair": "fusion pairs",
    "teacher_rerank_pair": "teacher re-rank pairs", "fusion_rerank_pair": "fusion re-rank pairs",
    "teacher_image": "teacher img", "teacher_text": "teacher cap", "fusion_image": "fusion img",
    "fusion_text": "fusion cap", "dual_image": "dual img", "dual_text": "dual cap", "similarity": "similarity+top-k",
}


def add_speedups(rows: List[Dict]) -> None:
    base = next(r for r in rows if r["strategy"] == BASELINE)["total_seconds"]["median"]
    for r in rows:
        r["speedup"] = 1.0 if r["strategy"] == BASELINE else base / r["total_seconds"]["median"]
