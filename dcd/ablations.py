"""``dcd ablations`` / ``make ablations``: the compression experiment, one row per method, several seeds.

Every row trains the same student architecture on the same data with the same budget, batches and
seeds; only the method changes (:data:`METHODS`, the DCD paper's ablations plus the undistilled
baseline). Each (student, method, seed) is trained by :func:`dcd.pipeline.train_student`, evaluated on
the validation split (where choices are made) and the test split (reported only), and written as one
JSON record, atomically, under ``<out>/records/`` in a file named by the row's identity
(:meth:`dcd.recipes.Recipe.identity`; each row is a :class:`~dcd.recipes.Recipe` and its record stores it): a
killed sweep resumes at the first missing record, a sweep with another setting writes beside the earlier
records, and two processes on one folder share its score cache and never train the same student twice. The
teacher's test scores come from :func:`dcd.score_matrices.cached_score_matrix`.

Outputs: ``compression.json`` (one record per trained model and one per teacher), ``compression.md``
(mean +- std over seeds per row, and each method minus the baseline of the same seed), ``compression.png``
(test RSUM per method, teacher as a line) and ``compression_curves.png`` (val RSUM per epoch, every run).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import students
import teachers
from teachers.base import Scorer
from teachers.files import write_text

from . import retrieval
from .migrate import legacy_record
from .pipeline import (STUDENT_DIR, RunSetup, build_student, count_parameters, rerank_validation, setup_run,
                       train_student)
from .recipes import DistillSettings, Recipe, resolve, role_of
from .score_matrices import cached_score_matrix, stored_score_info
from .stages import fingerprint, stage_dir, weights_sha256
from .stats import mean_interval
from .trainer import is_main_process, world_size

log = logging.getLogger(__name__)

__all__ = ["METHODS", "EXTRA_METHODS", "FUSION_METHODS", "run_ablations", "summarise", "markdown_table"]

#: the paper's DCD as the embedded recipe runs it: image->text lists (from the score cache), every candidate in
#: the self-learning loss. The embedded recipe itself has since moved to both directions with the teacher's
#: false negatives left out (``dcd_denoised_t2i``, chosen on val), so the paper's rows pin these fields
PAPER_DCD: Dict[str, Any] = {"directions": ("i2t",), "drop_false_negatives": False}
#: method -> the DistillSettings fields it changes from the paper's DCD ("use_teacher": False: trained without
#: the teacher)
METHODS: Dict[str, Dict[str, Any]] = {name: {**PAPER_DCD, **fields} for name, fields in {
    "baseline": {"use_teacher": False},
    "vanilla_kd": {"selection": "random", "dynamic": False, "alpha_schedule": "constant"},
    "dcd_random_negatives": {"selection": "random"},
    "dcd_uniform_weights": {"dynamic": False},
    "dcd_static_alpha": {"alpha_schedule": "constant"},
    "dcd": {},
}.items()}
#: rows beyond the paper's: DCD's distillation term added to the baseline's own loss (self-learning over
#: fresh random candidates); DCD with the teacher's false negatives left out of the self-learning loss; that,
#: distilling text->image lists too (scored online in the batch; the cache holds image->text only: the
#: embedded recipe); and the baseline with the same two-direction self-learning loss, its fair comparison
EXTRA_METHODS: Dict[str, Dict[str, Any]] = {
    "dcd_self_random": {**PAPER_DCD, "self_candidates": "random"},
    "dcd_denoised": {**PAPER_DCD, "drop_false_negatives": True},
    "dcd_denoised_t2i": {"drop_false_negatives": True, "directions": ("i2t", "t2i")},
    "baseline_t2i": {"use_teacher": False, "directions": ("i2t", "t2i")},
}
#: the paper's ablations applied to the recipe that works (``dcd_denoised_t2i``): each row turns off one of
#: DCD's parts (``vanilla_kd``: all of them) and keeps the denoising and the two directions, so the rows say
#: which part of the winning recipe the gain comes from
#: the paper's ablation rows: each turns parts of ``dcd`` off
PAPER_ABLATIONS = tuple(name for name in METHODS if name not in ("baseline", "dcd"))
EXTRA_METHODS.update({f"{name}_denoised_t2i": {**METHODS[name], **EXTRA_METHODS["dcd_denoised_t2i"]}
                      for name in PAPER_ABLATIONS})
#: the two-direction recipe with DCD's weights or alpha following what the student has yet to learn (its per-sample
#: losses, dcd.weighting.gap_weights / gap_alpha) instead of the teacher's entropy and a fixed schedule (issue 27)
STUDENT_AWARE = ("dcd_gap_weights_denoised_t2i", "dcd_gap_alpha_denoised_t2i")
EXTRA_METHODS.update({
    "dcd_gap_weights_denoised_t2i": {**EXTRA_METHODS["dcd_denoised_t2i"], "weighting": "gap"},
    "dcd_gap_alpha_denoised_t2i": {**EXTRA_METHODS["dcd_denoised_t2i"], "alpha_schedule": "gap"},
})
KNOWN_METHODS: Dict[str, Dict[str, Any]] = {**METHODS, **EXTRA_METHODS}
#: each ablation row -> the full recipe it takes parts out of: paired by seed, the difference is what those
#: parts are worth (the paper's rows against the paper's ``dcd``, the ``*_denoised_t2i`` rows against the
#: recipe that works)
ABLATION_OF: Dict[str, str] = {**{name: "dcd" for name in PAPER_ABLATIONS},
                               **{f"{name}_denoised_t2i": "dcd_denoised_t2i" for name in PAPER_ABLATIONS},
                               **{name: "dcd_denoised_t2i" for name in STUDENT_AWARE}}
#: the two-direction rows -> their fair control: the baseline with the same two-direction self-learning loss
TWO_DIRECTION_CONTROL: Dict[str, str] = {name: "baseline_t2i" for name in ("dcd_denoised_t2i", *ABLATION_OF)
                                         if name.endswith("_denoised_t2i")}
#: the rows trained for the fusion student; its DCD recipe is chosen on val between the paper's (``dcd``) and the
#: dual student's (``dcd_denoised_t2i``, whose fair control is ``baseline_t2i``)
FUSION_METHODS = ("baseline", "vanilla_kd", "dcd", "dcd_denoised_t2i", "baseline_t2i")
#: a fusion student is a re-ranker: it is measured on the top FUSION_RERANK_K candidates per query of the
#: undistilled dual student of the same seed (an exhaustive cross-encoder pass costs ~15 min per split here)
FUSION_RERANK_K = 16
METRICS = ("rsum", "i2t_r1", "t2i_r1", "binding")


def _record(teacher_family: str, kind: str, method: str, seed: Optional[int], params: int,
            val: Optional[Dict[str, float]], test: Dict[str, float], **extra) -> Dict[str, Any]:
    record = {"teacher": teacher_family, "student": kind, "method": method, "seed": seed, "params": params}
    for split, metrics in (("val", val), ("test", test)):
        for name in METRICS:
            if metrics is not None and metrics.get(name) is not None:
                record[f"{split}_{name}"] = round(float(metrics[name]), 2)
    record.update(extra)
    return record


def run_ablations(settings: DistillSettings, seeds: Sequence[int] = (0, 1, 2),
                  methods: Iterable[str] = tuple(METHODS), kinds: Iterable[str] = ("dual",),
                  out: Optional[Path] = None, results_json: Optional[Path] = None,
                  train_missing: bool = True, fusion_epochs: Optional[int] = None) -> List[Dict[str, Any]]:
    """Train and evaluate every (student kind, method, seed); returns (and writes) all records.

    ``train_missing=False``: only gather the records already written (a report while sweeps run elsewhere).
    ``fusion_epochs``: the fusion rows' budget when it differs from the dual rows' (a cross-encoder converges more
    slowly); they still re-rank the dual baseline trained at ``settings.epochs``.
    """
    methods = list(methods)
    if fusion_epochs is not None and fusion_epochs < 1:
        raise ValueError(f"--fusion-epochs must be a positive number of epochs, got {fusion_epochs}")
    unknown = [m for m in methods if m not in KNOWN_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(KNOWN_METHODS)}")
    root = Path(out or Path("runs") / f"ablations-{settings.teacher}")
    root.mkdir(parents=True, exist_ok=True)
    setup = setup_run(settings, root)
    records: List[Dict[str, Any]] = []
    for kind in kinds:
        for method in methods:
            if kind == "fusion" and method not in FUSION_METHODS:
                continue
            row_settings = replace(settings, epochs=fusion_epochs) if kind == "fusion" and fusion_epochs else settings
            for seed in seeds:
                found = _one_run(kind, method, seed, row_settings, setup, root, train=train_missing, sweep=settings)
                if found is not None:  # a report gathers what was measured, and trains nothing
                    records.append(found)
    # the teacher last: its exhaustive scores take longest and are cached for every later sweep
    teacher, info, splits = setup.teacher, setup.teacher_info, setup.splits
    score_dir = Path(info.get("path", root / "teacher")).parent / "scores"
    _, teacher_eval = cached_score_matrix(teacher, splits["eval"], score_dir, settings.device, settings.progress)
    teacher_val = stored_score_info(teacher, splits["val"], score_dir)  # `dcd teacher` stores it; never computed here
    records.insert(0, _record(settings.teacher, "teacher", "teacher", None, count_parameters(setup.teacher_model),
                              teacher_val["metrics"] if teacher_val else None, teacher_eval["metrics"],
                              eval_seconds=teacher_eval["elapsed_s"]))
    if is_main_process():
        results_json = Path(results_json or root / "compression.json")
        everything = write_results(records, results_json, sweep_command(settings, root, fusion_epochs))
        plot_val_curves(root, everything, results_json.with_name(results_json.stem + "_curves.png"))
    return records


def row_recipe(settings: DistillSettings, setup: RunSetup, method: str, seed: int) -> Tuple[Recipe, bool]:
    """``(recipe, use_teacher)`` of one ablation row: the sweep's settings with the method's fields and the seed."""
    overrides = dict(KNOWN_METHODS[method])
    use_teacher = overrides.pop("use_teacher", True)
    recipe = resolve(replace(settings, seed=seed, **overrides), setup.splits["train"], world_size=world_size())
    return recipe.with_teacher_weights(setup.recipe.teacher_weights), use_teacher


def find_record(kind: str, method: str, seed: int, settings: DistillSettings, setup: RunSetup,
                root: Path) -> Tuple[Path, Dict[str, Any], Optional[Dict[str, Any]]]:
    """``(path, identity, stored)`` of a row's record: its content-addressed file under ``root/records`` and what
    it holds (or what an earlier dcd wrote for the same identity, :func:`dcd.migrate.legacy_record`; None: not
    measured yet). A fusion row's first stage is found with the same ``settings``."""
    recipe, uses = row_recipe(settings, setup, method, seed)
    student = build_student(kind, recipe, setup.teacher, setup.teacher_model)
    return _locate(kind, method, seed, recipe, uses, student, settings, setup, root)


def _locate(kind: str, method: str, seed: int, recipe: Recipe, uses: bool, student: Scorer,
            sweep: DistillSettings, setup: RunSetup, root: Path) -> Tuple[Path, Dict[str, Any], Optional[Dict]]:
    """:func:`find_record` for a row whose recipe and untrained student are already built; ``sweep``: the settings
    of the dual baseline a fusion row re-ranks."""
    identity = recipe.identity("student", role_of(kind, uses), start=weights_sha256(student))
    if kind == "fusion":  # measured as a re-ranker: of which retriever, at which depth, belongs to its record
        _, first_stage, _ = find_record("dual", "baseline", seed, sweep, setup, root)
        identity = {**identity, "rerank": {"k": FUSION_RERANK_K, "first_stage": fingerprint(first_stage)}}
    path = stage_dir(root / "records", f"{kind}-{method}-seed{seed}", identity)
    path = path.with_name(path.name + ".json")
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("identity") == json.loads(json.dumps(identity, default=str)):
            return path, identity, stored
    teacher = setup.teacher if uses else None
    return path, identity, legacy_record(root, kind, method, seed, identity, student, teacher,
                                         setup.cache if uses else None)


def _one_run(kind: str, method: str, seed: int, settings: DistillSettings, setup: RunSetup, root: Path,
             train: bool, sweep: DistillSettings) -> Optional[Dict[str, Any]]:
    """One row at ``settings`` (its own budget); ``sweep``: the settings of the dual baseline a fusion row re-ranks."""
    recipe, uses = row_recipe(settings, setup, method, seed)
    student = build_student(kind, recipe, setup.teacher, setup.teacher_model)
    path, identity, stored = _locate(kind, method, seed, recipe, uses, student, sweep, setup, root)
    if stored is not None:
        if "migrated_from" in stored and is_main_process():  # today's name for it; the old file stays
            write_text(path, json.dumps(stored, indent=1, default=str))
        log.info("%s %s seed %d: reusing %s", kind, method, seed, path)
        # the identity matched: the same teacher, or (a row trained without one) a record every teacher's sweep shares,
        # shown under this sweep's teacher
        return {**stored["record"], "teacher": settings.teacher}
    if not train:
        return None
    splits, teacher = setup.splits, setup.teacher if uses else None
    started = time.time()
    # a fusion row re-ranks the dual baseline of its seed: found before training, and its val curve re-ranks too
    first = _first_stage(sweep, setup, root, seed) if kind == "fusion" else None
    validate = rerank_validation(first, splits["val"], FUSION_RERANK_K, recipe) if first is not None else None
    trained, summary = train_student(role_of(kind, uses), student, teacher, recipe, splits, root,
                                     setup.cache if uses else None, label=method, validate=validate)
    extra: Dict[str, Any] = {}
    if kind == "fusion":
        reranker = teachers.as_teacher(trained, recipe.precision["scoring"])  # trained: it only scores now
        val, test = (retrieval.evaluate_rerank(first, reranker, splits[role], k=FUSION_RERANK_K, device=settings.device,
                                               progress=False) for role in ("val", "eval"))
        extra = {"rerank_k": FUSION_RERANK_K, "first_stage": f"dual baseline seed {seed}",
                 "first_stage_test_rsum": round(test["first_rsum"], 2)}
    else:
        val, test = (retrieval.evaluate(trained, splits[role], device=settings.device, progress=False)
                     for role in ("val", "eval"))
    record = _record(settings.teacher, kind, method, seed, count_parameters(trained), val, test,
                     train_seconds=summary["train_seconds"], steps=summary["steps"],
                     eval_seconds=round(test["elapsed_s"], 2), wall_seconds=round(time.time() - started, 1),
                     stage=summary["stage"], **extra)
    log.info("%s %s seed %d: val RSUM %.1f, test RSUM %.1f", kind, method, seed, val["rsum"], test["rsum"])
    if is_main_process():
        text = json.dumps({"identity": identity, "recipe": recipe.to_dict(), "record": record,
                           "stage": summary["stage"]}, indent=1, default=str)
        write_text(path, text)
    return record


def _first_stage(settings: DistillSettings, setup: RunSetup, root: Path, seed: int) -> Scorer:
    """The undistilled dual student of ``seed`` in this sweep: the retriever whose top-k a fusion student re-ranks."""
    _, _, stored = find_record("dual", "baseline", seed, settings, setup, root)
    path = Path(stored["stage"]) / STUDENT_DIR if stored is not None else None
    if path is None or not (path / "config.json").is_file():
        raise ValueError(f"fusion rows re-rank the dual baseline of the same seed, and {root} has none for seed "
                         f"{seed}: run the sweep with --students dual,fusion and the baseline row (or train the dual "
                         "baseline first)")
    return students.load_student(path).to(settings.device)


# ---------------------------------------------------------------------------------------------- report
def summarise(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (teacher, student, method): mean and std over seeds of each metric."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["teacher"], r["student"], r["method"]), []).append(r)
    rows = []
    for (teacher, student, method), group in groups.items():
        row: Dict[str, Any] = {"teacher": teacher, "student": student, "method": method, "seeds": len(group),
                               "params": group[0]["params"]}
        for split in ("val", "test"):
            for name in METRICS:
                values = [r[f"{split}_{name}"] for r in group if f"{split}_{name}" in r]
                if values:
                    row[f"{split}_{name}"] = statistics.fmean(values)
                    row[f"{split}_{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        seconds = [r["eval_seconds"] for r in group if r.get("eval_seconds") is not None]
        if seconds:  # the measured cost of scoring the test split (exhaustive, or re-ranking for a fusion row)
            row["eval_seconds"] = statistics.fmean(seconds)
        rows.append(row)
    return rows


def paired_differences(records: List[Dict[str, Any]], metric: str = "test_rsum",
                       against: Optional[Dict[str, str]] = None) -> List[Dict[str, Any]]:
    """Each method minus the method it is compared with (``against``: method -> reference; by default every
    method against ``baseline``), for the same teacher, student kind and seed: seeds pair the runs (same
    start, same batches), so the spread of the differences is the noise the comparison has to beat."""
    values = {(r["teacher"], r["student"], r["method"], r["seed"]): r[metric] for r in records
              if r["method"] != "teacher" and metric in r}
    groups: Dict[tuple, List[float]] = {}
    for (teacher, kind, method, seed), value in values.items():
        reference = against.get(method) if against is not None else (None if method == "baseline" else "baseline")
        if reference is not None and (teacher, kind, reference, seed) in values:
            groups.setdefault((teacher, kind, method, reference), []).append(
                value - values[(teacher, kind, reference, seed)])
    return [_differences_row(d, teacher=t, student=k, method=m, against=ref) for (t, k, m, ref), d in groups.items()]


def _differences_row(differences: List[float], **key) -> Dict[str, Any]:
    """One row of a paired table: ``key`` (teacher, student, method, ...) and the differences' count, mean, std and
    95 % t interval."""
    d = differences
    return {**key, "pairs": len(d), "mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0,
            "ci95": mean_interval(d), "differences": d}


def markdown_table(records: List[Dict[str, Any]]) -> str:
    """Mean +- std over seeds per row; the teacher first, then each student kind's methods."""
    def cell(row, key):
        if key not in row:
            return ""
        return f"{row[key]:.1f} ± {row[key + '_std']:.1f}" if row["seeds"] > 1 else f"{row[key]:.1f}"

    lines = ["| teacher | student | method | params (M) | seeds | val RSUM | test RSUM | test i2t R@1 | "
             "test t2i R@1 | test binding | test scoring (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in summarise(records):
        seconds = f"{row['eval_seconds']:,.0f}" if "eval_seconds" in row else ""
        lines.append(f"| {row['teacher']} | {row['student']} | {row['method']} | {row['params'] / 1e6:.2f} | "
                     f"{row['seeds']} | {cell(row, 'val_rsum')} | {cell(row, 'test_rsum')} | "
                     f"{cell(row, 'test_i2t_r1')} | {cell(row, 'test_t2i_r1')} | {cell(row, 'test_binding')} | "
                     f"{seconds} |")
    lines += _paired_table("Test RSUM minus the baseline of the same seed:", paired_differences(records))
    lines += _paired_table("Test RSUM minus the two-direction baseline (`baseline_t2i`) of the same seed:",
                           paired_differences(records, against=TWO_DIRECTION_CONTROL))
    lines += _paired_table("Test RSUM minus the full recipe of the same seed (each ablation row takes parts of it out):",
                           paired_differences(records, against=ABLATION_OF), show_reference=True)
    lines += _paired_table("Fusion rows: test RSUM minus their first stage's alone (the dual baseline of the same seed, "
                           "not re-ranked): what re-ranking its top 16 adds:", rerank_gains(records))
    return "\n".join(lines)


def rerank_gains(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each fusion row's test RSUM minus its first stage's own (stored in its record), per seed: whether the
    re-ranker improves on the retriever it re-ranks, as :func:`paired_differences` lays it out."""
    groups: Dict[tuple, List[float]] = {}
    for r in records:
        if r["student"] == "fusion" and "first_stage_test_rsum" in r and "test_rsum" in r:
            groups.setdefault((r["teacher"], r["method"]), []).append(r["test_rsum"] - r["first_stage_test_rsum"])
    return [_differences_row(d, teacher=t, student="fusion", method=m) for (t, m), d in groups.items()]


def _paired_table(title: str, pairs: List[Dict[str, Any]], show_reference: bool = False) -> List[str]:
    """The lines of one table of :func:`paired_differences` (none when nothing pairs; one pair has no spread)."""
    if not pairs:
        return []
    reference_head, reference_rule = ("full recipe | ", "---|") if show_reference else ("", "")
    lines = ["", title, "", f"| teacher | student | method | {reference_head}pairs | mean ± std | 95 % CI (t) | "
             "per seed |", f"|---|---|---|{reference_rule}---|---|---|---|"]
    for p in pairs:
        reference = f"{p['against']} | " if show_reference else ""
        spread = f" ± {p['std']:.1f}" if p["pairs"] > 1 else ""
        interval = p.get("ci95")
        shown = f"[{interval[0]:+.1f}, {interval[1]:+.1f}]" if interval else "-"
        lines.append(f"| {p['teacher']} | {p['student']} | {p['method']} | {reference}{p['pairs']} | "
                     f"{p['mean']:+.1f}{spread} | {shown} | {', '.join(f'{d:+.1f}' for d in p['differences'])} |")
    return lines


def val_curves(root: Path, records: List[Dict[str, Any]]) -> Dict[str, Dict[str, List[List[tuple]]]]:
    """student kind -> row name -> one ``[(epoch, val RSUM), ...]`` per trained run (the runs' metrics logs under
    ``root``); a row trained without a teacher is in every teacher's sweep and counted once."""
    from .report import read_metrics

    curves: Dict[str, Dict[str, List[List[tuple]]]] = {}
    several = len({r["teacher"] for r in records}) > 1
    drawn = set()
    for r in records:
        stage = Path(r["stage"]) if r.get("stage") else root / r["student"] / r["method"] / f"seed{r['seed']}"
        if r["method"] == "teacher" or stage in drawn:
            continue
        drawn.add(stage)
        points = [(m["epoch"], m["eval"]["rsum"]) for m in read_metrics(stage / "metrics.jsonl")
                  if "rsum" in m.get("eval", {})]
        if points:
            curves.setdefault(r["student"], {}).setdefault(f"{_teacher_tag(r, several)}{r['method']}", []).append(points)
    return curves


def plot_val_curves(root: Path, records: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Validation RSUM after each epoch, one panel per student kind, one line per trained run, one colour per row:
    whether the budget reached the plateau (:func:`val_curves`)."""
    curves = val_curves(root, records)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted(curves)
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.4 * len(kinds), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        palette = plt.get_cmap("tab10" if len(curves[kind]) <= 10 else "tab20")  # distinct hues while they last
        for i, (name, runs) in enumerate(sorted(curves[kind].items())):
            for j, points in enumerate(runs):
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=palette(i % 20), marker="o", markersize=3, alpha=0.8,
                        label=f"{name} ({len(runs)})" if j == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val RSUM" + (" (re-ranking the dual baseline's top 16)" if kind == "fusion" else ""))
        ax.set_title(f"{kind} students: val RSUM over training (one line per seed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _teacher_tag(row: Dict[str, Any], several: bool) -> str:
    """``"vilt: "`` where a figure holds several teachers' rows (their method names are the same), else nothing."""
    return f"{row['teacher']}: " if several else ""


def plot(records: List[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Test RSUM (mean +- std) per method and student kind, the teacher as a horizontal line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is a dependency; a broken install should not lose the JSON
        return None
    rows = summarise(records)
    kinds = [k for k in ("dual", "fusion") if any(r["student"] == k for r in rows)]
    if not kinds:
        return None
    fig, axes = plt.subplots(1, len(kinds), figsize=(7 * len(kinds), 6), squeeze=False)
    teacher_rows = [r for r in rows if r["method"] == "teacher"]
    for ax, kind in zip(axes[0], kinds):
        mine = [r for r in rows if r["student"] == kind and "test_rsum" in r]
        ax.bar(range(len(mine)), [r["test_rsum"] for r in mine], yerr=[r["test_rsum_std"] for r in mine],  # grey: no teacher
               color=["#999999" if r["method"].startswith("baseline") else "#3b75af" for r in mine], capsize=4)
        several = len({r["teacher"] for r in mine}) > 1
        ax.set_xticks(range(len(mine)), [f"{_teacher_tag(r, several)}{r['method']} (n={r['seeds']})" for r in mine],
                      rotation=30, ha="right")
        for i, t in enumerate(teacher_rows):
            ax.axhline(t["test_rsum"], color=f"C{3 + i}", linestyle="--", label=f"{t['teacher']} teacher")
        low = min([r["test_rsum"] - r["test_rsum_std"] for r in mine] + [t["test_rsum"] for t in teacher_rows] or [0])
        ax.set_ylim(max(0, low - 30), None)
        ax.set_title(f"{kind} student: test RSUM, mean ± std over seeds")
        ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: settings a sweep command never names: where output goes and how it is shown; the seed is each row's own
_NOT_FLAGS = ("out", "progress", "seed", "extra", "finetune_teacher", "num_workers")


def sweep_command(settings: DistillSettings, root: Path, fusion_epochs: Optional[int] = None) -> str:
    """The ``dcd ablations`` command line that trains one row of this sweep (``--seeds S --methods M`` to fill in):
    the settings that differ from the defaults, as flags."""
    default = asdict(DistillSettings())
    flags = []
    for name, value in asdict(settings).items():
        if name in _NOT_FLAGS or value == default[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "teacher_config":
            flags += [f"--teacher-config {key}={item}" for key, item in sorted(value.items())]
        elif isinstance(value, bool):
            flags.append(flag if value else f"--no-{name.replace('_', '-')}")
        elif isinstance(value, (tuple, list)):
            flags.append(f"{flag} {','.join(value)}")
        else:
            flags.append(f"{flag} {value}")
    if fusion_epochs:
        flags.append(f"--fusion-epochs {fusion_epochs}")
    return " ".join(["dcd ablations", *flags, f"--out {root}"])


def write_results(records: List[Dict[str, Any]], path: Path, command: Optional[str] = None) -> List[Dict[str, Any]]:
    """``compression.json`` (records of every teacher in the file, this teacher's replaced), .md and .png; ``command``:
    the sweep's command line, kept per teacher and said under the table. Returns every record the file holds."""
    path = Path(path)
    teacher_names = {r["teacher"] for r in records}
    kept, commands = [], {}
    if path.is_file():  # keep the other teacher's records (meter and vilt share the file) and its command
        stored = json.loads(path.read_text())
        kept = [r for r in stored["records"] if r["teacher"] not in teacher_names]
        commands = {t: c for t, c in stored.get("commands", {}).items() if t not in teacher_names}
    if command:
        commands.update({name: command for name in teacher_names})
    everything = kept + records
    text = json.dumps({"generated": time.strftime("%Y-%m-%d %H:%M"), "commands": commands, "records": everything},
                      indent=1)
    write_text(path, text)
    table = markdown_table(everything)
    if commands:
        table += "\n\nOne row, one seed (`K`: `dual` or `fusion`; a fusion row re-ranks the dual `baseline` of its seed):\n"
        table += "".join(f"\n- {name}: `{line} --seeds S --methods M --students K`" for name, line in sorted(commands.items()))
        table += (f"\n\nThe same with `--report-only` and every seed, method and kind gathers them into `{path.name}`; a "
                  "record is gathered only when the identity the current code gives its row (recipe, data, teacher and "
                  "start weights) is the one stored with it, so every row here is one this code trains again.")
    write_text(path.with_suffix(".md"), table + "\n")
    plot(everything, path.with_suffix(".png"))
    return everything
