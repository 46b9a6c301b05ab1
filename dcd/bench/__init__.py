"""Benchmark machinery: timing helpers (:mod:`.timing`) and the latency benchmark (:mod:`.latency`).

The scripts in ``benchmarks/`` are their command lines (``python benchmarks/latency.py``,
``python benchmarks/index.py``); the parts live here, in the installed package, so that the scripts
need no ``sys.path`` set-up and the tests import them like any module.
"""
