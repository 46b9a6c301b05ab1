"""Retrieve-then-rerank depth: recall of "dual top-k -> teacher" against k, the teacher's exhaustive ranking as the bar.

k is chosen on the validation split (the smallest k at the plateau of mean R@1, re-scoring with the live
teacher); on the test split the curve comes from the teacher's cached exhaustive scores
(``dcd.score_matrices``) and the chosen k is re-run live for its time. Writes a JSON beside the figures.

    python benchmarks/rerank_depth.py --student runs/ablations-meter/dual/dcd/seed1/student
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import students
from dcd import pipeline, retrieval
from dcd.recipes import DistillSettings, resolve
from dcd.score_matrices import cached_score_matrix, rerank_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True, help="a saved dual student (save_pretrained folder)")
    parser.add_argument("--teacher", default="meter")
    parser.add_argument("--ks", default="1,2,4,8,16,32")
    parser.add_argument("--out", default="benchmarks/results/rerank_meter.json")
    args = parser.parse_args()
    ks = tuple(int(k) for k in args.ks.split(","))
    settings = DistillSettings(teacher=args.teacher, progress=False)
    splits = pipeline.load_data(settings)
    recipe, model, info, teacher = pipeline.setup_teacher(resolve(settings, splits["train"]), splits)
    student = students.load_student(args.student)
    k, val_curve = pipeline.choose_rerank_k(student, teacher, splits["val"], recipe, ks)
    test = splits["eval"]
    teacher_scores, teacher_info = cached_score_matrix(teacher, test, Path(info["path"]).parent / "scores")
    started = time.perf_counter()
    first = retrieval.score_matrix(student, retrieval.eval_images(student, test, 64, 0), test.captions, progress=False)
    first_seconds = time.perf_counter() - started
    test_curve = rerank_curve(first, lambda i, t: teacher_scores[i, t], test, ks)
    live = retrieval.evaluate_rerank(student, teacher, test, k=k, progress=False)
    keep = ("i2t_r1", "t2i_r1", "rsum")
    out = {
        "student": args.student, "chosen_k_on_val": k, "first_stage_seconds": first_seconds,
        "teacher_exhaustive": {**{m: teacher_info["metrics"][m] for m in keep}, "elapsed_s": teacher_info["elapsed_s"]},
        "val_curve": {k_: {m: v[m] for m in keep} for k_, v in val_curve.items()},
        "test_curve": {k_: {m: v[m] for m in keep} for k_, v in test_curve.items()},
        "test_live_rerank": {m: live[m] for m in (*keep, "elapsed_s")},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
