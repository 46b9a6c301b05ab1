"""Human-readable results: the comparison table printed by ``dcd distill`` and the training-curve plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

METRIC_COLUMNS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
HEADERS = ("i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "RSUM")


def results_table(rows: Sequence[Dict], title: str = "") -> str:
    """Rows of ``{"model": str, <metric columns>, "seconds": float, "speedup": float}`` -> aligned text.

    ``binding`` (:mod:`dcd.binding`) and ``params`` columns are added when some row has one; rows without
    it leave it blank.
    """
    name_width = max([len("model")] + [len(r["model"]) for r in rows])
    binding = any("binding" in r for r in rows)
    params = any("params" in r for r in rows)
    head = (f"{'model':<{name_width}} " + " ".join(f"{h:>7}" for h in HEADERS) + (f" {'binding':>7}" if binding else "")
            + (f" {'params':>7}" if params else "") + f" {'time (s)':>9} {'speed-up':>9}")
    lines = [title, head, "-" * len(head)] if title else [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r[c]:7.1f}" for c in METRIC_COLUMNS)
        if binding:
            cells += f" {r['binding']:7.1f}" if "binding" in r else f" {'':>7}"
        if params:
            cells += f" {r['params'] / 1e6:6.2f}M" if "params" in r else f" {'':>7}"
        speed = f"{r['speedup']:8.1f}x" if r.get("speedup") else f"{'':>9}"
        lines.append(f"{r['model']:<{name_width}} {cells} {r['seconds']:9.2f} {speed}")
    return "\n".join(lines)


def headroom_note(rows: Sequence[Dict]) -> str:
    """A warning line when the teacher does not out-rank the undistilled dual student ("" otherwise): a student that
    imitates a weaker teacher's scores cannot gain from them (the embedded ViLT teacher, docs/experiments.md)."""
    rsum = {r["model"]: r["rsum"] for r in rows if "rsum" in r}
    if "teacher" not in rsum or "baseline dual" not in rsum or rsum["teacher"] > rsum["baseline dual"]:
        return ""
    return (f"note: the teacher (RSUM {rsum['teacher']:.1f}) does not out-rank the undistilled dual student "
            f"({rsum['baseline dual']:.1f}): distilling it into the dual student cannot help; its re-rank rows are "
            "the ones to read, or distil from a stronger teacher")


def read_metrics(path: Path) -> List[Dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_panels(logs: Dict[str, List[Dict]], keys: Sequence[str] = ("loss", "self", "distill")
                 ) -> Dict[str, Dict[str, List[Tuple[float, float]]]]:
    """``{panel: {run: [(x, y), ...]}}`` for every loss term in ``keys`` (x: step) and the per-epoch
    validation RSUM (x: epoch); a panel no run has points for is left out, and so is a run without points."""
    panels: Dict[str, Dict[str, List[Tuple[float, float]]]] = {}
    for key in list(keys) + ["val RSUM"]:
        curves = {}
        for name, records in logs.items():
            if key == "val RSUM":
                points = [(r["epoch"], r["eval"]["rsum"]) for r in records if "rsum" in r.get("eval", {})]
            else:
                points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                curves[name] = points
        if curves:
            panels[key] = curves
    return panels


def plot_training_curves(runs: Dict[str, Path], out_png: Path, keys: Sequence[str] = ("loss", "self", "distill")) -> Path | None:
    """One panel per loss term (step on x) and one for the per-epoch validation RSUM, for every run;
    each run keeps one colour across the panels, whichever panels it appears in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {name: read_metrics(Path(d) / "metrics.jsonl") for name, d in runs.items()}
    panels = curve_panels(logs, keys)
    if not panels:
        return None
    colours = {name: f"C{i}" for i, name in enumerate(logs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (key, curves) in zip(axes, panels.items()):
        for name, points in curves.items():
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=colours[name], marker="o" if key == "val RSUM" else None, label=name)
        ax.set_xlabel("epoch" if key == "val RSUM" else "step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
