"""FAISS indexes for a dual student's vectors at 100k and 1M items (10M projected): build, memory, latency, recall.

    python benchmarks/index.py                    # 100k and 1M items, then the end-to-end figure (~30 min, 1 thread)
    python benchmarks/index.py --quick            # small sizes, seconds (the test suite runs it)
    make bench-index ARGS="--threads 2"

What is measured, for flat (``IndexFlatIP``), HNSW and IVF-PQ as ``dcd index`` builds them
(:mod:`dcd.index.ann`), at each size:

* build time and index size (the serialised FAISS index: what it holds in memory), and the peak
  resident memory the build added;
* recall@10 of every query against exact search (``IndexFlatIP`` over the same vectors);
* single-query latency: one ``search`` call per query, p50 / p99 over ``--single`` queries;
* batch throughput: all ``--queries`` queries in one call (queries per second).

HNSW is swept over ``ef_search`` and IVF-PQ over ``nprobe`` and ``refine`` (the best ``refine * k``
of its candidates re-scored exactly from the stored vectors), giving the recall-against-latency
curves of the plot. 10M is projected from the measured growth from 100k to 1M (a power law through the two
sizes, per figure, at the same setting; recall is not projected: at a fixed setting it falls).

Data. Uniformly random unit vectors are the wrong test: they have no structure, every ANN index
looks broken on them, and real embeddings look nothing like them (shared/research/index_calibration.md).
The vectors here have the low intrinsic dimension of real embeddings, the calibration note's
low-rank-plus-noise model with clusters: a mixture of ``--clusters`` overlapping Gaussian clusters
(spread within a cluster twice that of the centres) in a 32-dimensional latent space, mapped into the
student's embedding dimension by a fixed random Gaussian matrix (a 32-dimensional subspace with
unequal axes: anisotropic), plus isotropic noise of norm 0.5, then L2-normalised. Queries come from
the same distribution (other draws). On this data HNSW's recall at 100k matches the note's low-rank
measurements (efSearch 16 / 64 / 256: 0.711 / 0.956 / 0.999 here, 0.722 / 0.963 / 0.999 there);
tighter clusters make every index look better (spread 1: 0.848 / 0.978 / 1.000).

End to end (``--no-e2e`` skips it): a dual student indexes the embedded test split (100 images), and
its captions are searched as ``dcd search`` does (encode the caption, search, look up the items),
with and without re-ranking the top 50 by the teacher; p50 / p99 per query and recall@10 of the
caption's image. Without ``--student`` / ``--teacher-checkpoint`` the models are ``dual-minilm2-vit192x4``
(4-block ViT-Tiny, 2 MiniLM layers) and the embedded METER teacher's architecture, with untrained weights
(latency does not depend on weight values; recall then means nothing, and the JSON says so).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from dcd.bench.timing import PeakMemory, time_call
from dcd.index import ann

K = 10
TARGET = {"index": "hnsw", "items": 1_000_000, "p50_ms": 5.0, "recall_at_10": 0.95}
SWEEPS = {"flat": [{}],
          "hnsw": [{"ef_search": e} for e in (16, 32, 64, 128, 256, 512)],
          "ivfpq": [{"nprobe": p, "refine": r} for r in (10, 50) for p in (16, 32, 64, 128, 256)]}
QUICK_SWEEPS = {"flat": [{}], "hnsw": [{"ef_search": e} for e in (16, 64)],
                "ivfpq": [{"nprobe": p, "refine": 50} for p in (4, 16)]}
KINDS = ("flat", "hnsw", "ivfpq")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--indexes", default=",".join(KINDS), help="which indexes to measure, comma-separated")
    p.add_argument("--sizes", help="corpus sizes, comma-separated (default 100000,1000000; --quick 1000,5000)")
    p.add_argument("--dim", type=int, help="vector dimension (default: the --student's embed_dim, else the "
                   "embedded dual student's)")
    p.add_argument("--queries", type=int, default=1000, help="queries for recall and batch throughput")
    p.add_argument("--single", type=int, default=300, help="queries timed one per call (flat: a tenth)")
    p.add_argument("--clusters", type=int, default=1000, help="clusters of the synthetic vectors")
    p.add_argument("--threads", type=int, help="FAISS / torch threads (default: FAISS's, i.e. OMP_NUM_THREADS or all)")
    p.add_argument("--student", help="a saved dual student: its dimension, and the end-to-end model")
    p.add_argument("--teacher-checkpoint", help="end to end: the METER teacher re-ranking (default: the embedded "
                   "architecture, untrained)")
    p.add_argument("--e2e-data", default="synthetic", help="end to end: the split's data set (its test split)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end figure")
    p.add_argument("--quick", action="store_true", help="sizes 1,000 and 5,000, 50 queries, 2 settings per index (seconds)")
    p.add_argument("--out", default="benchmarks/results", help="folder for index.json and index_recall_latency.png")
    p.add_argument("--progress", action="store_true", help="progress bars while building")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.single, args.clusters = 50, 20, 20
    args.sizes = args.sizes or ("1000,5000" if args.quick else "100000,1000000")
    return args


# --------------------------------------------------------------------------------------------- data
def clustered_vectors(n: int, dim: int, seed: int, clusters: int = 1000, latent: int = 32, spread: float = 2.0,
                      noise: float = 0.5, block: int = 100_000) -> np.ndarray:
    """``n`` unit vectors shaped like real embeddings (see the module doc); the geometry is fixed, ``seed`` draws."""
    geometry = np.random.default_rng(12345)
    centres = geometry.standard_normal((clusters, latent))
    mapping = geometry.standard_normal((latent, dim))  # a latent-dimensional subspace with unequal axes
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        m = min(block, n - start)
        z = centres[rng.integers(clusters, size=m)] + spread * rng.standard_normal((m, latent))
        x = z @ mapping
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += noise / math.sqrt(dim) * rng.standard_normal((m, dim))
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k that the index returned."""
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / len(t) for f, t in zip(found, truth)]))


# --------------------------------------------------------------------------------------------- measuring
def measure_size(n: int, dim: int, queries: np.ndarray, args, log) -> Dict:
    import faiss

    started = time.perf_counter()
    corpus = clustered_vectors(n, dim, seed=1, clusters=args.clusters)
    exact = faiss.IndexFlatIP(dim)
    exact.add(corpus)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, K)
    exact_batch_s = time.perf_counter() - t0
    del exact
    log(f"n={n:,}: data and exact top-{K} in {time.perf_counter() - started:.1f} s")
    sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    rows = []
    for kind in [k for k in KINDS if k in args.indexes.split(",")]:
        base = ann.AnnParams(index_type=kind).resolve(n, dim)
        with PeakMemory("cpu") as memory:
            t0 = time.perf_counter()
            index = ann.build(corpus, base, progress=args.progress)
            build_s = time.perf_counter() - t0
        index_mb = faiss.serialize_index(index).nbytes / 2**20
        for setting in sweeps[kind]:
            spec = ann.with_overrides(base, **setting)
            ann.configure(index, spec)
            t0 = time.perf_counter()
            _, found = ann.search(index, spec, queries, K, corpus)
            batch_s = time.perf_counter() - t0
            single = max(10, args.single // 10) if kind == "flat" else args.single
            warmup = 5
            stream = iter(queries[: single + warmup])
            timing = time_call(lambda: ann.search(index, spec, next(stream)[None], K, corpus), repeats=single,
                               warmup=warmup)
            p50, p99 = (float(x) * 1000 for x in np.percentile(timing.times, [50, 99]))
            row = {"items": n, "index": kind, "setting": setting, "spec": spec, "build_s": round(build_s, 2),
                   "index_mb": round(index_mb, 1), "build_peak_mb": round(memory.increase_mb, 1),
                   "recall_at_10": round(recall_at_k(found, truth), 4), "p50_ms": round(p50, 3),
                   "p99_ms": round(p99, 3), "single_queries": single, "batch_qps": round(len(queries) / batch_s, 1)}
            rows.append(row)
            log(format_row(row))
        del index
    return {"items": n, "exact_batch_s": round(exact_batch_s, 3), "rows": rows}


def operating_point(rows: List[Dict], kind: str) -> Optional[Dict]:
    """The fastest setting of ``kind`` with recall@10 >= the target's, else its most accurate one."""
    mine = [r for r in rows if r["index"] == kind]
    good = [r for r in mine if r["recall_at_10"] >= TARGET["recall_at_10"]]
    return min(good, key=lambda r: r["p50_ms"]) if good else max(mine, key=lambda r: r["recall_at_10"], default=None)


def project(small: Dict, large: Dict, items: int) -> List[Dict]:
    """Each kind's operating point at the large size, projected to ``items`` by a power law through both sizes."""
    out = []
    for kind in ("flat", "hnsw", "ivfpq"):
        point = operating_point(large["rows"], kind)
        if point is None:
            continue
        before = next((r for r in small["rows"] if r["index"] == kind and r["setting"] == point["setting"]), None)
        if before is None:
            continue
        exponent = math.log(items / large["items"]) / math.log(large["items"] / small["items"])
        row = {"items": items, "index": kind, "setting": point["setting"], "projected": True}
        for key in ("build_s", "index_mb", "p50_ms", "p99_ms", "batch_qps"):
            a, b = before[key], point[key]
            row[key] = round(b * (b / a) ** exponent, 3) if a > 0 and b > 0 else None
        out.append(row)
    return out


def end_to_end(args, log) -> Dict:
    """Per-query latency of ``dcd search`` on the embedded test split, with and without teacher re-ranking."""
    import torch

    import students
    import teachers
    from dcd.data import load_split
    from dcd.index import Index
    from dcd.teacher_training import EMBEDDED_TEACHERS

    split = load_split(args.e2e_data, split="test")
    if args.student:
        student = students.load_student(args.student)
    else:
        torch.manual_seed(0)
        student = students.create_student("dual-minilm2-vit192x4")  # 4-block ViT-Tiny at 64 px, 2 MiniLM layers
    if args.teacher_checkpoint:
        teacher = teachers.create_teacher("meter", checkpoint=args.teacher_checkpoint)
    else:
        recipe = EMBEDDED_TEACHERS["meter"]
        teacher = teachers.create_teacher("meter", preset=recipe["preset"], **recipe.get("pretrained", {}),
                                          **recipe["overrides"])
    with tempfile.TemporaryDirectory() as tmp:
        index = Index.build(student, split, Path(tmp) / "index", progress=False)
        captions = split.captions[:: max(1, len(split.captions) // 50)][:50]
        own = [str(split.image_paths[split.caption_image[split.captions.index(c)]]) for c in captions]
        out = {"data": split.name, "images": split.num_images, "queries": len(captions), "rerank_k": 50,
               "trained": bool(args.student and args.teacher_checkpoint)}
        for name, rerank in (("dual", None), ("dual + teacher rerank", teacher)):
            times, hits = [], 0
            index.search(captions[0], k=K, rerank=rerank)  # warm-up
            for caption, image in zip(captions, own):
                t0 = time.perf_counter()
                result = index.search(caption, k=K, rerank=rerank, rerank_k=50)
                times.append(time.perf_counter() - t0)
                hits += image in [item["path"] for item in result.items]
            p50, p99 = (float(x) * 1000 for x in np.percentile(times, [50, 99]))
            out[name] = {"p50_ms": round(p50, 2), "p99_ms": round(p99, 2), "recall_at_10": round(hits / len(captions), 3)}
            log(f"end to end, {name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms per query")
    return out


# --------------------------------------------------------------------------------------------- reporting
HEADER = f"{'items':>10}  {'index':<6} {'setting':<22} {'build s':>8} {'index MB':>9} {'recall@10':>9} " \
         f"{'p50 ms':>8} {'p99 ms':>8} {'batch QPS':>10}"


def _fmt(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def format_row(row: Dict) -> str:
    setting = ", ".join(f"{k.replace('_search', '')} {v}" for k, v in row["setting"].items()) or "exact"
    recall = "(proj.)" if row.get("projected") else f"{row['recall_at_10']:.3f}"
    return (f"{row['items']:>10,}  {row['index']:<6} {setting:<22} {_fmt(row['build_s'], '8.1f')} "
            f"{_fmt(row['index_mb'], '9.0f')} {recall:>9} {_fmt(row['p50_ms'], '8.3f')} {_fmt(row['p99_ms'], '8.3f')} "
            f"{_fmt(row['batch_qps'], '10.0f')}")


def plot(report: Dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    colours = ["black", "tab:blue", "tab:orange", "tab:red", "tab:green", "tab:purple"]
    styles = ["--", "-", ":"]
    for size, style in zip(report["sizes"], styles * 3):
        series: Dict[str, List[Dict]] = {}  # one curve per index kind (and IVF-PQ refine factor)
        for r in size["rows"]:
            name = r["index"] + (f" refine {r['setting']['refine']}" if "refine" in r["setting"] else "")
            series.setdefault(name, []).append(r)
        for i, (name, rows) in enumerate(series.items()):
            rows = sorted(rows, key=lambda r: r["p50_ms"])
            colour = colours[i % len(colours)]
            ax.plot([r["p50_ms"] for r in rows], [r["recall_at_10"] for r in rows], style, marker="o", ms=4,
                    color=colour, label=f"{name}, {size['items']:,} items")
            for r in rows:
                if r["setting"]:
                    ax.annotate(str(next(iter(r["setting"].values()))), (r["p50_ms"], r["recall_at_10"]), fontsize=6,
                                xytext=(3, -8), textcoords="offset points", color=colour)
    ax.axvline(TARGET["p50_ms"], color="grey", lw=0.8, ls=":")
    ax.axhline(TARGET["recall_at_10"], color="grey", lw=0.8, ls=":")
    ax.annotate("target: <= 5 ms, >= 0.95", (TARGET["p50_ms"], TARGET["recall_at_10"]), fontsize=7, color="grey",
                xytext=(-4, 4), textcoords="offset points", ha="right")
    ax.set_xscale("log")
    ax.set_xlabel("single-query latency, p50 (ms)")
    ax.set_ylabel(f"recall@{K} against exact search")
    ax.set_title(f"dim {report['dim']}, clustered anisotropic vectors, {report['machine']['faiss_threads']} FAISS "
                 f"thread(s)\n(labels: HNSW efSearch, IVF-PQ nprobe)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def default_dim(student: Optional[str]) -> int:
    from students.dual import DualEncoderConfig
    from students.hub import read_config

    return int(read_config(Path(student))["embed_dim"]) if student else DualEncoderConfig().embed_dim


def run(args: argparse.Namespace) -> Dict:
    import faiss

    if args.threads:
        import torch

        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    def log(message: str) -> None:
        print(message, flush=True)

    dim = args.dim or default_dim(args.student)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    queries = clustered_vectors(args.queries, dim, seed=2, clusters=args.clusters)
    report = {
        "date": datetime.date.today().isoformat(), "command": " ".join(["python", "benchmarks/index.py", *args.argv]),
        "machine": {"cpu_count": os.cpu_count(), "faiss_threads": faiss.omp_get_max_threads(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "faiss_version": faiss.__version__, "dim": dim, "k": K, "queries": args.queries,
        "data": f"{args.clusters} overlapping Gaussian clusters (within-cluster spread 2x the centres') in a 32-d "
                f"latent space, random Gaussian map to "
                f"{dim}-d, isotropic noise of norm 0.5, L2-normalised; queries from the same distribution",
        "target": TARGET, "sizes": [],
    }
    log(HEADER)
    for n in sizes:
        report["sizes"].append(measure_size(n, dim, queries, args, log))
    if len(sizes) >= 2:
        report["projection"] = project(report["sizes"][-2], report["sizes"][-1], sizes[-1] * 10)
        for row in report["projection"]:
            log(format_row(row))
    largest = report["sizes"][-1]
    point = operating_point(largest["rows"], "hnsw")
    if point is not None:
        report["hnsw_at_largest"] = {**point, "meets_target": point["p50_ms"] <= TARGET["p50_ms"]
                                     and point["recall_at_10"] >= TARGET["recall_at_10"]}
    if args.e2e:
        report["end_to_end"] = end_to_end(args, log)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.json").write_text(json.dumps(report, indent=1) + "\n")
    png = plot(report, out / "index_recall_latency.png")
    if point is not None:
        log(f"\nHNSW at {largest['items']:,}: {format_row(point).split(None, 1)[1]}"
            f" -> target (p50 <= {TARGET['p50_ms']} ms at recall@10 >= {TARGET['recall_at_10']}) "
            f"{'met' if report['hnsw_at_largest']['meets_target'] else 'NOT met'}")
    log(f"wrote {out / 'index.json'} and {png}")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
