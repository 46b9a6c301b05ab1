"""The end-to-end job behind ``dcd distill`` / ``make distill``: data -> teacher -> students -> report.

With no data and no checkpoint it runs the embedded default: the generated compositional set, a small
teacher trained on it once (:mod:`dcd.teacher_training`) and reused, then -- with the same training
budget -- a dual student trained without a teacher (the baseline), a dual student trained with DCD
and a DCD fusion student (the re-ranker). With real data and an official checkpoint the same stages
run at the reference hyper-parameters. Every stage writes into the run folder and a finished stage is
reused, an interrupted one resumes from its last checkpoint, so re-running the command continues.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

import students
import teachers
from teachers.base import Scorer
from teachers.files import write_text
from teachers.precision import PrecisionPlan
from teachers.precision import plan as precision_plan

from . import retrieval
from .checkpoint import claim_run_dir
from .data import CaptionSplit, load_split
from .distiller import DCDConfig, Distiller
from .recipes import EMBEDDED_DATA, Budget, Preset, preset_for, resolve, training_steps
from .report import plot_training_curves, read_metrics, results_table
from .score_matrices import cached_score_matrix, plateau_k, rerank_curve
from .teacher_training import embedded_teacher
from .trainer import TrainConfig, is_main_process, seconds_trained

log = logging.getLogger(__name__)

STUDENT_DIR = "student"


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class DistillSettings:
    """Everything ``dcd distill`` needs; CLI flags and Makefile variables map onto these fields."""

    teacher: str = "meter"
    data: str = EMBEDDED_DATA  # synthetic | coco | flickr30k | path to a Karpathy / COCO json
    data_root: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_config: Dict[str, Any] = field(default_factory=dict)  # overrides of the teacher's preset / saved config
    student: Optional[str] = None  # dual student registry name; None: the small one (embedded) / "dual" (METER, real data)
    student_checkpoint: Optional[str] = None  # a save_pretrained dual student to start from
    out: Optional[str] = None
    device: str = "cpu"
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    num_negatives: Optional[int] = None
    num_hard: Optional[int] = None
    negatives: str = "random"
    directions: Optional[Tuple[str, ...]] = None  # None: both (the preset's)
    distill_loss: str = "kl"
    self_loss: str = "ce"
    alpha: Optional[float] = None  # None: embedded default, 0.2 (the reference) on real data
    temperature: float = 1.0
    teacher_temperature: Optional[float] = None  # None: embedded default, 1 on real data
    selection: str = "hardest"
    contrastive_in_mix: bool = False
    self_candidates: str = "teacher"
    drop_false_negatives: Optional[bool] = None  # None: on for the embedded set, off (the paper) on real data
    entropy_temperature: Optional[float] = None  # None: 4 embedded, 1 (the reference) on real data
    alpha_schedule: Optional[str] = None  # None: embedded default, constant on real data
    alpha_end: Optional[float] = None
    dynamic: bool = True
    score_cache: bool = True
    fusion: bool = True  # also distil the fusion student and report the re-rank pipeline
    exhaustive_fusion: bool = False  # also score every (image, caption) pair with the fusion students (slow)
    baseline: bool = True
    rerank_k: int = 0  # 0: chosen on the validation split (the plateau of R@1 over RERANK_KS)
    eval_split: str = "test"
    precision: str = "auto"
    num_workers: int = 0
    group_size: Optional[int] = None  # neighbour batches for the students; None: embedded default / 1 on real data
    seed: int = 0
    progress: bool = True
    extra: Dict[str, Any] = field(default_factory=dict)

    def preset(self) -> Preset:
        """The named defaults of this run's regime (:data:`dcd.recipes.PRESETS`)."""
        return preset_for(self.data)

    @property
    def embedded(self) -> bool:
        return self.data == EMBEDDED_DATA and self.teacher_checkpoint is None

    def run_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        name = Path(self.data).stem if self.data.endswith(".json") else self.data
        return Path("runs") / f"{self.teacher}-{name}"

    def budget(self) -> Budget:
        chosen = {k: v for k, v in (("epochs", self.epochs), ("batch_size", self.batch_size), ("lr", self.lr),
                                    ("max_steps", self.max_steps)) if v is not None}
        return replace(self.preset().budget, **chosen)

    def student_name(self, teacher: Optional[Scorer] = None) -> str:
        """The dual student's registry name: given, the small one, or the teacher's own towers (METER, real data)."""
        if self.student:
            return self.student
        family = teacher.family if teacher is not None else self.teacher
        return "dual" if not self.preset().small_student and family == "meter" else students.SMALL_DUAL

    def student_group_size(self) -> int:
        """Images per neighbour group in the students' batches (1: plain shuffled batches)."""
        return _default(self.group_size, self.preset().group_size)

    def dcd_config(self, use_teacher: bool = True) -> DCDConfig:
        """The method's settings; for the baseline (``use_teacher=False``) the knobs of the teacher's terms
        stay at their defaults: they do not act there, and changing them must not retrain the baseline."""
        if not use_teacher:
            neutral = replace(self, alpha=None, temperature=1.0, entropy_temperature=None, alpha_schedule=None,
                              alpha_end=None, dynamic=True, distill_loss="kl", teacher_temperature=None,
                              selection="hardest", contrastive_in_mix=False, self_candidates="teacher",
                              drop_false_negatives=False)
            return replace(neutral.dcd_config(use_teacher=True), use_teacher=False)
        preset = self.preset()
        negatives = self.num_negatives or preset.negatives_per_data.get(self.data, preset.num_negatives)
        return DCDConfig(
            num_negatives=negatives, num_hard=min(self.num_hard or preset.num_hard, negatives), negatives=self.negatives,
            directions=tuple(_default(self.directions, preset.directions)),
            distill_loss=self.distill_loss, self_loss=self.self_loss,
            alpha=_default(self.alpha, preset.alpha),
            temperature=self.temperature,
            teacher_temperature=_default(self.teacher_temperature,
                                         preset.teacher_temperature if self.distill_loss == "kl" else 1.0),
            entropy_temperature=_default(self.entropy_temperature, preset.entropy_temperature),
            alpha_schedule=_default(self.alpha_schedule, preset.alpha_schedule),
            alpha_end=_default(self.alpha_end, preset.alpha_end if self.alpha_schedule is None else None),
            dynamic=self.dynamic, selection=self.selection, contrastive_in_mix=self.contrastive_in_mix,
            self_candidates=self.self_candidates,
            drop_false_negatives=_default(self.drop_false_negatives, preset.drop_false_negatives),
            use_teacher=use_teacher,
        )

    def precision_plan(self) -> PrecisionPlan:
        """``--precision`` resolved per stage for this run's device (:mod:`teachers.precision`)."""
        return precision_plan(self.precision, self.device)

    def recipe(self, total_steps: Optional[int] = None):
        """The resolved :class:`dcd.recipes.Recipe` of these settings."""
        return resolve(self, total_steps)


def _default(value, fallback):
    """``value`` unless it was left unset (``None``); 0 is a value."""
    return fallback if value is None else value


# ---------------------------------------------------------------------------------------------- stages
def load_data(settings: DistillSettings) -> Dict[str, CaptionSplit]:
    """Train / val / evaluation splits of the chosen data set (the embedded one is built on first use)."""
    names = {"train": "train", "val": "val", "eval": settings.eval_split}
    return {role: load_split(settings.data, settings.data_root, split=name) for role, name in names.items()}


def load_teacher(settings: DistillSettings, splits: Dict[str, CaptionSplit]) -> Tuple[Scorer, Dict[str, Any]]:
    """The official / user checkpoint, or the embedded default's teacher (trained once, then reused)."""
    if settings.teacher_checkpoint:
        model = teachers.create_model(settings.teacher, checkpoint=settings.teacher_checkpoint, **settings.teacher_config)
        return model, {"source": settings.teacher_checkpoint}
    if not settings.preset().trains_teacher:
        raise ValueError(f"--data {settings.data} needs --teacher-checkpoint (the fine-tuned {settings.teacher} "
                         "retrieval checkpoint); only the embedded data set has a teacher dcd can train itself")
    return embedded_teacher(settings.teacher, splits["train"], device=settings.device, progress=settings.progress,
                            overrides=settings.teacher_config, precision=settings.precision)


def setup_teacher(settings: DistillSettings, splits: Dict[str, CaptionSplit]) -> Tuple[Scorer, Dict[str, Any], Scorer]:
    """``(model, info, teacher)``: the teacher model (:func:`load_teacher`) and its frozen view on the run's device,
    scoring at the run's scoring precision; every job that distils (``distill``, ``ablations``) starts here."""
    model, info = load_teacher(settings, splits)
    return model, info, teachers.as_teacher(model, settings.precision_plan().scoring).to(settings.device)


def build_dual(settings: DistillSettings, teacher: Scorer) -> Scorer:
    """The dual student: from a checkpoint, the teacher's own towers (METER, real data) or a size-named preset."""
    torch.manual_seed(settings.seed)
    if settings.student_checkpoint:
        return students.load_student(settings.student_checkpoint)
    name = settings.student_name(teacher)
    if name not in students.STUDENTS:
        raise ValueError(f"--student {name!r} is not a registered student; known: {', '.join(students.list_students())}")
    if name == "dual" and teacher is not None and teacher.family == "meter":
        return students.create_student("dual", teacher=teacher)  # METER's own towers: pretrained offline
    return students.create_student(name)


def train_student(name: str, student: Scorer, teacher: Optional[Scorer], settings: DistillSettings,
                  splits: Dict[str, CaptionSplit], run_dir: Path, cache=None) -> Tuple[Scorer, Dict[str, Any]]:
    """Train (or resume, or reuse) one student in ``run_dir/name``; returns it and its training summary."""
    out = run_dir / name
    saved = out / STUDENT_DIR
    summary_path = out / "summary.json"
    budget = settings.budget()
    dcd_config = settings.dcd_config(use_teacher=teacher is not None)
    group_size = settings.student_group_size()
    recipe = student_identity(student, teacher, settings, splits["train"], cache, dcd_config)
    # a stage trained (or half-trained) with other settings is cleared, never reused or resumed
    if claim_run_dir(out, recipe, is_main_process()) and summary_path.is_file() and (saved / "config.json").is_file():
        log.info("%s: reusing the finished student in %s", name, saved)
        return students.load_student(saved).to(settings.device), json.loads(summary_path.read_text())
    train = splits["train"]
    distiller = Distiller(teacher, student, dcd_config, train.captions, train.caption_image_tensor(),
                          score_cache=cache if teacher is not None else None)
    config = TrainConfig(
        epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr, max_steps=budget.max_steps,
        warmup=budget.warmup, precision=settings.precision_plan().training(getattr(student, "family", "")),
        seed=settings.seed, num_workers=settings.num_workers,
        device=settings.device, progress=settings.progress, desc=name, save_every=25, log_every=5,
    )
    val = splits["val"]

    def validate(module: Distiller) -> Dict[str, float]:
        return retrieval.evaluate(module.student, val, device=settings.device, progress=False)

    # a dual student validates in a second; a cross-encoder would cost minutes per epoch here
    validate_each_epoch = validate if getattr(student, "family", "") == "dual" else None

    history = distiller.fit(train, out, config, evaluate=validate_each_epoch, resume=True, group_size=group_size)
    summary = {  # the stage's identity (recipe.json), then what the run did; "teacher" says whether it had one
        **json.loads(json.dumps(recipe)), "name": name, "teacher": teacher is not None,
        "train_seconds": seconds_trained(history), "steps": max([r["step"] for r in history] or [0]),
    }
    if is_main_process():
        student.save_pretrained(saved)
        write_text(summary_path, json.dumps(summary, indent=1))
    return student, summary


def student_identity(student: Scorer, teacher: Optional[Scorer], settings: DistillSettings, train: CaptionSplit,
                     cache=None, dcd_config: Optional[DCDConfig] = None) -> Dict[str, Any]:
    """Everything that changes a trained student, as JSON: the key that decides whether it is reused.

    The starting weights (fingerprint of the built student: architecture, checkpoint, init seed), the
    teacher's weights, the training data, the candidate cache, the method, the budget, the batches, the
    seed and the precision (the student's training precision, and the teacher's scoring precision when it
    has one). Progress bars, worker counts and output paths are left out: they do not change the result.
    """
    from .score_cache import teacher_fingerprint

    dcd_config = dcd_config or settings.dcd_config(use_teacher=teacher is not None)
    return {
        "student": {"name": getattr(student, "family", type(student).__name__), "start": teacher_fingerprint(student)},
        "teacher": teacher_fingerprint(teacher) if teacher is not None else None,
        "data": {"source": str(train.source), "split": train.name, "captions": train.num_captions},
        "score_cache": dict(cache.header) if cache is not None and teacher is not None else None,
        "budget": asdict(settings.budget()), "dcd": dcd_config.to_dict(), "group_size": settings.student_group_size(),
        "seed": settings.seed, "precision": student_precision(student, teacher, settings),
        "device_type": str(settings.device).split(":")[0],
    }


def student_precision(student: Scorer, teacher: Optional[Scorer], settings: DistillSettings) -> Dict[str, Any]:
    """What a student's training computes in: its own passes, and its teacher's scores (None: no teacher)."""
    from .score_cache import scoring_precision

    return {"training": settings.precision_plan().training(getattr(student, "family", "")),
            "teacher_scoring": scoring_precision(teacher) if teacher is not None else None}


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
    with tempfile.TemporaryDirectory() as scratch:
        train_student("calibration", build_dual(probe, None), None, probe, splits, Path(scratch))
        log = read_metrics(Path(scratch) / "calibration" / "metrics.jsonl")
    # steady state: from the first logged step to the last (start-up and saving are not per-step costs)
    timed = [(r["step"], r["elapsed_s"]) for r in log if "elapsed_s" in r]
    if len(timed) < 2:
        raise ValueError(f"calibration_steps={calibration_steps} logs too few steps to time; use at least 10")
    (first_step, first_time), (last_step, last_time) = timed[0], timed[-1]
    step_seconds = (last_time - first_time) / (last_step - first_step)
    steps = max(1, round(seconds / step_seconds))
    settings = replace(probe, max_steps=steps, progress=progress)
    student, summary = train_student("equal-time-dual", build_dual(settings, None), None, settings, splits, run_dir)
    metrics = retrieval.evaluate(student, splits["eval"], device=device, progress=False)
    return {"target_seconds": round(seconds, 1), "step_seconds": round(step_seconds, 3), "steps": steps,
            "train_seconds": summary["train_seconds"], splits["eval"].name: metrics}


def teacher_score_cache(teacher: Scorer, settings: DistillSettings, train: CaptionSplit, run_dir: Path):
    """Precompute the teacher's scores on fixed random pools once (:class:`~dcd.score_cache.TeacherScoreCache`)."""
    pool = settings.recipe().score_cache
    if pool is None:
        return None
    from .score_cache import TeacherScoreCache

    return TeacherScoreCache.build(teacher, train, run_dir / "teacher_scores", pool_size=pool["pool_size"],
                                   seed=pool["seed"], device=settings.device, progress=settings.progress,
                                   near=pool["near"])


# ---------------------------------------------------------------------------------------------- evaluation
#: candidates per query the retrieve-then-rerank pipelines may re-score; the one used is chosen on val
RERANK_KS = (4, 8, 16, 32, 64)


def count_parameters(model) -> int:
    """Every parameter of ``model``, trainable or frozen: what the results tables call its size."""
    return int(sum(p.numel() for p in model.parameters()))


def choose_rerank_k(first: Scorer, second: Scorer, val: CaptionSplit, settings: DistillSettings,
                    ks: Sequence[int] = RERANK_KS) -> Tuple[int, Dict[int, Dict[str, float]]]:
    """The re-rank depth, chosen on the validation split: the smallest k at the plateau of mean R@1."""
    first_scores = retrieval.score_matrix(first, retrieval._eval_images(first, val, 64, 0), val.captions,
                                          device=settings.device, progress=False)
    image_features = retrieval.encode_images(second, retrieval._eval_images(second, val, 64, 0), 64,
                                             settings.device, False)
    text_features = retrieval.encode_texts(second, val.captions, 256, settings.device, False)
    curve = rerank_curve(first_scores, retrieval.scorer_pair_fn(second, image_features, text_features,
                                                                settings.device), val, ks)
    return plateau_k(curve), curve


def evaluate_models(models: Dict[str, Scorer], teacher: Scorer, splits: Dict[str, CaptionSplit],
                    settings: DistillSettings, rerankers: Dict[str, Scorer], scores_dir: Path,
                    teacher_params: int) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Recall, parameters and retrieval time of every model, then of the retrieve-then-rerank pipelines.

    The teacher's exhaustive scores come from (or go to) the cache in ``scores_dir``: its time is the one
    measured when they were computed. The re-rank depth is chosen on val (``settings.rerank_k`` > 0
    fixes it instead); the k-vs-recall curves on val and, from the cached teacher matrix, on the
    evaluation split are returned too.
    """
    split = splits["eval"]
    teacher_scores, teacher_info = cached_score_matrix(teacher, split, scores_dir, settings.device, settings.progress)
    rows = [{"model": "teacher", **teacher_info["metrics"], "seconds": teacher_info["elapsed_s"],
             "params": teacher_params}]
    for name, model in models.items():
        if getattr(model, "family", "") != "dual" and name in rerankers and not settings.exhaustive_fusion:
            continue  # a cross-encoder student is a re-ranker: measured as one below (exhaustive: minutes per 1k pairs)
        metrics = retrieval.evaluate(model, split, device=settings.device, progress=settings.progress)
        rows.append({"model": name, **metrics, "seconds": metrics["elapsed_s"], "params": count_parameters(model)})
        log.info("%s: RSUM %.1f in %.1f s", name, metrics["rsum"], metrics["elapsed_s"])
    first = models.get("dcd dual") or models.get("baseline dual")
    rerank: Dict[str, Any] = {}
    if first is not None:
        k, val_curve = (settings.rerank_k, {}) if settings.rerank_k else \
            choose_rerank_k(first, teacher, splits["val"], settings)
        first_scores = retrieval.score_matrix(first, retrieval._eval_images(first, split, 64, 0), split.captions,
                                              device=settings.device, progress=False)
        test_curve = rerank_curve(first_scores, lambda i, t: teacher_scores[i, t], split, RERANK_KS)
        rerank = {"k": k, "chosen_on": splits["val"].name, "val_curve": val_curve, "eval_curve": test_curve}
        for name, second in rerankers.items():
            metrics = retrieval.evaluate_rerank(first, second, split, k=k, device=settings.device,
                                                progress=settings.progress)
            rows.append({"model": f"dual top-{k} -> {name}", **metrics, "seconds": metrics["elapsed_s"],
                         "params": count_parameters(second)})  # the re-ranker's: the size a pair goes through
    teacher_seconds = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = teacher_seconds / row["seconds"] if row["seconds"] > 0 else None
    return rows, rerank


# ---------------------------------------------------------------------------------------------- the job
def run_distill(settings: DistillSettings) -> Dict[str, Any]:
    """The whole job; returns (and writes to ``run_dir/results.json``) every figure it printed."""
    run_dir = settings.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    splits = load_data(settings)
    log.info("data: %s", ", ".join(s.summary() for s in splits.values()))
    if is_main_process():  # what this run does, resolved (``dcd distill --print-recipe`` shows the same)
        recipe = settings.recipe(training_steps(settings.budget(), splits["train"].num_captions)).to_dict()
        write_text(run_dir / "recipe.json", json.dumps(recipe, indent=1))
    plan = settings.precision_plan()
    log.info("%s", plan.describe())
    teacher_model, teacher_info, teacher = setup_teacher(settings, splits)
    cache = teacher_score_cache(teacher, settings, splits["train"], run_dir)

    trained: Dict[str, Scorer] = {}
    summaries: Dict[str, Any] = {}
    if settings.baseline:
        trained["baseline dual"], summaries["baseline"] = train_student(
            "baseline", build_dual(settings, teacher), None, settings, splits, run_dir)
    trained["dcd dual"], summaries["dcd"] = train_student(
        "dcd", build_dual(settings, teacher), teacher, settings, splits, run_dir, cache)
    rerankers: Dict[str, Scorer] = {}
    if settings.fusion:
        for name, fusion_teacher in (("baseline", None), ("dcd", teacher)):
            if name == "baseline" and not settings.baseline:
                continue
            torch.manual_seed(settings.seed)  # its new heads: the same start whatever ran before
            fusion = students.create_student("fusion", teacher=teacher_model)
            stage = "fusion" if name == "dcd" else "fusion-baseline"
            trained[f"{name} fusion"], summaries[stage] = train_student(stage, fusion, fusion_teacher, settings,
                                                                        splits, run_dir, cache)
        # trained: from here on they only score, frozen, at the scoring precision (as the teacher does)
        rerankers.update({name: teachers.as_teacher(trained[name], plan.scoring)
                          for name in ("baseline fusion", "dcd fusion") if name in trained})
    rerankers["teacher"] = teacher

    scores_dir = Path(teacher_info["path"]).parent / "scores" if "path" in teacher_info else run_dir / "teacher_scores_eval"
    rows, rerank = evaluate_models(trained, teacher, splits, settings, rerankers, scores_dir,
                                   count_parameters(teacher_model))
    title = (f"{settings.teacher} teacher on {splits['eval'].name} ({splits['eval'].num_images} images x "
             f"{splits['eval'].num_captions} captions, {settings.device})")
    table = results_table(rows, title)
    curves = plot_training_curves({k: run_dir / k for k in summaries}, run_dir / "training_curves.png")
    results = {
        "settings": asdict(settings), "teacher": teacher_info, "training": summaries, "results": rows, "rerank": rerank,
        "eval_split": splits["eval"].name, "total_seconds": round(time.time() - started, 1),
        "curves": str(curves) if curves else None,
    }
    if is_main_process():
        write_text(run_dir / "results.json", json.dumps(results, indent=1, default=str))
        write_text(run_dir / "results.txt", table + "\n")
        print("\n" + table)
        print(f"\nwritten: {run_dir}/results.json, results.txt, training_curves.png; students in "
              f"{run_dir}/*/{STUDENT_DIR}/ ({results['total_seconds']:.0f} s)")
    return results
