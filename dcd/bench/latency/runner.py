"""One run of the latency benchmark: every teacher family and data set asked for -> tables, latency.json, plot."""
from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from dataclasses import replace
from typing import Dict, List, Optional, Sequence

import teachers
from teachers.files import write_json

from . import METHOD
from .inputs import CAPTION_TOKENS
from .measure import Bench, Cost, measure_costs, measure_full, measure_similarity
from .models import build_models, resolve_student_checkpoints
from .projection import add_speedups, modelled_seconds, strategy_row
from .report import device_name, environment, format_table, plot_curves
from .settings import BenchError, log, make_settings, parse_args
from .strategies import BASELINE, STRATEGIES, WORKLOADS

__all__ = ["main", "run"]


def run(args: argparse.Namespace) -> Dict:
    settings = make_settings(args)
    families = teachers.list_teachers() if args.teacher == "all" else [args.teacher]
    datasets = ["flickr30k", "coco"] if args.dataset == "all" else [args.dataset]
    student_ckpts = resolve_student_checkpoints(args.student_checkpoint, families)
    out_dir = Path(args.out)
    log(f"latency benchmark on {device_name(settings)}, batch {settings.batch_size}, "
        f"{settings.warmup} warm-up + {settings.repeats} timed calls per stage{' (quick)' if settings.quick else ''}")

    report: Dict = {
        "settings": {
            "device": str(settings.device), "precision": list(settings.precisions), "batch_size": settings.batch_size,
            "repeats": settings.repeats, "warmup": settings.warmup, "k": settings.k, "quick": settings.quick,
            "full": settings.full, "full_dual_encoding": settings.full_dual,
        },
        "environment": environment(settings),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": METHOD,
        "synthetic_inputs": {
            "images": "standard-normal pixels at the model's input size (input_image_hw), all-ones pixel mask "
                      "(METER and dual: their configured square size; ViLT: a 2:3 image, 384x576 at base size)",
            "captions": f"random token ids, {CAPTION_TOKENS[0]}-{CAPTION_TOKENS[1]} tokens, padded to the longest in the batch",
        },
        "teachers": {},
        "results": [],
    }
    printed: List[str] = []
    plot_costs: Dict[str, Dict] = {}
    for precision in settings.precisions:  # every strategy timed at each precision, one after the other
        plot_costs.update(_run_precision(replace(settings, precision=precision), families, datasets, student_ckpts,
                                         args, report, printed))
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_curves(plot_costs, out_dir / "latency_vs_corpus.png", settings.k)
    report["curves"] = {
        f: {"n_images": [10 ** (2 + i / 4) for i in range(17)],
            **{s: [modelled_seconds(s, plot_costs[f]["costs"], 10 ** (2 + i / 4), 5 * 10 ** (2 + i / 4), settings.k)
                   for i in range(17)] for s in STRATEGIES}}
        for f in plot_costs
    }
    write_json(out_dir / "latency.json", report, sort_keys=False, newline=False)
    print(f"\nper query: a new query against a pre-encoded gallery. '{BASELINE}' is the speed-up baseline.\n"
          f"wrote {out_dir / 'latency.json'} and {png}", flush=True)
    return report


def _run_precision(settings, families, datasets, student_ckpts, args, report: Dict, printed: List[str]) -> Dict[str, Dict]:
    """Every family and data set at ``settings.precision``; rows go into ``report``, tables into ``printed``.
    Returns the per-unit costs for the plot, keyed by family (and precision when the run times several)."""
    bench = Bench(settings)
    several = len(settings.precisions) > 1
    plot_costs: Dict[str, Dict] = {}
    for family in families:
        models = build_models(family, settings, args.teacher_checkpoint, student_ckpts.get(family, {}))
        log(f"[{family}] " + "; ".join(f"{k}: {v}" for k, v in models.notes.items()))
        costs = measure_costs(models, bench)
        key = f"{family} {settings.precision}" if several else family
        report["teachers"][key] = {
            "models": models.notes,
            "costs": {name: c.to_json() for name, c in costs.items()},
            "device": device_name(settings),
        }
        model_costs = dict(costs)
        for name in datasets:
            wl = WORKLOADS[name]
            log(f"  [{family}/{wl.name}] dual similarity matrix {wl.n_images:,} x {wl.n_texts:,} + top-{settings.k}, in full")
            sim, i2t, t2i = measure_similarity(models.dual, wl, bench)
            full = measure_full(models, wl, bench, i2t, t2i)
            full[("similarity", "pairs")] = sim
            costs = dict(model_costs)
            costs["similarity"] = Cost(sim.timing.scaled(1.0 / (wl.n_images * wl.n_texts)), "pair",
                                       wl.n_images * wl.n_texts, sim.timing.repeats, sim.peak_mb, sim.memory_kind,
                                       sim.increase_mb)
            rows = [strategy_row(s, costs, full, wl, settings.k) for s in STRATEGIES]
            add_speedups(rows)
            report["results"].append({
                "teacher": family, "precision": settings.precision, "dataset": name, "workload": wl.name,
                "n_images": wl.n_images,
                "n_texts": wl.n_texts, "k": settings.k, "rows": rows,
            })
            title = (f"\n{family} teacher, {wl.name} ({wl.n_images:,} images x {wl.n_texts:,} captions, "
                     f"both directions, k={settings.k}) on {device_name(settings)}")
            printed.append(format_table(title, rows))
            print(printed[-1], flush=True)
        # the plot's similarity cost per pair: from the largest workload measured
        report["teachers"][key]["costs"]["similarity"] = costs["similarity"].to_json()
        plot_costs[key] = {"costs": costs, "device": report["teachers"][key]["device"]}
        del models
    return plot_costs


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchError as err:  # a clear message and a non-zero exit status, no traceback
        raise SystemExit(f"error: {err}") from None
    return 0
