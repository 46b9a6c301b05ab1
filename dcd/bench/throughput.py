"""What this machine's CPU (or GPU) gives each stage of dcd, in fp32 and bf16, and where a step's time goes.

``python benchmarks/throughput.py`` (``make bench-throughput``) measures, in one process:

* the matmul bound: GFLOP/s of a 2048x384 @ 384x1536 matmul in fp32 and bf16;
* teacher scoring: pairs per second of the embedded METER teacher (the trained one when ``make distill``
  has made it, else its architecture with random weights: the time is the same) in fp32 and under bf16
  autocast, and how far the two agree on a subset of the validation split (top-1 in both directions,
  largest logit difference, RSUM of each);
* training steps: for each student stage of ``make distill`` (dual and fusion, baseline and DCD), the wall
  time per optimiser step through the real training loop (data loading, collation, teacher, student,
  checkpoints), against the student's own forward + backward + optimiser time on prepared batches, with
  the step split into its parts (data, teacher scoring, student forward, backward, optimiser).

Everything is written to ``<out>/throughput.json``. Time on a quiet machine: other jobs on the cores
change every figure (the ratios less than the absolute times).
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

import teachers
from teachers.precision import PrecisionPlan, autocast, bf16_is_fast, cpu_bf16_flags
from teachers.precision import plan as precision_plan

__all__ = ["main", "matmul_gflops", "scoring_throughput", "step_breakdown", "top1_agreement"]

log = logging.getLogger(__name__)


def matmul_gflops(dtype: torch.dtype, m: int = 2048, k: int = 384, n: int = 1536, repeats: int = 20) -> float:
    """GFLOP/s of an ``m x k @ k x n`` matmul in ``dtype`` on the CPU: the bound the other figures sit under."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - started) / 1e9


def _embedded_teacher_model(train):
    """The trained embedded METER teacher if one is on disk, else its architecture with random weights."""
    from dcd.teacher_training import EMBEDDED_TEACHERS, embedded_architecture, find_embedded_teacher

    directory = find_embedded_teacher("meter", train)
    if directory is not None:
        return teachers.create_model("meter", checkpoint=directory / "model"), str(directory / "model")
    torch.manual_seed(0)
    return embedded_architecture("meter"), \
        f"{EMBEDDED_TEACHERS['meter']['preset']} (random weights: no trained embedded teacher found)"


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> Dict[str, float]:
    """Share of images (``i2t``) and of captions (``t2i``) whose best match is the same in both score matrices."""
    return {"i2t": round(float((reference.argmax(1) == other.argmax(1)).float().mean()), 4),
            "t2i": round(float((reference.argmax(0) == other.argmax(0)).float().mean()), 4)}


def _score(teacher, images: List[torch.Tensor], captions: Sequence[str]) -> torch.Tensor:
    """``[n_images, n_captions]`` logits: each image and caption encoded once, then every pair fused."""
    from teachers.base import to_device

    pixels = to_device(teacher.collate_images(images), teacher.device)
    texts = to_device(teacher.tokenize(list(captions)), teacher.device)
    return teacher.score_features(teacher.encode_images(pixels), teacher.encode_texts(texts))


def scoring_throughput(model, split, num_images: int, repeats: int = 2) -> Dict[str, Any]:
    """Pairs/s of ``model`` in fp32 and bf16 on the first ``num_images`` images of ``split`` and their captions,
    and the agreement of the two score matrices (which are the figures of the fastest repeat)."""
    from dcd.retrieval import recall_at_k
    from dcd.score_matrices import refine_top

    from dcd.data.images import load_image

    transform = model.image_transform(False)
    images = [transform(load_image(split.image_paths[i])) for i in range(num_images)]
    caption_image = split.caption_image_tensor()
    chosen = (caption_image < num_images).nonzero().flatten()
    captions = [split.captions[int(c)] for c in chosen]
    out: Dict[str, Any] = {"images": num_images, "captions": len(captions), "pairs": num_images * len(captions)}
    matrices = {}
    for precision in ("fp32", "bf16"):
        teacher = teachers.as_teacher(model, precision)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            matrices[precision] = _score(teacher, images, captions)
            times.append(time.perf_counter() - started)
        out[f"{precision}_seconds"] = round(min(times), 3)
        out[f"pairs_per_s_{precision}"] = round(out["pairs"] / min(times), 1)
        out[f"rsum_{precision}"] = round(recall_at_k(matrices[precision], caption_image[chosen])["rsum"], 2)
    out["bf16_over_fp32"] = round(out["pairs_per_s_bf16"] / out["pairs_per_s_fp32"], 2)
    # what an exhaustive bf16 pass stores: the head of every list re-scored in fp32 (dcd.score_matrices.refine_top)
    started = time.perf_counter()
    pixels = model.collate_images(images)
    matrices["bf16_refined"] = refine_top(teachers.as_teacher(model, "bf16"), matrices["bf16"], pixels, captions)
    out["bf16_refined_seconds"] = round(out["bf16_seconds"] + time.perf_counter() - started, 3)
    out["pairs_per_s_bf16_refined"] = round(out["pairs"] / out["bf16_refined_seconds"], 1)
    out["bf16_refined_over_fp32"] = round(out["pairs_per_s_bf16_refined"] / out["pairs_per_s_fp32"], 2)
    out["rsum_bf16_refined"] = round(recall_at_k(matrices["bf16_refined"], caption_image[chosen])["rsum"], 2)
    a = matrices["fp32"].float()
    for name in ("bf16", "bf16_refined"):
        b = matrices[name].float()
        agree = top1_agreement(a, b)
        out[f"top1_agreement_{name}"] = {**agree, "both": min(agree.values())}
        out[f"max_logit_difference_{name}"] = round(float((a - b).abs().max()), 5)
    out["ranking_top1_agreement"] = out["top1_agreement_bf16_refined"]["both"]
    return out


def exhaustive_agreement(model, source: str, splits, split_name: str) -> Dict[str, Any]:
    """A whole split scored in fp32 and in bf16 (with the fp32 refine of every list's head) by the trained teacher:
    recall of each and top-1 agreement. The matrices are the cached ones ``make distill`` reads (and writes)."""
    from dcd.data import load_split
    from dcd.score_matrices import cached_score_matrix

    if "random weights" in source:
        raise SystemExit("dcd: error: --exhaustive needs the trained embedded teacher (make distill TEACHER=meter)")
    split = {"val": splits["val"], "test": splits["eval"]}.get(split_name) or load_split("synthetic", None, split=split_name)
    directory = Path(source).parent / "scores"
    matrices, out = {}, {}
    for precision in ("fp32", "bf16"):
        matrices[precision], info = cached_score_matrix(teachers.as_teacher(model, precision), split, directory)
        out[precision] = {"rsum": round(info["metrics"]["rsum"], 2), "binding": info["metrics"].get("binding"),
                          "seconds": info["elapsed_s"]}
        print(f"  {split.name} {precision}: RSUM {out[precision]['rsum']}, {info['elapsed_s']:.0f} s")
    a, b = matrices["fp32"], matrices["bf16"]
    out["top1_agreement"] = top1_agreement(a, b)
    out["rsum_difference"] = round(out["bf16"]["rsum"] - out["fp32"]["rsum"], 2)
    out["bf16_over_fp32"] = round(out["fp32"]["seconds"] / out["bf16"]["seconds"], 2)
    print(f"  {split.name}: bf16 - fp32 RSUM {out['rsum_difference']:+.2f}, top-1 agreement {out['top1_agreement']}, "
          f"{out['bf16_over_fp32']}x faster")
    return out


class _Clock:
    """Seconds spent inside the wrapped methods of one object (the teacher's passes within a forward)."""

    def __init__(self, obj, names: Sequence[str]):
        self.seconds = 0.0
        for name in names:
            setattr(obj, name, self._timed(getattr(obj, name)))

    def _timed(self, method: Callable) -> Callable:
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def step_breakdown(name: str, settings, splits, teacher, teacher_model, cache, steps: int,
                   work_dir: Path) -> Dict[str, Any]:
    """One student stage of ``make distill``: wall ms per step through the training loop, and its parts."""
    from dcd.distiller import Distiller
    from dcd.pipeline import build_student, train_student
    from dcd.recipes import resolve, role_of
    from dcd.report import read_metrics
    from dcd.stages import weights_sha256

    kind, method = name.split("-")
    use_teacher = method == "dcd"
    role = role_of(kind, use_teacher)
    recipe = resolve(replace(settings, max_steps=steps), splits["train"]).with_teacher_weights(
        weights_sha256(teacher_model))

    def build():
        return build_student(kind, recipe, teacher, teacher_model)

    # 1. the real loop, as make distill runs it (steady state: first logged step to the last)
    _, summary = train_student(role, build(), teacher if use_teacher else None, recipe, splits, work_dir,
                               cache if use_teacher else None)
    logged = [r for r in read_metrics(Path(summary["stage"]) / "metrics.jsonl") if "elapsed_s" in r]
    first, last = logged[0], logged[-1]
    step_ms = 1000 * (last["elapsed_s"] - first["elapsed_s"]) / (last["step"] - first["step"])

    # 2. the same stage's parts, on batches of the same loader, prepared beforehand
    student = build()
    train = splits["train"]
    # a view of its own, so that the clock below wraps no method of the teacher the other stages share
    own_teacher = teachers.Teacher(teacher.model, teacher.precision) if use_teacher else None
    distiller = Distiller(own_teacher, student, recipe.dcd_config(role), train.captions, train.caption_image_tensor(),
                          score_cache=cache if use_teacher else None)  # the recipe's step count: ``steps``
    from dcd.data import TrainPairs

    dataset, collate = TrainPairs(train, distiller.transforms()), distiller.collate()
    generator = torch.Generator().manual_seed(0)
    batch_size = recipe.budget.batch_size
    started = time.perf_counter()
    batches = [collate([dataset[int(i)] for i in torch.randint(len(dataset), (batch_size,), generator=generator)])
               for _ in range(steps)]
    data_ms = 1000 * (time.perf_counter() - started) / steps
    optimizer = torch.optim.AdamW(distiller.trainable_parameters(), lr=1e-5)
    precision = PrecisionPlan(**recipe.precision).training(kind)
    clock = _Clock(distiller.teacher, ("encode_images", "encode_texts", "score_feature_pairs")) \
        if use_teacher else None
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    distiller.train()
    for index, batch in enumerate(batches):
        if index == 2 and clock is not None:  # two warm-up steps, then count
            clock.seconds = 0.0
        marks = [time.perf_counter()]
        with autocast(settings.device, precision):
            loss = distiller(batch)["loss"]
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        if index >= 2:
            for part, (a, b) in zip(parts, zip(marks, marks[1:])):
                parts[part] += b - a
    counted = steps - 2
    teacher_ms = 1000 * clock.seconds / counted if clock is not None else 0.0
    ms = {part: 1000 * seconds / counted for part, seconds in parts.items()}
    student_model_ms = ms["forward"] - teacher_ms + ms["backward"] + ms["optimizer"]
    return {
        "precision": precision, "steps": steps,
        "student_step_ms": round(step_ms, 1),
        "student_model_ms": round(student_model_ms, 1),
        "step_over_model": round(step_ms / student_model_ms, 2),
        "parts_ms": {"data": round(data_ms, 1), "teacher": round(teacher_ms, 1),
                     "student_forward": round(ms["forward"] - teacher_ms, 1), "backward": round(ms["backward"], 1),
                     "optimizer": round(ms["optimizer"], 1)},
    }


def environment() -> Dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "cpu_bf16_flags": list(cpu_bf16_flags()), "bf16_is_fast": bf16_is_fast("cpu"),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="benchmarks/throughput.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: fewer pairs and steps, dual stages only")
    parser.add_argument("--out", default="benchmarks/results", help="folder of throughput.json")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--images", type=int, help="validation images (and their captions) scored in each precision")
    parser.add_argument("--steps", type=int, help="training steps timed per student stage")
    parser.add_argument("--stages", help="comma-separated of dual-baseline,dual-dcd,fusion-baseline,fusion-dcd")
    parser.add_argument("--compare-fp32", action="store_true",
                        help="also time every training stage in fp32 (training_steps_fp32 in the JSON)")
    parser.add_argument("--exhaustive", default="", metavar="SPLITS",
                        help="also score these whole splits (e.g. test, or val,test) with the trained embedded teacher "
                             "in fp32 and in bf16 (+ fp32 refine), cached beside it as make distill caches them; "
                             "about 15 minutes per split on 2 cores the first time")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from dcd.pipeline import DistillSettings, load_data, teacher_score_cache
    from dcd.recipes import resolve
    from dcd.stages import weights_sha256

    images = args.images or (30 if args.quick else 150)
    steps = args.steps or (10 if args.quick else 30)
    if steps < 10:  # the loop logs every 5 steps: a steady-state rate needs two logged steps after the first
        parser.error("--steps must be at least 10")
    stages = (args.stages or ("dual-baseline,dual-dcd" if args.quick else
                              "dual-baseline,dual-dcd,fusion-baseline,fusion-dcd")).split(",")
    settings = DistillSettings(progress=False)
    plan = precision_plan(settings.precision, settings.device)
    results: Dict[str, Any] = {"environment": environment(), "precision_plan": plan.to_dict(),
                               "command": " ".join(["python benchmarks/throughput.py", *(argv if argv is not None
                                                                                           else sys.argv[1:])])}
    print(f"{results['environment']}\n{plan.describe()}")
    matmul = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    results["matmul_gflops"] = {k: round(v, 1) for k, v in matmul.items()}
    results["matmul_gflops"]["bf16_over_fp32"] = round(matmul["bf16"] / matmul["fp32"], 2)
    print(f"matmul 2048x384 @ 384x1536: fp32 {matmul['fp32']:.0f} GFLOP/s, bf16 {matmul['bf16']:.0f} GFLOP/s")

    splits = load_data(settings)
    model, source = _embedded_teacher_model(splits["train"])
    scoring = scoring_throughput(model, splits["val"], images)
    scoring["teacher"] = source
    results["scoring"] = scoring
    results["scoring_pairs_per_s"] = {"fp32": scoring["pairs_per_s_fp32"], "bf16": scoring["pairs_per_s_bf16"],
                                      "bf16_over_fp32": scoring["bf16_over_fp32"],
                                      "bf16_refined": scoring["pairs_per_s_bf16_refined"],
                                      "bf16_refined_over_fp32": scoring["bf16_refined_over_fp32"]}
    results["ranking_top1_agreement"] = scoring["ranking_top1_agreement"]
    print(f"teacher scoring ({source}), {scoring['pairs']:,} val pairs: fp32 {scoring['pairs_per_s_fp32']:,.0f} "
          f"pairs/s, bf16 {scoring['pairs_per_s_bf16']:,.0f} ({scoring['bf16_over_fp32']}x), bf16 + fp32 refine "
          f"{scoring['pairs_per_s_bf16_refined']:,.0f} ({scoring['bf16_refined_over_fp32']}x)")
    for name in ("bf16", "bf16_refined"):
        print(f"  {name}: top-1 agreement with fp32 {scoring['top1_agreement_' + name]}, RSUM {scoring['rsum_' + name]} "
              f"against {scoring['rsum_fp32']}, max logit difference {scoring['max_logit_difference_' + name]}")

    for split_name in filter(None, args.exhaustive.split(",")):
        results.setdefault("exhaustive", {})[split_name] = exhaustive_agreement(model, source, splits, split_name)

    teacher = teachers.as_teacher(model, plan.scoring)  # the teacher's passes stay at the plan's scoring precision
    with tempfile.TemporaryDirectory() as scratch:
        recipe = resolve(settings, splits["train"]).with_teacher_weights(weights_sha256(model))
        cache = teacher_score_cache(teacher, recipe, splits["train"], Path(scratch)) \
            if any(s.endswith("-dcd") for s in stages) else None
        runs = [("training_steps", settings)]
        if args.compare_fp32 and "bf16" in (plan.dual, plan.cross):  # the same stages with fp32 training
            runs.append(("training_steps_fp32", replace(settings, precision="fp32")))
        for key, run_settings in runs:
            work = Path(scratch) / key
            for stage in stages:
                row = step_breakdown(stage, run_settings, splits, teacher, model, cache, steps, work)
                results.setdefault(key, {})[stage] = row
                print(f"{stage:16s} {row['precision']}: step {row['student_step_ms']:.0f} ms, student model "
                      f"{row['student_model_ms']:.0f} ms (x{row['step_over_model']}); parts {row['parts_ms']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from teachers.files import write_text

    write_text(out / "throughput.json", json.dumps(results, indent=1) + "\n")
    print(f"written: {out / 'throughput.json'}")
    return results


if __name__ == "__main__":  # pragma: no cover
    main()
