"""What a run writes: the printed tables, the plot of time and speed-up against corpus size, the environment."""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Dict, List

import torch

from .projection import modelled_seconds
from .settings import Settings
from .strategies import BASELINE, STRATEGIES, WORKLOADS

__all__ = ["device_name", "environment", "fmt_rate", "fmt_seconds", "format_table", "plot_curves"]


def fmt_seconds(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    if t < 120:
        return f"{t:.2f} s"
    if t < 7200:
        return f"{t / 60:.1f} min"
    if t < 3 * 86400:
        return f"{t / 3600:.1f} h"
    if t < 365 * 86400:
        return f"{t / 86400:.1f} d"
    return f"{t / (365.25 * 86400):,.1f} y"


def fmt_rate(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.1f}"


def format_table(title: str, rows: List[Dict]) -> str:
    headers = ("strategy", "total (median)", "min-max", "i2t / query", "t2i / query", "throughput",
               "peak mem", "speed-up", "measured on")
    body = []
    for r in rows:
        t = r["total_seconds"]
        body.append((
            STRATEGIES[r["strategy"]], fmt_seconds(t["median"]), f"{fmt_seconds(t['min'])}-{fmt_seconds(t['max'])}",
            fmt_seconds(r["per_query_seconds"]["i2t"]["median"]), fmt_seconds(r["per_query_seconds"]["t2i"]["median"]),
            f"{fmt_rate(r['throughput'])} {r['throughput_unit']}", f"{r['peak_memory_mb']:.0f} MB",
            f"{r['speedup']:.3g}x" if r["speedup"] < 100 else f"{r['speedup']:,.0f}x",
            r["measured_on"],
        ))
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers[:-1])]
    lines = [title]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths)) + "  " + headers[-1]
    lines += [line, "-" * min(len(line) + 40, 200)]
    for row in body:
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells) + "  " + row[-1])
    return "\n".join(lines)


def plot_curves(results: Dict[str, Dict], out_png: Path, k: int) -> Path:
    """Log-log retrieval time (top) and speed-up over the naive teacher (bottom) against corpus size.

    Curves come from the cost model (per-unit costs measured once, times computed for every size,
    captions = 5 x images); the dots mark the Flickr30K 1K and COCO 5K test sets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    families = list(results)
    fig, axes = plt.subplots(2, len(families), figsize=(max(9.0, 6.4 * len(families)), 8.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]}, sharex=True)
    n = np.logspace(2, 6, 60)
    styles = {"1_teacher_naive": "-", "2_teacher_cached": "--", "3_fusion_exhaustive": "-.", "4_dual": "-",
              "5a_rerank_fusion": ":", "5b_rerank_teacher": ":"}
    for col, family in enumerate(families):
        costs = results[family]["costs"]
        top, bottom = axes[0][col], axes[1][col]
        naive = np.array([modelled_seconds(BASELINE, costs, x, 5 * x, k) for x in n])
        for strategy, label in STRATEGIES.items():
            y = np.array([modelled_seconds(strategy, costs, x, 5 * x, k) for x in n])
            line, = top.loglog(n, y, styles[strategy], label=label, lw=1.8)
            bottom.loglog(n, naive / y, styles[strategy], color=line.get_color(), lw=1.8)
            for wl in WORKLOADS.values():
                t = modelled_seconds(strategy, costs, wl.n_images, wl.n_texts, k)
                t0 = modelled_seconds(BASELINE, costs, wl.n_images, wl.n_texts, k)
                top.plot(wl.n_images, t, "o", color=line.get_color(), ms=5)
                bottom.plot(wl.n_images, t0 / t, "o", color=line.get_color(), ms=5)
        for ax in (top, bottom):
            for wl in WORKLOADS.values():
                ax.axvline(wl.n_images, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.25, which="both")
        for wl in WORKLOADS.values():
            top.annotate(wl.name.replace(" test", ""), (wl.n_images, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -3), textcoords="offset points", rotation=90, va="top", fontsize=8, color="grey")
        for seconds, name in ((60, "1 min"), (3600, "1 h"), (86400, "1 day"), (365 * 86400, "1 year")):
            top.axhline(seconds, color="lightgrey", lw=0.6)
            top.annotate(name, (1.0, seconds), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                         textcoords="offset points", ha="right", fontsize=7, color="grey")
        top.set_title(f"{family} teacher and its students — {results[family]['device']}", fontsize=10)
        top.set_ylabel("retrieval time, whole test set, both directions (s)")
        top.legend(fontsize=7, loc="lower right")
        bottom.set_ylabel("speed-up over 1 (naive teacher)")
        bottom.set_xlabel("images in the test set (captions = 5 x images)")
    fig.suptitle(
        "Retrieval time vs corpus size. Cost model: per-image, per-caption and per-pair costs measured once,\n"
        f"curves computed from them (dual top-k then k={k} re-ranked pairs per query); dots: Flickr30K 1K and COCO 5K",
        fontsize=10,
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def environment(settings: Settings) -> Dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if settings.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(settings.device)
    return env


def device_name(settings: Settings) -> str:
    if settings.device.type == "cuda":
        return f"{torch.cuda.get_device_name(settings.device)}, {settings.precision}"
    return f"CPU x{torch.get_num_threads()} threads, {settings.precision}"
