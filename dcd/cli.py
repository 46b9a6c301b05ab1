"""``dcd`` command line: ``dcd data``, ``dcd teacher``, ``dcd distill``, ``dcd eval``, ``dcd index``, ``dcd search``,
``dcd list``.

The Makefile variables map onto these options (``make distill TEACHER=vilt DATA=coco ...``). Under
``torchrun`` the process group is initialised from the environment (gloo on CPU, nccl on CUDA) and
each rank trains on its shard; only rank 0 writes files.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .runtime import init_distributed, shutdown_distributed

__all__ = ["main", "build_parser"]


def _distill_options(p: argparse.ArgumentParser) -> None:
    from .pipeline import DistillSettings

    d = DistillSettings()
    g = p.add_argument_group("what to distil")
    g.add_argument("--teacher", default=d.teacher, help="teacher family: meter | vilt (or a registered plugin)")
    g.add_argument("--teacher-checkpoint", help="official .ckpt, hub id or save_pretrained directory "
                   "(default: the embedded teacher, trained once on the embedded data set)")
    g.add_argument("--teacher-config", action="append", metavar="KEY=VALUE",
                   help="override a field of the teacher's preset or saved config (repeatable), e.g. num_layers=6")
    g.add_argument("--teacher-folds", type=int, default=d.teacher_folds, metavar="K",
                   help="out-of-fold targets: K teachers, each trained without one fold of the training images and "
                        "scoring that fold's lists, so no target comes from a teacher that trained on it (1: off)")
    g.add_argument("--recipe", help="JSON or YAML file of settings (the fields of --print-recipe's 'settings', "
                   "or of this --help with '_' for '-'); flags given on the command line win")
    g.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    g.add_argument("--student", help="dual student from the registry (dcd list); default dual-minilm1-vit128x2 "
                   "on the embedded set, the teacher's own towers ('dual') for METER on real data")
    g.add_argument("--student-checkpoint", help="start the dual student from this save_pretrained directory")
    g.add_argument("--data", default=d.data, help="synthetic (embedded default) | coco | flickr30k | path to a "
                   "Karpathy split or COCO caption json")
    g.add_argument("--data-root", help="folder with dataset_coco.json / dataset_flickr30k.json and the images")
    g.add_argument("--eval-split", default=d.eval_split, help="split reported in the table (never used for tuning)")
    g.add_argument("--out", help="run folder (default: runs/<teacher>-<data>)")
    g.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the undistilled baseline")
    g.add_argument("--no-fusion", dest="fusion", action="store_false",
                   help="skip the fusion student (and its re-rank row)")
    g.add_argument("--exhaustive-fusion", action="store_true",
                   help="also rank every (image, caption) pair with the fusion students, not only the dual's top-k")
    t = p.add_argument_group("training budget (defaults: embedded ~15 min on 2 CPU cores / reference on real data)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--max-steps", type=int, help="stop each student after this many optimiser steps")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    t.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "bf16", "fp16"),
                   help="what each stage computes in (auto: bf16 autocast for teacher scoring and for training on "
                   "CUDA and on CPUs with AMX / AVX512-BF16, fp32 elsewhere); printed and recorded in the run's recipe")
    t.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader processes")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--group-size", type=int, help="students' batches made of neighbour groups of this many images "
                   "whose captions share words, so in-batch negatives are hard (1: shuffled batches)")
    m = p.add_argument_group("DCD method")
    m.add_argument("--num-negatives", type=int, help="K candidates the teacher scores per sample "
                   "(embedded 7; reference 15 COCO, 63 Flickr30K)")
    m.add_argument("--num-hard", type=int, help="k hardest kept for the student (embedded 3; reference 7)")
    m.add_argument("--negatives", default=d.negatives, choices=("random", "nearest"),
                   help="image->text candidate source: random corpus captions or the student's nearest")
    m.add_argument("--directions", help="i2t,t2i | i2t | t2i (default: both)")
    m.add_argument("--distill-loss", default=d.distill_loss, choices=("kl", "mse"))
    m.add_argument("--self-loss", default=d.self_loss, choices=("ce", "bce"))
    m.add_argument("--self-candidates", default=d.self_candidates, choices=("teacher", "random"),
                   help="candidates of the self-learning loss: the teacher's selection (DCD) or fresh random ones "
                        "(the baseline's)")
    m.add_argument("--drop-false-negatives", action=argparse.BooleanOptionalAction, default=None,
                   help="leave candidates the teacher scores above the positive out of the self-learning loss "
                        "(default: on for the embedded set, off -- the paper -- on real data)")
    m.add_argument("--alpha", type=float, help="distillation share of the loss (embedded 0.5, reference 0.2)")
    m.add_argument("--temperature", type=float, default=d.temperature, help="KL distillation temperature")
    m.add_argument("--teacher-temperature", type=float,
                   help="divides the teacher's logits only: how soft the KL target is (default 1)")
    m.add_argument("--entropy-temperature", type=float,
                   help="T of the teacher distribution whose entropy sets the dynamic weights (embedded 4, reference 1)")
    m.add_argument("--alpha-schedule", default=d.alpha_schedule, choices=("constant", "linear", "cosine", "gap"),
                   help="gap: each step's alpha from the student's distance to the teacher against its own loss")
    m.add_argument("--alpha-end", type=float, help="final alpha of a linear / cosine schedule")
    m.add_argument("--no-dynamic", dest="dynamic", action="store_false", help="uniform instead of entropy weights")
    m.add_argument("--weighting", default=d.weighting, choices=("entropy", "gap"),
                   help="per-sample weights from the teacher's entropy (the paper) or the student's per-sample losses")
    m.add_argument("--no-score-cache", dest="score_cache", action="store_false",
                   help="score candidates with the teacher online instead of the precomputed cache")
    m.add_argument("--rerank-k", type=int, default=d.rerank_k, help="dual-student candidates re-ranked per query (0: chosen on the validation split)")


def _ablation_methods() -> List[str]:
    from .ablations import METHODS

    return list(METHODS)


def _extra_methods() -> List[str]:
    from .ablations import EXTRA_METHODS

    return list(EXTRA_METHODS)


def _csv(text: str) -> List[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcd", description="Dynamic Contrastive Distillation for image-text retrieval",
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", allow_abbrev=False, help="build the embedded data set (once) and print its splits")
    p.add_argument("--root", help="where to write it (default: $DCD_HOME/data/synthetic-v2)")

    p = sub.add_parser("teacher", allow_abbrev=False, help="train (once) and evaluate the embedded teacher")
    p.add_argument("--teacher", default="meter", help="meter | vilt")
    p.add_argument("--data", default="synthetic",
                   help="synthetic (the embedded set), or your own Karpathy / COCO caption json: the embedded recipe "
                        "trains the teacher on its train split (a val split is held out of train when it has none)")
    p.add_argument("--data-root", help="where the images of --data are (default: beside the json)")
    p.add_argument("--teacher-checkpoint", help="fine-tune this checkpoint (official .ckpt, hub id or a saved teacher) "
                                                "on --data instead of training the embedded model; then distil with "
                                                "--teacher-checkpoint <the printed path>")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher-config", action="append", metavar="KEY=VALUE",
                   help="override the embedded teacher's training (epochs, max_steps, lr, group_size) or model config "
                        "(repeatable); such a teacher is trained into a folder of its own")
    p.add_argument("--teacher-folds", type=int, default=1, metavar="K",
                   help="train K teachers, each without one fold of the training images (out-of-fold targets for "
                        "dcd distill --teacher-folds K); evaluated as their mean")
    p.add_argument("--compare-dual", action="store_true",
                   help="also train the undistilled dual student for the teacher's training time and report both")
    p.add_argument("--out", help="run folder of --compare-dual (default: runs/<teacher>-synthetic)")

    p = sub.add_parser("distill", allow_abbrev=False, help="data -> teacher -> baseline / DCD students -> recall and speed table",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _distill_options(p)

    p = sub.add_parser("ablations", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="the compression experiment: baseline, vanilla KD and DCD ablations over seeds -> "
                            "benchmarks/results/compression.json, .md, .png")
    _distill_options(p)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one trained student per seed and row")
    p.add_argument("--methods", default="all", help="comma-separated rows (all: the paper's, " + ", ".join(
        _ablation_methods()) + "; extra rows: " + ", ".join(_extra_methods()) + ")")
    p.add_argument("--students", default="dual", help="student kinds: dual | fusion | dual,fusion")
    p.add_argument("--fusion-epochs", type=int,
                   help="the fusion rows' epochs (default: --epochs); they re-rank the dual baseline of --epochs")
    p.add_argument("--results", default="benchmarks/results/compression.json", help="where the records are written")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: gather the finished records into the results files")

    p = sub.add_parser("eval", allow_abbrev=False, help="Recall@K of a saved student, a teacher checkpoint or the embedded teacher")
    p.add_argument("model", help="student directory (save_pretrained), or teacher:<family>[:<checkpoint>]")
    p.add_argument("--data", default="synthetic")
    p.add_argument("--data-root")
    p.add_argument("--split", default="test")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rerank", help="second-stage model (same syntax) re-ranking the top --k of the first")
    p.add_argument("--k", type=int, default=16)

    from .index.commands import add_index_parser, add_search_parser, add_serve_parser

    add_index_parser(sub)
    add_search_parser(sub)
    add_serve_parser(sub)
    sub.add_parser("list", allow_abbrev=False, help="what is registered: teachers, students, student families, data sets")
    p = sub.add_parser("runs", allow_abbrev=False,
                       help="the stage folders under a run folder (students, score caches, records) and how they did; "
                            "`dcd runs prune --keep-latest DIR` deletes the ones the last run did not use")
    p.add_argument("target", nargs="*", metavar="[prune] DIR", help="run folder (default: runs)")
    p.add_argument("--json", action="store_true", help="the rows as JSON, for scripts")
    p.add_argument("--keep-latest", action="store_true", help="with prune: keep what latest.json names (required)")
    p.add_argument("--dry-run", action="store_true", help="with prune: say what would go, delete nothing")
    return parser


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available on this machine; use --device cpu")


def _load_model(spec: str, data: str, data_root: Optional[str], device: str):
    import students
    import teachers

    if not spec.startswith("teacher:"):
        return students.load_student(spec).to(device)
    family, _, checkpoint = spec[len("teacher:"):].partition(":")
    if checkpoint:
        return teachers.create_teacher(family, checkpoint=checkpoint).to(device)
    from .data import load_split
    from .teacher_training import embedded_teacher

    model, _ = embedded_teacher(family, load_split(data, data_root, split="train"), device=device)
    return teachers.as_teacher(model)


def _teacher_vs_dual(family: str, teacher: dict, dual: dict, split: str) -> str:
    """Two lines a person can read: the teacher against the dual student trained for the same time."""
    rows = [(f"{family} teacher", teacher[split], teacher["train_seconds"]),
            (f"dual, {dual['steps']} steps", dual[split], dual["train_seconds"])]
    lines = [f"{'on ' + split:<24} {'i2t R@1':>8} {'t2i R@1':>8} {'RSUM':>7} {'binding':>8} {'train (s)':>10}"]
    for name, m, seconds in rows:
        binding = f"{m['binding']:>8.1f}" if "binding" in m else f"{'':>8}"
        lines.append(f"{name:<24} {m['i2t_r1']:>8.1f} {m['t2i_r1']:>8.1f} {m['rsum']:>7.1f} {binding} {seconds:>10.0f}")
    return "\n".join(lines)


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    """The command line; with ``--recipe FILE`` the file's settings become the defaults and flags given win."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "runs":  # `dcd runs prune --keep-latest DIR`: the folder may follow the options
        args.target += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "recipe", None):
        from .recipes import DistillSettings, read_recipe_file, settings_fields

        try:
            chosen = read_recipe_file(args.recipe, settings_fields(DistillSettings))
        except ValueError as err:
            raise SystemExit(f"dcd: error: {err}") from None
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        subparsers.choices[args.command].set_defaults(**chosen)
        args = parser.parse_args(argv)
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Parse and run; bad input ends with one line ``dcd: error: ...`` (``-v``: the full traceback)."""
    args = _parse(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args)
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise SystemExit(f"dcd: error: {' '.join(str(message).split())}") from None


def _runs(args: argparse.Namespace) -> int:
    from .runs import format_table, list_stages, prune

    target = list(args.target)
    pruning = bool(target) and target[0] == "prune"
    if pruning:
        target = target[1:]
    if len(target) > 1:
        raise SystemExit(f"dcd: error: dcd runs takes one run folder, got {' '.join(target)}")
    root = Path(target[0] if target else "runs")
    if not root.is_dir():
        raise SystemExit(f"dcd: error: no run folder {root}")
    if pruning:
        if not args.keep_latest:
            raise SystemExit("dcd: error: dcd runs prune deletes stage folders; say which to keep: --keep-latest")
        gone = prune(root, dry_run=args.dry_run)
        verb = "would delete" if args.dry_run else "deleted"
        for path in gone:
            print(f"{verb} {path}")
        print(f"{verb} {len(gone)} stage folder(s) under {root}")
        return 0
    rows = list_stages(root)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(format_table(rows))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "data":
        from .data import build_synthetic, load_split

        path = build_synthetic(args.root)
        for split in ("train", "val", "test"):
            print(load_split(str(path), split=split).summary())
        print(f"written: {path}")
        return 0
    if args.command == "list":
        from .catalog import format_catalog

        print(format_catalog())
        return 0

    if args.command == "runs":
        return _runs(args)

    _check_device(args.device)
    if args.command in ("index", "search", "serve"):
        from .index.commands import run

        return run(args)

    if args.command == "teacher":
        from pathlib import Path

        from teachers import as_teacher

        from .pipeline import load_data, load_teacher
        from .recipes import DistillSettings, parse_overrides, resolve
        from .score_matrices import cached_score_matrix

        settings = DistillSettings(teacher=args.teacher, data=args.data, data_root=args.data_root, device=args.device,
                                   teacher_config=parse_overrides(args.teacher_config), out=args.out,
                                   teacher_checkpoint=args.teacher_checkpoint, teacher_folds=args.teacher_folds,
                                   finetune_teacher=args.teacher_checkpoint is not None)
        splits = load_data(settings)  # a user's own file: unreadable images skipped and listed, val carved if absent
        recipe = resolve(settings, splits["train"])
        if recipe.teacher["training"] is None:
            raise SystemExit(f"dcd: error: dcd teacher trains on the embedded set or on your own data file, not on "
                             f"--data {args.data}: bring its fine-tuned checkpoint (--teacher-checkpoint) to distill")
        test = splits["eval"]
        model, info = load_teacher(recipe, splits)
        # the exhaustive val and test scores, cached beside the teacher: students and ablations reuse them
        for split in (splits["val"], test):
            _, scored = cached_score_matrix(as_teacher(model), split, Path(info["path"]).parent / "scores", args.device)
            info[split.name] = {**scored["metrics"], "elapsed_s": scored["elapsed_s"]}
        print(json.dumps(info, indent=1))
        if args.compare_dual:
            from .pipeline import equal_time_dual

            dual = equal_time_dual(info["train_seconds"], splits, settings.run_dir(), device=args.device)
            print(json.dumps({"equal_time_dual": dual}, indent=1))
            print(_teacher_vs_dual(args.teacher, info, dual, test.name))
        return 0

    if args.command == "eval":
        from .data import load_split
        from .retrieval import evaluate, evaluate_rerank

        split = load_split(args.data, args.data_root, split=args.split)
        model = _load_model(args.model, args.data, args.data_root, args.device)
        if args.rerank:
            second = _load_model(args.rerank, args.data, args.data_root, args.device)
            metrics = evaluate_rerank(model, second, split, k=args.k, device=args.device)
        else:
            metrics = evaluate(model, split, device=args.device)
        print(json.dumps(metrics, indent=1))
        return 0

    from .pipeline import DistillSettings, run_distill

    sweep = {k: vars(args).pop(k) for k in ("seeds", "methods", "students", "results", "report_only", "fusion_epochs")
             if k in vars(args)}
    show_recipe = vars(args).pop("print_recipe")
    vars(args).pop("recipe")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
    if isinstance(options["directions"], str):
        options["directions"] = tuple(_csv(options["directions"])) or None
    if not isinstance(options["teacher_config"], dict):
        from .recipes import parse_overrides

        options["teacher_config"] = parse_overrides(options["teacher_config"])
    if show_recipe:
        from .recipes import print_recipe

        print_recipe(DistillSettings(**options))
        return 0
    options["device"] = init_distributed(options["device"])
    if args.command == "ablations":
        from pathlib import Path

        from .ablations import markdown_table, run_ablations

        every = _ablation_methods() + (_extra_methods() if sweep["report_only"] else [])  # a report shows every row
        methods = every if sweep["methods"] == "all" else _csv(sweep["methods"])
        try:
            seeds = [int(x) for x in _csv(sweep["seeds"])]
        except ValueError:
            raise SystemExit(f"dcd: error: --seeds takes comma-separated integers, got {sweep['seeds']!r}")
        settings = DistillSettings(**options)
        out = Path(settings.out) if settings.out else Path("runs") / f"ablations-{settings.teacher}"
        records = run_ablations(replace(settings, out=None), seeds=seeds, methods=methods,
                                kinds=_csv(sweep["students"]), out=out, results_json=Path(sweep["results"]),
                                train_missing=not sweep["report_only"], fusion_epochs=sweep["fusion_epochs"])
        print(markdown_table(records))
        print(f"written: {sweep['results']} (and .md, .png)")
        shutdown_distributed()
        return 0
    run_distill(DistillSettings(**options))
    shutdown_distributed()  # on success only: after an error, torchrun stops the other ranks
    return 0


if __name__ == "__main__":
    sys.exit(main())
