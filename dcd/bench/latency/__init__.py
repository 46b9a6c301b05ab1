"""Retrieval latency of a cross-encoder teacher and its distilled students at MS-COCO 5K / Flickr30K 1K sizes.

    python benchmarks/latency.py --device cpu                 # base-size models, sampled + extrapolated
    python benchmarks/latency.py --device cuda --precision fp16
    python benchmarks/latency.py --device cpu --quick         # tiny models, about a minute (CI)

Strategies (each on both retrieval directions of the test set):

1. teacher, exhaustive, naive: every (image, caption) pair runs the whole model (``score_pairs_naive``),
   as the official ViLT / METER evaluations do;
2. teacher, exhaustive, cached: every image and caption is encoded once (``encode_images`` /
   ``encode_texts``), then every pair runs only the per-pair part (``score_features``);
3. fusion student, exhaustive, cached (the same, with the shallower cross-encoder);
4. dual student: every image and caption encoded once, the full similarity matrix in chunks, top-k both ways;
5. retrieve-then-rerank: strategy 4, then the top ``--k`` candidates of every query re-scored by the
   fusion student (5a) and by the teacher (5b); re-ranker features are computed once per image and
   once per caption, so re-ranking costs k pair-fusions per query.

Layout (this package; ``benchmarks/latency.py`` is its command line): :mod:`.settings` (arguments),
:mod:`.models` (the teacher and its students, through the registries), :mod:`.inputs` (synthetic
inputs), :mod:`.strategies` (what each strategy runs), :mod:`.measure` (timing the stages,
:mod:`dcd.bench.timing`), :mod:`.projection` (the cost model: COCO / Flickr30K and any corpus size),
:mod:`.report` (tables, plot, environment) and :mod:`.runner` (the run, latency.json).

Method. Models at their real sizes (base presets; random weights unless a checkpoint is given:
latency does not depend on weight values), synthetic inputs already on the device (random pixels at
the model's input resolution, random token ids of caption length 16-20 padded within the batch; the
input pipeline is not timed). Every stage is timed as timm's benchmark.py does: warm-up calls, then
``--repeats`` timed calls under ``torch.inference_mode()``, with CUDA synchronisation around each,
the same batch size and precision for every model. We report the median and the spread (min-max).

Cost model. Per-item costs (encode an image, encode a caption) and per-pair costs (naive pair, fused
pair) are linear in the count, so they are timed on a sample (one batch of ``--batch-size`` items or
pairs per repetition) and multiplied up; every row says what was run in full and what was
extrapolated, with the sample size. The similarity matrix + top-k of the dual student is always run
in full (5,000 x 25,000 for COCO). The dual student's encodings run in full on CUDA and with
``--full``; ``--full`` also runs every other linear stage in full (re-ranker encodings and the
re-ranking itself). The exhaustive strategies (1-3) are always extrapolated: 125 million pairs.

Per-query latency answers one new query against a gallery whose per-item features (where the
strategy caches any) were computed beforehand: encode the query (amortised at the benchmark's batch
size), score it against every gallery item (or its k candidates), and rank; it is computed from the
per-unit costs. The total is the whole test set, both directions; an exhaustive score matrix serves
both directions, so it is counted once. Peak memory: CUDA max allocated on GPU; on CPU the process's
peak RSS (reset per stage through /proc/self/clear_refs), which includes every loaded model.
"""
from __future__ import annotations

#: the method paragraphs of this docstring, recorded in latency.json
METHOD = __doc__.split("Method.", 1)[1].strip()

from ..timing import PeakMemory, Timing, autocast, extrapolate, synchronizer, time_call  # noqa: E402
from .inputs import CAPTION_TOKENS, image_hw, synthetic_images, synthetic_texts  # noqa: E402
from .measure import (  # noqa: E402
    Bench, Cost, Measured, encode_all, measure_costs, measure_full, measure_similarity, pair_block, rerank,
    similarity_topk,
)
from .models import (  # noqa: E402
    DUAL_BASE_CONFIG, Models, build_models, load_student_checked, load_teacher, param_count, resolve_student_checkpoints,
)
from .projection import (  # noqa: E402
    add_speedups, modelled_seconds, query_counts, strategy_row, summarise_measured_on, unit_counts,
)
from .report import device_name, environment, fmt_rate, fmt_seconds, format_table, plot_curves  # noqa: E402
from .runner import main, run  # noqa: E402
from .settings import BenchError, Settings, log, make_settings, parse_args  # noqa: E402
from .strategies import BASELINE, EXHAUSTIVE, RECIPES, STRATEGIES, WORKLOADS, Workload  # noqa: E402

__all__ = [
    "BASELINE", "Bench", "BenchError", "CAPTION_TOKENS", "Cost", "DUAL_BASE_CONFIG", "EXHAUSTIVE", "METHOD", "Measured",
    "Models", "PeakMemory", "RECIPES", "STRATEGIES", "Settings", "Timing", "WORKLOADS", "Workload", "add_speedups",
    "autocast", "build_models", "device_name", "encode_all", "environment", "extrapolate", "fmt_rate", "fmt_seconds",
    "format_table", "image_hw", "load_student_checked", "load_teacher", "log", "main", "make_settings",
    "measure_costs", "measure_full", "measure_similarity", "modelled_seconds", "pair_block", "param_count",
    "parse_args", "plot_curves", "query_counts", "rerank", "resolve_student_checkpoints", "run", "similarity_topk",
    "strategy_row", "summarise_measured_on", "synchronizer", "synthetic_images", "synthetic_texts", "time_call",
    "unit_counts",
]
