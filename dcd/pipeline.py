"""The end-to-end job behind ``dcd distill`` / ``make distill``: data -> teacher -> students -> report.

With no data and no checkpoint it runs the embedded default: the generated compositional set, a small
teacher trained on it once (:mod:`dcd.teacher_training`) and reused, then -- with the same training
budget -- a dual student trained without a teacher (the baseline), a dual student trained with DCD
and a DCD fusion student (the re-ranker). With real data and an official checkpoint the same stages
run at the reference hyper-parameters. Every stage writes into a folder of its own named by its identity
(:mod:`dcd.stages`): a finished stage is reused, an interrupted one resumes from its last checkpoint, so
re-running the command continues, and a run with another setting trains beside the earlier ones, never over.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import students
import teachers
from teachers.base import Scorer
from teachers.files import write_text
from teachers.precision import PrecisionPlan

from . import retrieval
from .data import CaptionSplit, load_split, readable
from .data.karpathy import hold_out
from .distiller import Distiller
from .recipes import NAMED_DATA, ROLES, DistillSettings, Recipe, resolve
from .report import headroom_note, plot_training_curves, read_metrics, results_table
from .score_matrices import cached_score_matrix, plateau_k, rerank_curve
from .teacher_training import embedded_teacher, out_of_fold_teacher
from .stages import claim_stage, stage_dir, stage_lock, weights_sha256, write_latest
from .trainer import TrainConfig, from_main_process, is_main_process, seconds_trained, world_size

log = logging.getLogger(__name__)

__all__ = ["DistillSettings", "RunSetup", "setup_run", "setup_teacher", "load_data", "load_teacher", "build_student",
           "student_stage",
           "train_student", "rerank_validation", "teacher_score_cache", "equal_time_dual", "evaluate_models", "run_distill"]

STUDENT_DIR = "student"
#: the students of a run folder, each in its content-addressed stage folder
STUDENTS_DIR = "students"


# ---------------------------------------------------------------------------------------------- setup
def load_data(settings: DistillSettings) -> Dict[str, CaptionSplit]:
    """Train / val / evaluation splits of the chosen data set (the embedded one is built on first use); a user's
    own file is checked image by image, and an unreadable image is skipped and listed (:func:`dcd.data.readable`)."""
    names = {"train": "train", "val": "val", "eval": settings.eval_split}
    splits = {role: load_split(settings.data, settings.data_root, split=name) for role, name in names.items()}
    if settings.data not in NAMED_DATA:
        if splits["train"].image_paths == splits["eval"].image_paths:  # one split only: a COCO caption file
            splits = hold_out(splits["train"])
        splits = {role: readable(split) for role, split in splits.items()}
    return splits


def load_teacher(recipe: Recipe, splits: Dict[str, CaptionSplit]) -> Tuple[Scorer, Dict[str, Any]]:
    """The official / user checkpoint, or the teacher dcd trains by the embedded recipe (once, then reused; from the
    checkpoint when the recipe fine-tunes it, ``dcd teacher --teacher-checkpoint``); with ``--teacher-folds K``, K
    such teachers as one (:func:`~dcd.teacher_training.out_of_fold_teacher`)."""
    family, checkpoint = recipe.teacher["family"], recipe.teacher["checkpoint"]
    if checkpoint and recipe.teacher["training"] is None:  # the checkpoint is the teacher, as given
        model = teachers.create_model(family, checkpoint=checkpoint, **recipe.teacher["config"])
        return model, {"source": checkpoint}
    if recipe.teacher["training"] is None:
        raise ValueError(f"--data {recipe.data['source']} needs --teacher-checkpoint (the fine-tuned {family} "
                         "retrieval checkpoint); a teacher dcd trains itself is for the embedded set and for your "
                         "own data file (--data my.json)")
    if recipe.teacher.get("folds", 1) > 1:
        return out_of_fold_teacher(recipe, splits["train"], progress=recipe.output["progress"])
    return embedded_teacher(family, splits["train"], device=recipe.device, progress=recipe.output["progress"],
                            overrides=recipe.teacher["config"], precision=recipe.precision["cross"],
                            identity=recipe.identity("teacher"), start=checkpoint)


@dataclass
class RunSetup:
    """What every job that distils starts from (``dcd distill``, ``dcd ablations``): one path, :func:`setup_run`."""

    recipe: Recipe  # resolved once, with the loaded teacher's weight hash
    splits: Dict[str, CaptionSplit]
    teacher_model: Scorer  # the teacher as trained / loaded (fusion students start from it)
    teacher_info: Dict[str, Any]
    teacher: Scorer  # its frozen view on the run's device, scoring at the run's scoring precision
    cache: Any  # the TeacherScoreCache (None: the teacher scores online)


def setup_run(settings: DistillSettings, run_dir: Path) -> RunSetup:
    """Data, the recipe (resolved here, once), the teacher and its score cache in ``run_dir``."""
    splits = load_data(settings)
    log.info("data: %s", ", ".join(s.summary() for s in splits.values()))
    recipe = resolve(settings, splits["train"], world_size=world_size())
    log.info("%s", PrecisionPlan(**recipe.precision).describe())
    recipe, model, info, teacher = setup_teacher(recipe, splits)
    cache = teacher_score_cache(teacher, recipe, splits["train"], run_dir)
    return RunSetup(recipe, splits, model, info, teacher, cache)


def setup_teacher(recipe: Recipe, splits: Dict[str, CaptionSplit]) -> Tuple[Recipe, Scorer, Dict[str, Any], Scorer]:
    """``(recipe, model, info, teacher)``: the teacher model (:func:`load_teacher`), the recipe with its weight hash,
    and its frozen view on the run's device scoring at the run's scoring precision."""
    model, info = load_teacher(recipe, splits)
    teacher = teachers.as_teacher(model, recipe.precision["scoring"]).to(recipe.device)
    return recipe.with_teacher_weights(weights_sha256(model)), model, info, teacher


def build_student(kind: str, recipe: Recipe, teacher: Optional[Scorer],
                  teacher_model: Optional[Scorer] = None) -> Scorer:
    """A student of ``kind`` as it starts training, from the recipe's seed (the same start whatever ran before):
    the dual one from a checkpoint, the teacher's own towers (METER, real data) or a size-named preset; the fusion
    one from the teacher's layers (:func:`students.create_student`)."""
    torch.manual_seed(recipe.seed)
    if kind == "fusion":
        return students.create_student("fusion", teacher=teacher_model)
    if kind != "dual":
        raise ValueError(f"student kind must be 'dual' or 'fusion', not {kind!r}")
    if recipe.student["checkpoint"]:
        return students.load_student(recipe.student["checkpoint"])
    name = recipe.student["name"]
    if name not in students.STUDENTS:
        raise ValueError(f"--student {name!r} is not a registered student; known: {', '.join(students.list_students())}")
    if name == "dual" and teacher is not None and teacher.family == "meter":
        return students.create_student("dual", teacher=teacher)  # METER's own towers: pretrained offline
    return students.create_student(name)


def student_stage(recipe: Recipe, role: str, identity: Dict[str, Any], run_dir: Path,
                  label: Optional[str] = None) -> Path:
    """The content-addressed folder of a student ``role`` with ``identity`` under ``run_dir/students``:
    ``dual-dcd-seed0-3f9c2a1b`` (``label`` replaces the method part, e.g. an ablation row's name)."""
    kind, uses = ROLES[role]
    label = label or ("dcd" if uses else "baseline")
    return stage_dir(run_dir / STUDENTS_DIR, f"{kind}-{label}-seed{recipe.seed}", identity)


def train_student(role: str, student: Scorer, teacher: Optional[Scorer], recipe: Recipe,
                  splits: Dict[str, CaptionSplit], run_dir: Path, cache=None,
                  label: Optional[str] = None,
                  validate: Optional[Callable[[Scorer], Dict[str, float]]] = None) -> Tuple[Scorer, Dict[str, Any]]:
    """Train (or resume, or reuse) one student ``role`` (:data:`dcd.recipes.ROLES`) in its stage folder under
    ``run_dir``; returns it and its training summary (``summary["stage"]``: the folder).

    ``validate(student) -> metrics`` runs after each epoch (its val RSUM is the training curve). A dual student
    has a default (recall on the val split, a second here); a cross-encoder has none, since its exhaustive pass
    costs minutes per epoch: give it :func:`rerank_validation`.

    Another process training the same stage is waited for, and its result reused (:func:`dcd.stages.stage_lock`).
    """
    kind, uses = ROLES[role]
    if uses and teacher is None:
        raise ValueError(f"student role {role!r} trains with the teacher, and none was given")
    identity = recipe.identity("student", role, start=weights_sha256(student))
    out = student_stage(recipe, role, identity, run_dir, label)
    saved, summary_path = out / STUDENT_DIR, out / "summary.json"
    if label is None and not out.is_dir():  # trained by an earlier dcd in runs/<run>/<role>: used where it is
        from .migrate import legacy_student

        old = legacy_student(run_dir / role, identity, student, teacher, cache if uses else None)
        if old is not None:
            return students.load_student(Path(old["stage"]) / STUDENT_DIR).to(recipe.device), old
    with stage_lock(out) if is_main_process() else contextlib.nullcontext():
        # rank 0 decides (it holds the lock); every rank of a torchrun job then reuses, or trains, together
        finished = from_main_process(claim_stage(out, identity, "student", is_main_process())
                                     and summary_path.is_file() and (saved / "config.json").is_file())
        if finished:
            log.info("%s: reusing the finished student in %s", out.name, saved)
            return students.load_student(saved).to(recipe.device), json.loads(summary_path.read_text())
        train, budget = splits["train"], recipe.budget
        distiller = Distiller(teacher if uses else None, student, recipe.dcd_config(role), train.captions,
                              train.caption_image_tensor(), score_cache=cache if uses else None)
        config = TrainConfig(
            epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr, max_steps=budget.max_steps,
            warmup=budget.warmup, precision=identity["precision"]["training"], seed=recipe.seed,
            num_workers=recipe.output["num_workers"], device=recipe.device, progress=recipe.output["progress"],
            desc=out.name, save_every=25, log_every=5,
        )
        val = splits["val"]
        if validate is None and kind == "dual":
            def validate(model: Scorer) -> Dict[str, float]:
                return retrieval.evaluate(model, val, device=recipe.device, progress=False)
        evaluate = (lambda module: validate(module.student)) if validate is not None else None
        history = distiller.fit(train, out, config, evaluate=evaluate, resume=True, group_size=recipe.group_size)
        summary = {"stage": str(out), "role": role, "label": label or role, "teacher": uses,
                   "train_seconds": seconds_trained(history), "steps": max([r["step"] for r in history] or [0])}
        if is_main_process():
            student.save_pretrained(saved)
            write_text(summary_path, json.dumps(summary, indent=1))
    return student, summary


def rerank_validation(first_stage: Scorer, split: CaptionSplit, k: int, recipe: Recipe
                      ) -> Callable[[Scorer], Dict[str, float]]:
    """A cross-encoder student's val figure while it trains: re-ranking ``first_stage``'s top ``k`` per query of
    ``split`` as it is measured once trained (the student at the scoring precision, the first stage at its own),
    in tens of seconds instead of an exhaustive pass's minutes. Only the student's passes run in bf16: a dual
    student's dot products in bf16 tie and lose 31 val RSUM here (334.4 -> 303.5, measured)."""
    def validate(student: Scorer) -> Dict[str, float]:
        reranker = teachers.ScoringView(student, recipe.precision["scoring"])  # not frozen: it trains on
        return retrieval.evaluate_rerank(first_stage, reranker, split, k=k, device=recipe.device, progress=False)
    return validate


def equal_time_dual(seconds: float, splits: Dict[str, CaptionSplit], run_dir: Path, device: str = "cpu",
                    progress: bool = True, calibration_steps: int = 15) -> Dict[str, Any]:
    """The bar an embedded teacher has to clear: the undistilled dual student trained for ``seconds``.

    A teacher is only worth distilling if it ranks better than the student would on its own, given the
    compute the teacher took. So the baseline dual (the embedded student and recipe of ``dcd distill``)
    is timed over ``calibration_steps`` steps on this machine (steady state, from its metrics log), then
    trained for as many steps as fit in ``seconds`` (its learning-rate schedule ending there) and
    evaluated on ``splits["eval"]``. The trained student is kept in ``run_dir`` and reused when the step
    count comes out the same.
    """
    import tempfile

    probe = DistillSettings(device=device, progress=False, max_steps=calibration_steps, epochs=1000, fusion=False)
    recipe = resolve(probe, splits["train"])
    with tempfile.TemporaryDirectory() as scratch:
        _, calibration = train_student("baseline", build_student("dual", recipe, None), None, recipe, splits,
                                       Path(scratch), label="calibration")
        log = read_metrics(Path(calibration["stage"]) / "metrics.jsonl")
    # steady state: from the first logged step to the last (start-up and saving are not per-step costs)
    timed = [(r["step"], r["elapsed_s"]) for r in log if "elapsed_s" in r]
    if len(timed) < 2:
        raise ValueError(f"calibration_steps={calibration_steps} logs too few steps to time; use at least 10")
    (first_step, first_time), (last_step, last_time) = timed[0], timed[-1]
    step_seconds = (last_time - first_time) / (last_step - first_step)
    steps = max(1, round(seconds / step_seconds))
    recipe = resolve(replace(probe, max_steps=steps, progress=progress), splits["train"])
    student, summary = train_student("baseline", build_student("dual", recipe, None), None, recipe, splits, run_dir,
                                     label="equal-time")
    metrics = retrieval.evaluate(student, splits["eval"], device=device, progress=False)
    return {"target_seconds": round(seconds, 1), "step_seconds": round(step_seconds, 3), "steps": steps,
            "train_seconds": summary["train_seconds"], splits["eval"].name: metrics}


def teacher_score_cache(teacher: Scorer, recipe: Recipe, train: CaptionSplit, run_dir: Path):
    """The teacher's scores on fixed random pools (:class:`~dcd.score_cache.TeacherScoreCache`), computed once in
    ``run_dir/score-cache-<hash>``: a second process asking for it waits and then reads it."""
    pool = recipe.score_cache
    if pool is None:
        return None
    from .migrate import legacy_score_cache
    from .score_cache import TeacherScoreCache, cache_header

    directory = stage_dir(run_dir, "score-cache", recipe.identity("score_cache"))
    cache = None
    if is_main_process():  # rank 0 builds it (behind the lock); the other ranks open what it built or found
        with stage_lock(directory):
            cache = None if directory.is_dir() else legacy_score_cache(run_dir, teacher, train, pool)
            if cache is None:
                cache = TeacherScoreCache.build(teacher, train, directory, pool_size=pool["pool_size"],
                                                seed=pool["seed"], device=recipe.device,
                                                progress=recipe.output["progress"], near=pool["near"])
                claim_stage(directory, recipe.identity("score_cache"), "score cache")
    where = from_main_process(str(cache.directory) if cache is not None else None)
    if cache is not None:
        return cache
    if Path(where) != directory:
        return legacy_score_cache(run_dir, teacher, train, pool)
    return TeacherScoreCache.open(directory, expect=cache_header(teacher, train, pool["pool_size"], pool["seed"],
                                                                 pool["near"]))


# ---------------------------------------------------------------------------------------------- evaluation
#: candidates per query the retrieve-then-rerank pipelines may re-score; the one used is chosen on val
RERANK_KS = (4, 8, 16, 32, 64)


def count_parameters(model) -> int:
    """Every parameter of ``model``, trainable or frozen: what the results tables call its size."""
    return int(sum(p.numel() for p in model.parameters()))


def choose_rerank_k(first: Scorer, second: Scorer, val: CaptionSplit, recipe: Recipe,
                    ks: Sequence[int] = RERANK_KS) -> Tuple[int, Dict[int, Dict[str, float]]]:
    """The re-rank depth, chosen on the validation split: the smallest k at the plateau of mean R@1."""
    first_scores = retrieval.score_matrix(first, retrieval.eval_images(first, val, 64, 0), val.captions,
                                          device=recipe.device, progress=False)
    image_features = retrieval.encode_images(second, retrieval.eval_images(second, val, 64, 0), 64,
                                             recipe.device, False)
    text_features = retrieval.encode_texts(second, val.captions, 256, recipe.device, False)
    curve = rerank_curve(first_scores, retrieval.scorer_pair_fn(second, image_features, text_features,
                                                                recipe.device), val, ks)
    return plateau_k(curve), curve


def evaluate_models(models: Dict[str, Scorer], teacher: Scorer, splits: Dict[str, CaptionSplit],
                    recipe: Recipe, rerankers: Dict[str, Scorer], scores_dir: Path,
                    teacher_params: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Recall, parameters and retrieval time of every model, then of the retrieve-then-rerank pipelines.

    The teacher's exhaustive scores come from (or go to) the cache in ``scores_dir``: its time is the one
    measured when they were computed. The re-rank depth is chosen on val (``recipe.stages["rerank_k"]`` > 0
    fixes it instead); the k-vs-recall curves on val and, from the cached teacher matrix, on the
    evaluation split are returned too.
    """
    split = splits["eval"]
    teacher_scores, teacher_info = cached_score_matrix(teacher, split, scores_dir, recipe.device,
                                                       recipe.output["progress"])
    rows = [{"model": "teacher", **teacher_info["metrics"], "seconds": teacher_info["elapsed_s"],
             "params": teacher_params}]
    for name, model in models.items():
        if getattr(model, "family", "") != "dual" and name in rerankers and not recipe.stages["exhaustive_fusion"]:
            continue  # a cross-encoder student is a re-ranker: measured as one below (exhaustive: minutes per 1k pairs)
        metrics = retrieval.evaluate(model, split, device=recipe.device, progress=recipe.output["progress"])
        rows.append({"model": name, **metrics, "seconds": metrics["elapsed_s"], "params": count_parameters(model)})
        log.info("%s: RSUM %.1f in %.1f s", name, metrics["rsum"], metrics["elapsed_s"])
    first = models.get("dcd dual") or models.get("baseline dual")
    rerank: Dict[str, Any] = {}
    if first is not None:
        k, val_curve = (recipe.stages["rerank_k"], {}) if recipe.stages["rerank_k"] else \
            choose_rerank_k(first, teacher, splits["val"], recipe)
        first_scores = retrieval.score_matrix(first, retrieval.eval_images(first, split, 64, 0), split.captions,
                                              device=recipe.device, progress=False)
        test_curve = rerank_curve(first_scores, lambda i, t: teacher_scores[i, t], split, RERANK_KS)
        rerank = {"k": k, "chosen_on": splits["val"].name, "val_curve": val_curve, "eval_curve": test_curve}
        for name, second in rerankers.items():
            metrics = retrieval.evaluate_rerank(first, second, split, k=k, device=recipe.device,
                                                progress=recipe.output["progress"])
            rows.append({"model": f"dual top-{k} -> {name}", **metrics, "seconds": metrics["elapsed_s"],
                         "params": count_parameters(second)})  # the re-ranker's: the size a pair goes through
    teacher_seconds = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = teacher_seconds / row["seconds"] if row["seconds"] > 0 else None
    return rows, rerank


# ---------------------------------------------------------------------------------------------- the job
def run_distill(settings: DistillSettings) -> Dict[str, Any]:
    """The whole job; returns (and writes to ``run_dir/results.json``) every figure it printed.

    Each stage lives in a folder named by its identity (:mod:`dcd.stages`): another setting makes other folders
    beside the earlier ones, and ``latest.json`` names the stages this run used."""
    run_dir = settings.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    setup = setup_run(settings, run_dir)
    recipe, splits, teacher, cache = setup.recipe, setup.splits, setup.teacher, setup.cache
    if is_main_process():  # what this run does, resolved (``dcd distill --print-recipe`` shows the same)
        write_text(run_dir / "recipe.json", json.dumps(recipe.to_dict(), indent=1))

    roles = [r for r in ("baseline", "dcd") if r == "dcd" or recipe.stages["baseline"]]
    if recipe.stages["fusion"]:
        roles += [r for r in ("fusion-baseline", "fusion") if r == "fusion" or recipe.stages["baseline"]]
    trained: Dict[str, Scorer] = {}
    summaries: Dict[str, Any] = {}
    for role in roles:
        kind, uses = ROLES[role]
        name = f"{'dcd' if uses else 'baseline'} {kind}"  # the table's row: "dcd dual", "baseline fusion", ...
        student = build_student(kind, recipe, teacher, setup.teacher_model)
        trained[name], summaries[role] = train_student(role, student, teacher if uses else None, recipe, splits,
                                                       run_dir, cache)
    # trained fusion students only score from here on, frozen, at the scoring precision (as the teacher does)
    rerankers: Dict[str, Scorer] = {name: teachers.as_teacher(trained[name], recipe.precision["scoring"])
                                    for name in ("baseline fusion", "dcd fusion") if name in trained}
    rerankers["teacher"] = teacher

    info = setup.teacher_info
    scores_dir = Path(info["path"]).parent / "scores" if "path" in info else run_dir / "teacher_scores_eval"
    rows, rerank = evaluate_models(trained, teacher, splits, recipe, rerankers, scores_dir,
                                   count_parameters(setup.teacher_model))
    title = (f"{settings.teacher} teacher on {splits['eval'].name} ({splits['eval'].num_images} images x "
             f"{splits['eval'].num_captions} captions, {settings.device})")
    table = results_table(rows, title)
    note = headroom_note(rows)
    if note:
        table += "\n" + note
    stage_paths = {role: Path(summary["stage"]) for role, summary in summaries.items()}
    curves = plot_training_curves(stage_paths, run_dir / "training_curves.png")
    results = {
        "settings": asdict(settings), "teacher": info, "training": summaries, "results": rows, "rerank": rerank,
        "eval_split": splits["eval"].name, "total_seconds": round(time.time() - started, 1),
        "curves": str(curves) if curves else None, "note": note or None,
        "stages": {role: str(path) for role, path in stage_paths.items()},
        "skipped_images": sorted({line for split in splits.values() for line in split.meta.get("skipped", [])}),
    }
    if is_main_process():
        for role, path in stage_paths.items():  # each student's own figures, beside it: `dcd runs` reads them
            name = _row_name(role)  # a fusion student's row is its re-rank pipeline's: "dual top-k -> dcd fusion"
            rows_of = [r for r in rows if r["model"] == name or r["model"].endswith(f"-> {name}")]
            write_text(path / "results.json", json.dumps({"eval_split": splits["eval"].name, "rows": rows_of},
                                                         indent=1, default=str))
        write_text(run_dir / "results.json", json.dumps(results, indent=1, default=str))
        write_text(run_dir / "results.txt", table + "\n")
        if results["skipped_images"]:
            write_text(run_dir / "skipped_images.txt", "".join(f"{line}\n" for line in results["skipped_images"]))
        write_latest(run_dir, {**stage_paths, **({"score_cache": cache.directory} if cache is not None else {})},
                     results="results.json")
        print("\n" + table)
        print(f"\nwritten: {run_dir}/results.json, results.txt, training_curves.png, latest.json; students in "
              f"{run_dir}/{STUDENTS_DIR}/ ({results['total_seconds']:.0f} s; `dcd runs {run_dir}` lists them)")
    return results


def _row_name(role: str) -> str:
    kind, uses = ROLES[role]
    return f"{'dcd' if uses else 'baseline'} {kind}"
