"""The tables of README.md and docs/ that come from committed results: regenerated, never typed.

A generated table sits between two markers naming its source::

    <!-- generated: compression -->
    ...
    <!-- end: compression -->

``make docs`` (``python -m dcd.docs``) rewrites every such block from ``benchmarks/results/``; ``--check`` exits
non-zero naming the blocks that differ (the test suite runs it), so a page never shows a figure its results
file does not hold.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: the pages whose generated blocks are kept current
PAGES = ("README.md", "docs/experiments.md", "docs/embedded-default.md")
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def _records(name: str, teacher: Optional[str] = None, student: Optional[str] = None) -> List[Dict]:
    """The records of ``benchmarks/results/<name>.json`` (``teacher``: that teacher family's only, METER and ViLT
    sweeps share a file; ``student``: that student kind's and the teacher's, a fusion row may share a dual's name)."""
    records = json.loads((RESULTS / f"{name}.json").read_text())["records"]
    return [r for r in records if (teacher is None or r["teacher"] == teacher)
            and (student is None or r["student"] in (student, "teacher"))]


def _compression(name: str) -> Callable[[], str]:
    def table() -> str:
        from .ablations import markdown_table

        return markdown_table(_records(name))
    return table


def _distill() -> str:
    """The `make distill` table of the committed run (benchmarks/results/distill-meter.json)."""
    from .report import results_table

    run = json.loads((RESULTS / "distill-meter.json").read_text())
    split = run["eval_split"]
    return "```\n" + results_table(run["results"], f"meter teacher on {split}") + "\n```"


def _headline() -> str:
    """The fair comparison in one table: DCD's dual student against the same student and loss with no teacher."""
    from .ablations import paired_differences, summarise

    records = _records("compression", teacher="meter", student="dual")
    rows = {r["method"]: r for r in summarise(records)}
    (pair,) = [p for p in paired_differences(records, against={"dcd_denoised_t2i": "baseline_t2i"})]
    low, high = pair["ci95"] if pair["ci95"] else (float("nan"), float("nan"))
    lines = ["| model (METER teacher, 8 epochs) | params | test RSUM | seeds |", "|---|---|---|---|"]
    for method, label in (("teacher", "teacher (cross-encoder, exhaustive)"),
                          ("baseline_t2i", "dual student, no teacher"), ("dcd_denoised_t2i", "dual student, DCD")):
        row = rows[method]
        spread = f" ± {row['test_rsum_std']:.1f}" if row["seeds"] > 1 else ""
        lines.append(f"| {label} | {row['params'] / 1e6:.1f} M | {row['test_rsum']:.1f}{spread} | "
                     f"{row['seeds'] if method != 'teacher' else '-'} |")
    lines.append(f"\nDCD minus no teacher, paired by seed: **{pair['mean']:+.1f} RSUM**, 95 % CI "
                 f"[{low:+.1f}, {high:+.1f}] over {pair['pairs']} seeds.")
    return "\n".join(lines)


#: each of DCD's parts -> the ablation row that takes it out of the full recipe (``dcd_denoised_t2i``)
PARTS = (("the teacher (distillation itself)", "baseline_t2i"),
         ("the teacher's hard negatives", "dcd_random_negatives_denoised_t2i"),
         ("the entropy weights", "dcd_uniform_weights_denoised_t2i"),
         ("the alpha schedule", "dcd_static_alpha_denoised_t2i"),
         ("all three (vanilla KD)", "vanilla_kd_denoised_t2i"))


def _parts() -> str:
    """What each of DCD's parts adds: the full recipe minus the row without it, paired by seed, with its interval."""
    from .ablations import paired_differences

    records = _records("compression", teacher="meter", student="dual")
    pairs = {p["method"]: p for p in paired_differences(records, against={m: "dcd_denoised_t2i" for _, m in PARTS})}
    lines = ["| part of DCD | full recipe minus the row without it (test RSUM) | 95 % CI | seeds |", "|---|---|---|---|"]
    for label, method in PARTS:
        pair = pairs.get(method)
        if pair is None:
            lines.append(f"| {label} | not measured yet | | 0 |")
            continue
        gain = [-d for d in pair["differences"]]
        interval = f"[{-pair['ci95'][1]:+.1f}, {-pair['ci95'][0]:+.1f}]" if pair["ci95"] else "-"
        spread = f" ± {pair['std']:.1f}" if pair["pairs"] > 1 else ""
        lines.append(f"| {label} | {sum(gain) / len(gain):+.1f}{spread} | {interval} | {pair['pairs']} |")
    return "\n".join(lines)


#: the teachers the out-of-fold experiment compares: results file -> what its teacher is
TEACHER_VARIANTS = (("compression", "one teacher, 800 steps on every training image (the default)"),
                    ("compression-folds2", "2 out-of-fold teachers, 4 epochs of half the images each"),
                    ("compression-folds2-max_steps3200-epochs16", "2 out-of-fold teachers, 16 epochs of half the images each"))


def _out_of_fold() -> str:
    """The DCD dual student from each teacher variant: the teacher's test RSUM, the student's val and test RSUM, and
    the student minus the one-teacher DCD student and minus the no-teacher baseline of the same seed."""
    from .ablations import paired_differences, summarise

    reference = [r for r in _records("compression", teacher="meter", student="dual")
                 if r["method"] in ("dcd_denoised_t2i", "baseline_t2i")]

    def paired(records, against, metric):
        (pair,) = paired_differences(records, metric, against={"variant": against}) or [None]
        if pair is None:
            return ""
        spread = f" [{pair['ci95'][0]:+.1f}, {pair['ci95'][1]:+.1f}]" if pair["ci95"] else ""
        return f"{pair['mean']:+.1f}{spread} ({pair['pairs']})"

    lines = ["| teacher | teacher test RSUM | DCD student: seeds | val RSUM | val minus one-teacher DCD | test RSUM | "
             "test minus one-teacher DCD, 95 % CI (pairs) | test minus no teacher, 95 % CI (pairs) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, label in TEACHER_VARIANTS:
        if not (RESULTS / f"{name}.json").is_file():
            continue
        records = _records(name, teacher="meter", student="dual")
        teacher = next(r for r in records if r["method"] == "teacher")
        # this variant's DCD students as a method of their own, beside the one-teacher sweep's rows of the same seeds
        variant = [{**r, "method": "variant"} for r in records if r["method"] == "dcd_denoised_t2i"]
        together = reference + variant
        (row,) = summarise(variant)
        versus = name != "compression"  # the one-teacher row is the reference itself
        lines.append(f"| {label} | {teacher['test_rsum']:.1f} | {row['seeds']} | {row['val_rsum']:.1f} | "
                     f"{paired(together, 'dcd_denoised_t2i', 'val_rsum') if versus else '-'} | "
                     f"{row['test_rsum']:.1f} | {paired(together, 'dcd_denoised_t2i', 'test_rsum') if versus else '-'} | "
                     f"{paired(together, 'baseline_t2i', 'test_rsum')} |")
    return "\n".join(lines)


GENERATORS: Dict[str, Callable[[], str]] = {
    "out-of-fold": _out_of_fold,
    "headline": _headline,
    "parts": _parts,
    "distill-meter": _distill,
    "compression": _compression("compression"),
    "compression-fp32-teacher": _compression("compression-fp32-teacher"),
    "compression-2epochs": _compression("compression_2epochs"),
    "compression-3200-steps": _compression("compression-max_steps3200-epochs16"),
    "compression-3200-steps-t3": _compression("compression-max_steps3200-epochs16-teacher_temperature3"),
}


def refresh(text: str) -> str:
    """``text`` with every generated block rewritten from its results file."""
    def fill(match: re.Match) -> str:
        name = match.group("name")
        if name not in GENERATORS:
            raise KeyError(f"no generator for the block {name!r}; known: {', '.join(GENERATORS)}")
        return f"{match.group(1)}{GENERATORS[name]().rstrip()}\n{match.group(4)}"
    return BLOCK.sub(fill, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcd.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 naming the pages that are stale")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        fresh = refresh(text)
        if fresh != text:
            stale.append(page)
            if not args.check:
                path.write_text(fresh)
    if args.check and stale:
        print(f"dcd: error: generated tables out of date in {', '.join(stale)}: run make docs", file=sys.stderr)
        return 1
    print(f"{'stale' if stale else 'current'}: {', '.join(stale) or ', '.join(PAGES)}"
          if args.check else f"rewritten: {', '.join(stale) or 'nothing (all current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
