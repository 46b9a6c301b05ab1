"""Retrieval latency of a cross-encoder teacher and its distilled students at MS-COCO 5K / Flickr30K 1K sizes.

    python benchmarks/latency.py --device cpu                 # base-size models, sampled + extrapolated
    python benchmarks/latency.py --device cuda --precision fp16
    python benchmarks/latency.py --device cpu --quick         # tiny models, about a minute (CI)
    make bench DEVICE=cpu ARGS="--quick"

Writes ``latency.json`` and ``latency_vs_corpus.png`` under ``--out`` (default ``runs/latency``). The six
strategies, the method and the cost model are described in :mod:`dcd.bench.latency`, which holds the
benchmark split by job (arguments, models, inputs, strategies, timing, projection, report); this script
is its command line. Run it in the project's environment (``make install``).
"""
import sys

from dcd.bench.latency import *  # noqa: F401,F403  (the benchmark's parts, for the tests and interactive use)
from dcd.bench.latency import main

if __name__ == "__main__":
    sys.exit(main())
