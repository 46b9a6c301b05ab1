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

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # benchmarks/ is not a package; its helper module sits next to this file
    sys.path.insert(0, str(_HERE))
try:  # the installed package (pip install -e .); fall back to the source tree when run from a checkout
    import teachers  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(_HERE.parent))

from _timing import PeakMemory, Timing, autocast, extrapolate, synchronizer, time_call  # noqa: E402

# --------------------------------------------------------------------------------------------- constants


@dataclass(frozen=True)
class Workload:
    name: str
    n_images: int
    n_texts: int


WORKLOADS: Dict[str, Workload] = {
    "flickr30k": Workload("Flickr30K 1K test", 1_000, 5_000),
    "coco": Workload("MS-COCO 5K test", 5_000, 25_000),
}

#: strategy id -> table label
STRATEGIES: Dict[str, str] = {
    "1_teacher_naive": "1  teacher exhaustive, naive",
    "2_teacher_cached": "2  teacher exhaustive, cached",
    "3_fusion_exhaustive": "3  fusion student exhaustive",
    "4_dual": "4  dual student + top-k",
    "5a_rerank_fusion": "5a dual top-k -> fusion student",
    "5b_rerank_teacher": "5b dual top-k -> teacher",
}
BASELINE = "1_teacher_naive"

#: what each strategy is made of: (measured stage, what it is counted per)
#:   "images" / "texts": once per gallery item; "pairs": every (image, caption) pair;
#:   "candidates": k pairs per query, both directions.
_DUAL = [("dual_image", "images"), ("dual_text", "texts"), ("similarity", "pairs")]
RECIPES: Dict[str, List[Tuple[str, str]]] = {
    "1_teacher_naive": [("naive_pair", "pairs")],
    "2_teacher_cached": [("teacher_image", "images"), ("teacher_text", "texts"), ("teacher_pair", "pairs")],
    "3_fusion_exhaustive": [("fusion_image", "images"), ("fusion_text", "texts"), ("fusion_pair", "pairs")],
    "4_dual": _DUAL,
    "5a_rerank_fusion": _DUAL + [("fusion_image", "images"), ("fusion_text", "texts"),
                                 ("fusion_rerank_pair", "candidates")],
    "5b_rerank_teacher": _DUAL + [("teacher_image", "images"), ("teacher_text", "texts"),
                                  ("teacher_rerank_pair", "candidates")],
}
EXHAUSTIVE = ("1_teacher_naive", "2_teacher_cached", "3_fusion_exhaustive")

#: ViLT takes images of any size (shorter side 384, longer <= 640, multiples of 32): 384 x 576 = 12 x 18 patches
VILT_IMAGE_HW = (384, 576)
CAPTION_TOKENS = (16, 20)  # synthetic caption length range, special tokens included


class BenchError(Exception):
    """A user-facing error: ``main`` exits with its message (status 1) and no traceback."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: torch.device
    precision: str
    batch_size: int
    repeats: int
    warmup: int
    k: int
    quick: bool
    full: bool
    sim_chunk: int

    @property
    def full_dual(self) -> bool:
        """The dual student's encodings run in full on CUDA and with --full; sampled on CPU otherwise."""
        return self.full or self.device.type == "cuda"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/latency.py",
        description="Retrieval latency of cross-encoder teachers and distilled students at COCO 5K / Flickr30K 1K sizes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--teacher", choices=("meter", "vilt", "all"), default="all")
    p.add_argument("--dataset", choices=("coco", "flickr30k", "all"), default="all")
    p.add_argument("--teacher-checkpoint", default=None, help="teacher weights (needs --teacher meter or vilt)")
    p.add_argument(
        "--student-checkpoint", action="append", default=[], metavar="DIR",
        help="a saved student (dir with config.json, family 'dual' or 'fusion'), or a run directory holding "
             "several; repeatable. Without one, students are built at their real sizes with random weights",
    )
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="autocast precision; default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--k", type=int, default=16, help="re-ranking depth: candidates per query from the dual student")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items or pairs per call, the same for every model (default: 64 CUDA, 8 CPU, 4 --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed repetitions per stage (default: 10 CUDA, 3 CPU, 2 --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default: 3 CUDA, 1 CPU)")
    p.add_argument("--quick", action="store_true", help="tiny model presets and small samples (CI smoke run, ~1 min on CPU)")
    p.add_argument("--full", action="store_true",
                   help="run every linear stage in full (encodings, re-ranking); only strategies 1-3 stay extrapolated")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own, all cores; --quick: 1, steadier on a shared machine)")
    p.add_argument("--out", default="runs/latency", help="directory for latency.json and latency_vs_corpus.png")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was requested but CUDA is not available on this machine; use --device cpu")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or ("fp16" if cuda else "fp32")
    batch = args.batch_size or (64 if cuda else 4 if args.quick else 8)
    repeats = args.repeats or (10 if cuda else 2 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    for name, value, low in (("--k", args.k, 1), ("--batch-size", batch, 1), ("--repeats", repeats, 1), ("--warmup", warmup, 0)):
        if value < low:
            raise BenchError(f"{name} must be >= {low}, got {value}")
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if args.teacher_checkpoint and args.teacher == "all":
        raise BenchError("--teacher-checkpoint needs one teacher family: add --teacher meter or --teacher vilt")
    return Settings(
        device=device, precision=precision, batch_size=batch, repeats=repeats, warmup=warmup, k=args.k,
        quick=args.quick, full=args.full, sim_chunk=2048 if cuda else 512,
    )


# --------------------------------------------------------------------------------------------- models
@dataclass
class Models:
    """One teacher and its students, with a line describing each (size, origin of the weights)."""

    family: str
    teacher: nn.Module
    fusion: nn.Module
    dual: nn.Module
    notes: Dict[str, str] = field(default_factory=dict)


#: the dual student paired with a teacher that has no unimodal towers to copy (ViLT), at base size:
#: ViT-B/32 at 384 px (ViLT's own patch embedding size) + a BERT-base text encoder, random weights
DUAL_BASE_CONFIG = dict(
    timm_model="vit_base_patch32_384", timm_kwargs={"img_size": 384}, image_size=384,
    text_model=None, text_config={"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12,
                                  "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 30522},
    text_pooling="cls", embed_dim=256,
)


def build_models(family: str, settings: Settings, teacher_checkpoint: Optional[str],
                 student_checkpoints: Dict[str, Path]) -> Models:
    """The teacher (base preset, --quick: tiny preset, or --teacher-checkpoint), its fusion student and a dual student."""
    import teachers
    import students
    from students import DualEncoder, DualEncoderConfig, FusionStudent

    size = "tiny" if settings.quick else "base"
    notes: Dict[str, str] = {}
    if teacher_checkpoint:
        teacher = load_teacher(family, teacher_checkpoint)
        notes["teacher"] = f"{family} from {teacher_checkpoint}"
    else:
        module = importlib.import_module(f"teachers.{family}")
        teacher = getattr(module, f"{family}_{size}")()
        notes["teacher"] = f"{family}_{size}() preset, random weights"
    teacher = getattr(teacher, "model", teacher)  # the raw architecture (a Teacher wrapper hides score_pairs_naive)

    if "fusion" in student_checkpoints:
        fusion = load_student_checked(student_checkpoints["fusion"], "fusion", family)
        notes["fusion"] = f"fusion student from {student_checkpoints['fusion']} (layers {list(fusion.layers)})"
    else:
        fusion = FusionStudent.from_teacher(teacher)
        notes["fusion"] = f"FusionStudent.from_teacher(teacher), layers {list(fusion.layers)} of the teacher's"

    if "dual" in student_checkpoints:
        dual = load_student_checked(student_checkpoints["dual"], "dual", family)
        notes["dual"] = f"dual student from {student_checkpoints['dual']}"
    elif settings.quick and family != "meter":
        dual = students.dual_test(pretrained=False)
        notes["dual"] = "dual_test() preset, random weights"
    else:
        try:
            dual = DualEncoder.from_teacher(teacher)
            notes["dual"] = "DualEncoder.from_teacher(teacher): the teacher's unimodal towers + projections"
        except NotImplementedError:  # ViLT: single stream, no towers to copy
            if settings.quick:
                dual = students.dual_test(pretrained=False)
                notes["dual"] = "dual_test() preset, random weights"
            else:
                dual = DualEncoder(DualEncoderConfig(**DUAL_BASE_CONFIG), pretrained=False)
                notes["dual"] = "ViT-B/32 @384 + BERT-base text tower (12 layers, 768 wide), embed 256, random weights"

    models = Models(family, *(m.to(settings.device).eval() for m in (teacher, fusion, dual)), notes=notes)
    for role in ("teacher", "fusion", "dual"):
        notes[role] += f"; {param_count(getattr(models, role)) / 1e6:.1f} M parameters"
    return models


def load_teacher(family: str, checkpoint: str) -> nn.Module:
    """``create_teacher(family, checkpoint)``, with an error naming the file when it is another family's."""
    import teachers

    found = sniff_teacher_family(checkpoint)
    if found is not None and found != family:
        raise BenchError(f"--teacher-checkpoint {checkpoint} looks like a {found} checkpoint, not a {family} one "
                         f"(use --teacher {found})")
    try:
        return teachers.create_teacher(family, checkpoint=checkpoint)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BenchError(f"could not load --teacher-checkpoint {checkpoint} as a {family} teacher: {err}") from None


def sniff_teacher_family(checkpoint: str) -> Optional[str]:
    """'meter' / 'vilt' from a checkpoint's config.json or parameter names; None when it cannot tell."""
    path = Path(checkpoint)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            return None
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        tag = str(config.get("family") or config.get("model_type") or "").lower()
        return tag if tag in ("meter", "vilt") else None
    if not path.is_file():
        return None  # a hub id: the loader decides
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                keys = list(handle.keys())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            keys = list(state) if isinstance(state, dict) else []
    except Exception:  # not readable here: leave it to the teacher's own loader
        return None
    text = " ".join(keys[:2000])
    if "vit_model." in text or "cross_modal_text_layers" in text:
        return "meter"
    if "transformer.blocks." in text or "vilt.embeddings" in text or "vilt.encoder" in text:
        return "vilt"
    return None


def load_student_checked(directory: Path, family: str, teacher_family: str) -> nn.Module:
    import students

    try:
        model = students.load_student(directory)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise BenchError(f"could not load --student-checkpoint {directory}: {err}") from None
    if getattr(model, "family", None) != family:
        raise BenchError(f"--student-checkpoint {directory} holds a {getattr(model, 'family', '?')!r} student, not a {family!r} one")
    if family == "fusion" and model.teacher_family != teacher_family:
        raise BenchError(f"--student-checkpoint {directory} is a fusion student of {model.teacher_family!r}, "
                         f"not of the {teacher_family!r} teacher")
    return model


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------- inputs
def _word_embedding(model: nn.Module) -> nn.Embedding:
    """The text model's token embedding: the one named *word_embeddings, else the largest Embedding."""
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        raise BenchError(f"{type(model).__name__} has no token embedding: cannot make synthetic captions for it")
    named = [m for n, m in embeddings if n.endswith("word_embeddings")]
    return named[0] if named else max((m for _, m in embeddings), key=lambda m: m.num_embeddings)


def synthetic_texts(model: nn.Module, n: int, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    """``n`` captions of random token ids, lengths drawn from CAPTION_TOKENS, padded to the longest."""
    emb = _word_embedding(model)
    vocab = emb.num_embeddings
    pad = emb.padding_idx if emb.padding_idx is not None else 0
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(CAPTION_TOKENS[0], CAPTION_TOKENS[1] + 1, (n,), generator=g)
    width = int(lengths.max())
    ids = torch.randint(min(5, vocab - 1), vocab, (n, width), generator=g)
    ids[ids == pad] = (pad + 1) % vocab
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def synthetic_images(hw: Tuple[int, int], n: int, device: torch.device, seed: int = 0) -> Dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, *hw, generator=g)
    return {"pixel_values": pixels.to(device), "pixel_mask": torch.ones(n, *hw, dtype=torch.long, device=device)}


def image_hw(model: nn.Module, family: str) -> Tuple[int, int]:
    """Input resolution of the synthetic images: the model's configured square size; ViLT 384 x 576."""
    if family == "vilt":
        return VILT_IMAGE_HW
    model = getattr(model, "model", model)  # FusionStudent / Teacher wrappers
    for owner in (getattr(model, "config", None), model):
        size = owner.get("image_size") if isinstance(owner, dict) else getattr(owner, "image_size", None)
        if size:
            return (int(size), int(size)) if isinstance(size, int) else tuple(int(x) for x in size)
    raise BenchError(f"cannot tell the input resolution of a {type(model).__name__} (no image_size)")


# --------------------------------------------------------------------------------------------- stages
@dataclass
class Cost:
    """One stage's measured cost per unit (an image, a caption, a pair) and how it was measured."""

    per_unit: Timing  # seconds per unit
    unit: str  # "image", "caption", "pair"
    sample: int  # units per timed call
    repeats: int
    peak_mb: float
    memory_kind: str
    increase_mb: float = 0.0  # the peak above the memory in use when the stage started

    def describe(self) -> str:
        return f"sample of {self.sample} {self.unit}s x {self.repeats} rep{'s' * (self.repeats != 1)}"

    def to_json(self) -> Dict:
        return {
            "seconds_per_unit": self.per_unit.summary(), "unit": self.unit, "sample": self.sample,
            "repeats": self.repeats, "peak_memory_mb": round(self.peak_mb, 1),
            "peak_increase_mb": round(self.increase_mb, 1), "memory_kind": self.memory_kind,
        }


@dataclass
class Measured:
    """A stage run in full for one workload (its whole count), replacing the extrapolation."""

    timing: Timing
    peak_mb: float
    memory_kind: str
    increase_mb: float = 0.0
    note: str = "full"


class Bench:
    """Times calls under inference mode and the chosen autocast, with warm-up, sync and peak memory."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.sync = synchronizer(settings.device)

    def time(self, fn: Callable[[], object], warmup: Optional[int] = None) -> Tuple[Timing, PeakMemory]:
        def call():
            with torch.inference_mode(), autocast(self.s.device, self.s.precision):
                return fn()

        try:
            with PeakMemory(self.s.device) as mem:
                timing = time_call(call, self.s.repeats, self.s.warmup if warmup is None else warmup, self.sync)
        except torch.cuda.OutOfMemoryError as err:
            raise BenchError(
                f"out of GPU memory at --batch-size {self.s.batch_size} ({err}); try a smaller --batch-size"
            ) from None
        return timing, mem

    def per_unit(self, fn: Callable[[], object], sample: int, unit: str) -> Cost:
        timing, mem = self.time(fn)
        return Cost(timing.scaled(1.0 / sample), unit, sample, timing.repeats, mem.peak_mb, mem.kind, mem.increase_mb)


def pair_block(n_pool: int, batch: int) -> Tuple[int, int]:
    """An (images x captions) block of ``batch`` pairs for timing ``score_features`` (captions first)."""
    n_txt = min(batch, n_pool)
    return max(1, batch // n_txt), n_txt


def measure_costs(models: Models, bench: Bench) -> Dict[str, Cost]:
    """Per-unit costs of every stage of every strategy, for one teacher and its students."""
    s = bench.s
    b = s.batch_size
    costs: Dict[str, Cost] = {}

    teacher_hw = image_hw(models.teacher, models.family)
    images = synthetic_images(teacher_hw, b, s.device, seed=1)
    texts = synthetic_texts(models.teacher, b, s.device, seed=2)

    log(f"  [{models.family}] teacher, naive: {b} pairs per call")
    costs["naive_pair"] = bench.per_unit(lambda: models.teacher.score_pairs_naive(images, texts), b, "pair")

    for role, scorer in (("teacher", models.teacher), ("fusion", models.fusion)):
        hw = image_hw(scorer, models.family)
        imgs = images if hw == teacher_hw else synthetic_images(hw, b, s.device, seed=1)
        txts = synthetic_texts(scorer, b, s.device, seed=2)
        log(f"  [{models.family}] {role}: encode {b} images, {b} captions; fuse {b} pairs")
        costs[f"{role}_image"] = bench.per_unit(lambda: scorer.encode_images(imgs), b, "image")
        costs[f"{role}_text"] = bench.per_unit(lambda: scorer.encode_texts(txts), b, "caption")
        with torch.inference_mode(), autocast(s.device, s.precision):
            img_feats, txt_feats = scorer.encode_images(imgs), scorer.encode_texts(txts)
        # exhaustive: score_features on a block of 1 image x b captions (a model may share per-item work
        # across a block, as METER does for its first co-attention layer; that share is charged to the pairs)
        n_img, n_txt = pair_block(b, b)
        img_block = {k: v[:n_img] for k, v in img_feats.items()}
        costs[f"{role}_pair"] = bench.per_unit(lambda: scorer.score_features(img_block, txt_feats), n_img * n_txt, "pair")
        # re-ranking: b gathered (query, candidate) pairs through score_feature_pairs, as rerank() runs them
        candidates = torch.randint(0, b, (1, b), generator=torch.Generator().manual_seed(3)).to(s.device)
        costs[f"{role}_rerank_pair"] = bench.per_unit(
            lambda: rerank(scorer, img_feats, txt_feats, candidates, b, query_is_image=True), b, "pair")

    hw = image_hw(models.dual, "dual")
    imgs, txts = synthetic_images(hw, b, s.device, seed=1), synthetic_texts(models.dual, b, s.device, seed=2)
    log(f"  [{models.family}] dual student: encode {b} images, {b} captions")
    costs["dual_image"] = bench.per_unit(lambda: models.dual.encode_images(imgs), b, "image")
    costs["dual_text"] = bench.per_unit(lambda: models.dual.encode_texts(txts), b, "caption")
    return costs


# --------------------------------------------------------------------------------------------- full runs
def similarity_topk(image_emb: Tensor, text_emb: Tensor, k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """Top-k both ways from the full similarity matrix, computed ``chunk`` image rows at a time.

    Returns (i2t [n_images, k] caption indices, t2i [n_texts, k] image indices), best first. One pass:
    each row block gives its images' top-k captions and is merged into a running top-k per caption.
    """
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)
    i2t: List[Tensor] = []
    best = image_emb.new_full((0, n_txt), -math.inf)
    best_idx = torch.zeros(0, n_txt, dtype=torch.long, device=image_emb.device)
    for start in range(0, n_img, chunk):
        sim = image_emb[start:start + chunk] @ text_emb.T  # [c, n_txt]
        i2t.append(sim.topk(k_i2t, dim=1).indices)
        top = sim.topk(min(k_t2i, sim.shape[0]), dim=0)
        merged, merged_idx = torch.cat([best, top.values]), torch.cat([best_idx, top.indices + start])
        keep = merged.topk(min(k_t2i, merged.shape[0]), dim=0)
        best, best_idx = keep.values, merged_idx.gather(0, keep.indices)
    return torch.cat(i2t), best_idx.T.contiguous()


def _embedding_dim(dual: nn.Module, bench: Bench) -> Tuple[int, torch.dtype]:
    s = bench.s
    txts = synthetic_texts(dual, 2, s.device)
    with torch.inference_mode(), autocast(s.device, s.precision):
        emb = dual.encode_texts(txts)["embedding"]
    return emb.shape[-1], emb.dtype


def measure_similarity(dual: nn.Module, workload: Workload, bench: Bench) -> Tuple[Measured, Tensor, Tensor]:
    """The dual student's full similarity matrix + top-k both ways, at the workload's real size."""
    s = bench.s
    dim, dtype = _embedding_dim(dual, bench)
    g = torch.Generator().manual_seed(0)
    img = nn.functional.normalize(torch.randn(workload.n_images, dim, generator=g), dim=-1).to(s.device, dtype)
    txt = nn.functional.normalize(torch.randn(workload.n_texts, dim, generator=g), dim=-1).to(s.device, dtype)
    result: List[Tuple[Tensor, Tensor]] = []
    timing, mem = bench.time(lambda: result.append(similarity_topk(img, txt, s.k, s.sim_chunk)))
    return Measured(timing, mem.peak_mb, mem.kind, mem.increase_mb), *result[-1]


def encode_all(scorer: nn.Module, inputs: Dict[str, Tensor], count: int, batch: int, method: str) -> None:
    """Run ``scorer.<method>`` over ``count`` items in batches (the synthetic batch ``inputs`` re-used)."""
    fn = getattr(scorer, method)
    for start in range(0, count, batch):
        n = min(batch, count - start)
        fn({k: v[:n] for k, v in inputs.items()})


def rerank(scorer: nn.Module, query_feats: Dict[str, Tensor], gallery_feats: Dict[str, Tensor],
           candidates: Tensor, batch: int, query_is_image: bool) -> None:
    """Score every query with its k candidates (features cached per item), ``batch`` pairs per call.

    ``candidates`` [n_queries, k] index the gallery; indices are taken modulo the cached feature pools
    (synthetic items: the values do not change the latency, and the gather and fusion are the real ones).
    """
    n_q, k = candidates.shape
    query_idx = torch.arange(n_q, device=candidates.device).repeat_interleave(k)
    gallery_idx = candidates.reshape(-1)
    n_query_pool = next(iter(query_feats.values())).shape[0]
    n_gallery_pool = next(iter(gallery_feats.values())).shape[0]
    for start in range(0, len(query_idx), batch):
        qi = query_idx[start:start + batch] % n_query_pool
        gi = gallery_idx[start:start + batch] % n_gallery_pool
        q = {name: v[qi] for name, v in query_feats.items()}
        g = {name: v[gi] for name, v in gallery_feats.items()}
        if query_is_image:
            scorer.score_feature_pairs(q, g)
        else:
            scorer.score_feature_pairs(g, q)


def measure_full(models: Models, workload: Workload, bench: Bench, i2t: Tensor, t2i: Tensor) -> Dict[Tuple[str, str], Measured]:
    """Linear stages run in full for this workload: the dual's encodings (CUDA / --full), and with
    --full the re-rankers' encodings and the re-ranking of every query's k candidates."""
    s = bench.s
    b = s.batch_size
    out: Dict[Tuple[str, str], Measured] = {}
    encoders = [("dual", models.dual)] if s.full_dual else []
    if s.full:
        encoders += [("teacher", models.teacher), ("fusion", models.fusion)]
    for role, scorer in encoders:
        hw = image_hw(scorer, "dual" if role == "dual" else models.family)
        imgs, txts = synthetic_images(hw, b, s.device, seed=1), synthetic_texts(scorer, b, s.device, seed=2)
        log(f"  [{models.family}/{workload.name}] {role}: encoding all {workload.n_images:,} images and {workload.n_texts:,} captions")
        t, m = bench.time(lambda: encode_all(scorer, imgs, workload.n_images, b, "encode_images"), warmup=0)
        out[(f"{role}_image", "images")] = Measured(t, m.peak_mb, m.kind, m.increase_mb)
        t, m = bench.time(lambda: encode_all(scorer, txts, workload.n_texts, b, "encode_texts"), warmup=0)
        out[(f"{role}_text", "texts")] = Measured(t, m.peak_mb, m.kind, m.increase_mb)
        if role == "dual":
            continue
        with torch.inference_mode(), autocast(s.device, s.precision):
            img_feats, txt_feats = scorer.encode_images(imgs), scorer.encode_texts(txts)
        n_pairs = (workload.n_images + workload.n_texts) * s.k
        log(f"  [{models.family}/{workload.name}] {role}: re-ranking {n_pairs:,} candidate pairs")

        def both_directions():
            rerank(scorer, img_feats, txt_feats, i2t, b, query_is_image=True)
            rerank(scorer, txt_feats, img_feats, t2i, b, query_is_image=False)

        t, m = bench.time(both_directions, warmup=0)
        out[(f"{role}_rerank_pair", "candidates")] = Measured(
            t, m.peak_mb, m.kind, m.increase_mb, note="full (features cached for a pool of items, indices modulo the pool)"
        )
    return out


# --------------------------------------------------------------------------------------------- cost model
def unit_counts(n_images: float, n_texts: float, k: int) -> Dict[str, float]:
    """How many units each kind of stage is charged for on a whole test set, both directions."""
    return {"images": n_images, "texts": n_texts, "pairs": n_images * n_texts, "candidates": (n_images + n_texts) * k}


def query_counts(direction: str, n_images: int, n_texts: int, k: int) -> Dict[str, float]:
    """Units charged to one query against a pre-encoded gallery: i2t = an image query over captions."""
    if direction == "i2t":
        return {"images": 1, "texts": 0, "pairs": n_texts, "candidates": k}
    return {"images": 0, "texts": 1, "pairs": n_images, "candidates": k}


def modelled_seconds(strategy: str, costs: Dict[str, Cost], n_images: float, n_texts: float, k: int,
                     stat: str = "median") -> float:
    """Whole-test-set time of ``strategy`` from per-unit costs alone (the curves of the plot)."""
    counts = unit_counts(n_images, n_texts, k)
    return sum(getattr(costs[stage].per_unit, stat) * counts[per] for stage, per in RECIPES[strategy])


def strategy_row(strategy: str, costs: Dict[str, Cost], full: Dict[Tuple[str, str], Measured],
                 workload: Workload, k: int) -> Dict:
    """One table row: total (full runs where there are, extrapolations elsewhere), per query, memory."""
    counts = unit_counts(workload.n_images, workload.n_texts, k)
    parts, total, peak, increase, kinds = [], None, 0.0, 0.0, set()
    for stage, per in RECIPES[strategy]:
        cost = costs[stage]
        if (stage, per) in full:
            m = full[(stage, per)]
            timing, note, peak_mb, increase_mb, kind = m.timing, m.note, m.peak_mb, m.increase_mb, m.memory_kind
        else:
            timing = extrapolate(cost.per_unit, 1, counts[per])
            note = f"{cost.describe()}, extrapolated to {counts[per]:,.0f}"
            peak_mb, increase_mb, kind = cost.peak_mb, cost.increase_mb, cost.memory_kind
        total = timing if total is None else total + timing
        peak, increase, kinds = max(peak, peak_mb), max(increase, increase_mb), kinds | {kind}
        parts.append({
            "stage": stage, "count": counts[per], "per": per, "seconds": timing.summary(), "measured_on": note,
            "full": (stage, per) in full, "unit": cost.unit, "sample": cost.sample, "repeats": cost.repeats,
        })

    per_query = {}
    for direction in ("i2t", "t2i"):
        q = query_counts(direction, workload.n_images, workload.n_texts, k)
        seconds = None
        for stage, per in RECIPES[strategy]:
            t = costs[stage].per_unit.scaled(q[per])
            seconds = t if seconds is None else seconds + t
        per_query[direction] = seconds.summary()

    n_items = workload.n_images + workload.n_texts
    if strategy in EXHAUSTIVE:
        throughput, unit = counts["pairs"] / total.median, "pairs/s"
    else:
        throughput, unit = n_items / total.median, "items/s"
    return {
        "strategy": strategy,
        "label": STRATEGIES[strategy].split(None, 1)[1],
        "total_seconds": total.summary(),
        "per_query_seconds": per_query,
        "throughput": throughput,
        "throughput_unit": unit,
        "peak_memory_mb": round(peak, 1),
        "peak_increase_mb": round(increase, 1),
        "memory_kind": "; ".join(sorted(kinds)),
        "measured_on": summarise_measured_on(parts),
        "parts": parts,
    }


def summarise_measured_on(parts: List[Dict]) -> str:
    """'full' when every stage ran in full; otherwise which stages were sampled (and how) and extrapolated."""
    full = [_STAGE_NAMES[p["stage"]] for p in parts if p["full"]]
    sampled = [p for p in parts if not p["full"]]
    if not sampled:
        return "full"
    units = {p["unit"] for p in sampled}
    sizes = {(p["sample"], p["repeats"]) for p in sampled}
    names = ", ".join(_STAGE_NAMES[p["stage"]] for p in sampled)
    if len(sizes) == 1:
        (n, reps), = sizes
        what = f"{n} {units.pop()}s" if len(units) == 1 else f"{n} per stage"
        text = f"sample of {what} x {reps} rep{'s' * (reps != 1)}, extrapolated" + ("" if len(sampled) == 1 else f": {names}")
    else:
        text = "extrapolated: " + ", ".join(
            f"{_STAGE_NAMES[p['stage']]} (sample of {p['sample']} x {p['repeats']})" for p in sampled)
    return (f"full: {', '.join(full)}; " if full else "") + text


_STAGE_NAMES = {
    "naive_pair": "pairs", "teacher_pair": "teacher pairs", "fusion_pair": "fusion pairs",
    "teacher_rerank_pair": "teacher re-rank pairs", "fusion_rerank_pair": "fusion re-rank pairs",
    "teacher_image": "teacher img", "teacher_text": "teacher cap", "fusion_image": "fusion img",
    "fusion_text": "fusion cap", "dual_image": "dual img", "dual_text": "dual cap", "similarity": "similarity+top-k",
}


def add_speedups(rows: List[Dict]) -> None:
    base = next(r for r in rows if r["strategy"] == BASELINE)["total_seconds"]["median"]
    for r in rows:
        r["speedup"] = 1.0 if r["strategy"] == BASELINE else base / r["total_seconds"]["median"]


# --------------------------------------------------------------------------------------------- output
def fmt_seconds(t: float) -> str:
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    if t < 120:
        return f"{t:.2f} s"
    if t < 7200:
        return f"{t / 60:.1f} min"
    if t < 3 * 86400:
        return f"{t / 3600:.1f} h"
    if t < 365 * 86400:
        return f"{t / 86400:.1f} d"
    return f"{t / (365.25 * 86400):,.1f} y"


def fmt_rate(x: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{suffix}"
    return f"{x:.1f}"


def format_table(title: str, rows: List[Dict]) -> str:
    headers = ("strategy", "total (median)", "min-max", "i2t / query", "t2i / query", "throughput",
               "peak mem", "speed-up", "measured on")
    body = []
    for r in rows:
        t = r["total_seconds"]
        body.append((
            STRATEGIES[r["strategy"]], fmt_seconds(t["median"]), f"{fmt_seconds(t['min'])}-{fmt_seconds(t['max'])}",
            fmt_seconds(r["per_query_seconds"]["i2t"]["median"]), fmt_seconds(r["per_query_seconds"]["t2i"]["median"]),
            f"{fmt_rate(r['throughput'])} {r['throughput_unit']}", f"{r['peak_memory_mb']:.0f} MB",
            f"{r['speedup']:.3g}x" if r["speedup"] < 100 else f"{r['speedup']:,.0f}x",
            r["measured_on"],
        ))
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers[:-1])]
    lines = [title]
    line = "  ".join(f"{h:<{w}}" for h, w in zip(headers, widths)) + "  " + headers[-1]
    lines += [line, "-" * min(len(line) + 40, 200)]
    for row in body:
        cells = [f"{row[0]:<{widths[0]}}"] + [f"{c:>{w}}" for c, w in zip(row[1:-1], widths[1:])]
        lines.append("  ".join(cells) + "  " + row[-1])
    return "\n".join(lines)


def plot_curves(results: Dict[str, Dict], out_png: Path, k: int) -> Path:
    """Log-log retrieval time (top) and speed-up over the naive teacher (bottom) against corpus size.

    Curves come from the cost model (per-unit costs measured once, times computed for every size,
    captions = 5 x images); the dots mark the Flickr30K 1K and COCO 5K test sets.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    families = list(results)
    fig, axes = plt.subplots(2, len(families), figsize=(max(9.0, 6.4 * len(families)), 8.6), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]}, sharex=True)
    n = np.logspace(2, 6, 60)
    styles = {"1_teacher_naive": "-", "2_teacher_cached": "--", "3_fusion_exhaustive": "-.", "4_dual": "-",
              "5a_rerank_fusion": ":", "5b_rerank_teacher": ":"}
    for col, family in enumerate(families):
        costs = results[family]["costs"]
        top, bottom = axes[0][col], axes[1][col]
        naive = np.array([modelled_seconds(BASELINE, costs, x, 5 * x, k) for x in n])
        for strategy, label in STRATEGIES.items():
            y = np.array([modelled_seconds(strategy, costs, x, 5 * x, k) for x in n])
            line, = top.loglog(n, y, styles[strategy], label=label, lw=1.8)
            bottom.loglog(n, naive / y, styles[strategy], color=line.get_color(), lw=1.8)
            for wl in WORKLOADS.values():
                t = modelled_seconds(strategy, costs, wl.n_images, wl.n_texts, k)
                t0 = modelled_seconds(BASELINE, costs, wl.n_images, wl.n_texts, k)
                top.plot(wl.n_images, t, "o", color=line.get_color(), ms=5)
                bottom.plot(wl.n_images, t0 / t, "o", color=line.get_color(), ms=5)
        for ax in (top, bottom):
            for wl in WORKLOADS.values():
                ax.axvline(wl.n_images, color="grey", lw=0.8, ls=":")
            ax.grid(alpha=0.25, which="both")
        for wl in WORKLOADS.values():
            top.annotate(wl.name.replace(" test", ""), (wl.n_images, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(3, -3), textcoords="offset points", rotation=90, va="top", fontsize=8, color="grey")
        for seconds, name in ((60, "1 min"), (3600, "1 h"), (86400, "1 day"), (365 * 86400, "1 year")):
            top.axhline(seconds, color="lightgrey", lw=0.6)
            top.annotate(name, (1.0, seconds), xycoords=("axes fraction", "data"), xytext=(-3, 2),
                         textcoords="offset points", ha="right", fontsize=7, color="grey")
        top.set_title(f"{family} teacher and its students — {results[family]['device']}", fontsize=10)
        top.set_ylabel("retrieval time, whole test set, both directions (s)")
        top.legend(fontsize=7, loc="lower right")
        bottom.set_ylabel("speed-up over 1 (naive teacher)")
        bottom.set_xlabel("images in the test set (captions = 5 x images)")
    fig.suptitle(
        "Retrieval time vs corpus size. Cost model: per-image, per-caption and per-pair costs measured once,\n"
        f"curves computed from them (dual top-k then k={k} re-ranked pairs per query); dots: Flickr30K 1K and COCO 5K",
        fontsize=10,
    )
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def environment(settings: Settings) -> Dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    if settings.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(settings.device)
    return env


def device_name(settings: Settings) -> str:
    if settings.device.type == "cuda":
        return f"{torch.cuda.get_device_name(settings.device)}, {settings.precision}"
    return f"CPU x{torch.get_num_threads()} threads, {settings.precision}"


# --------------------------------------------------------------------------------------------- checkpoints
def _student_dirs(path: Path) -> List[Path]:
    """``path`` itself when it holds a config.json, else its sub-directories that do (a run directory)."""
    if not path.is_dir():
        raise BenchError(f"--student-checkpoint {path}: no such directory")
    if (path / "config.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/config.json"))
    if not found:
        raise BenchError(f"--student-checkpoint {path}: neither it nor a sub-directory holds a saved student (config.json)")
    return found


def resolve_student_checkpoints(paths: Sequence[str], families: Sequence[str]) -> Dict[str, Dict[str, Path]]:
    """{teacher family: {"dual": dir, "fusion": dir}} from the --student-checkpoint arguments.

    A dual student serves every teacher; a fusion student only its own teacher family
    (config.json "teacher_family"). A wrong family is an error that names the directory.
    """
    from students import hub

    chosen: Dict[str, Dict[str, Path]] = {f: {} for f in families}
    for arg in paths:
        for directory in _student_dirs(Path(arg)):
            try:
                config = hub.read_config(directory)
            except (OSError, ValueError, KeyError) as err:
                raise BenchError(f"--student-checkpoint {directory}: {err}") from None
            family = config["family"]
            if family == "dual":
                targets = list(families)
            elif family == "fusion":
                teacher_family = config.get("teacher_family")
                if teacher_family not in families:
                    raise BenchError(
                        f"--student-checkpoint {directory} is a fusion student of a {teacher_family!r} teacher "
                        f"(config.json teacher_family), but the benchmark runs --teacher {' '.join(families)}"
                    )
                targets = [teacher_family]
            else:
                raise BenchError(
                    f"--student-checkpoint {directory} holds a {family!r} student (config.json family); "
                    "expected a 'dual' or 'fusion' student"
                )
            for target in targets:
                if family in chosen[target]:
                    raise BenchError(f"two {family} student checkpoints for {target}: {chosen[target][family]} and {directory}")
                chosen[target][family] = directory
    return chosen


# --------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> Dict:
    settings = make_settings(args)
    families = ["meter", "vilt"] if args.teacher == "all" else [args.teacher]
    datasets = ["flickr30k", "coco"] if args.dataset == "all" else [args.dataset]
    student_ckpts = resolve_student_checkpoints(args.student_checkpoint, families)
    bench = Bench(settings)
    out_dir = Path(args.out)
    log(f"latency benchmark on {device_name(settings)}, batch {settings.batch_size}, "
        f"{settings.warmup} warm-up + {settings.repeats} timed calls per stage{' (quick)' if settings.quick else ''}")

    report: Dict = {
        "settings": {
            "device": str(settings.device), "precision": settings.precision, "batch_size": settings.batch_size,
            "repeats": settings.repeats, "warmup": settings.warmup, "k": settings.k, "quick": settings.quick,
            "full": settings.full, "full_dual_encoding": settings.full_dual,
        },
        "environment": environment(settings),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "method": __doc__.split("Method.", 1)[1].strip(),
        "synthetic_inputs": {
            "images": "standard-normal pixels at the model's input size, all-ones pixel mask "
                      f"(METER and dual: their configured square size; ViLT: {VILT_IMAGE_HW[0]}x{VILT_IMAGE_HW[1]})",
            "captions": f"random token ids, {CAPTION_TOKENS[0]}-{CAPTION_TOKENS[1]} tokens, padded to the longest in the batch",
        },
        "teachers": {},
        "results": [],
    }
    printed = []
    for family in families:
        models = build_models(family, settings, args.teacher_checkpoint, student_ckpts.get(family, {}))
        log(f"[{family}] " + "; ".join(f"{k}: {v}" for k, v in models.notes.items()))
        costs = measure_costs(models, bench)
        report["teachers"][family] = {
            "models": models.notes,
            "costs": {name: c.to_json() for name, c in costs.items()},
            "device": device_name(settings),
        }
        model_costs = dict(costs)
        for name in datasets:
            wl = WORKLOADS[name]
            log(f"  [{family}/{wl.name}] dual similarity matrix {wl.n_images:,} x {wl.n_texts:,} + top-{settings.k}, in full")
            sim, i2t, t2i = measure_similarity(models.dual, wl, bench)
            full = measure_full(models, wl, bench, i2t, t2i)
            full[("similarity", "pairs")] = sim
            costs = dict(model_costs)
            costs["similarity"] = Cost(sim.timing.scaled(1.0 / (wl.n_images * wl.n_texts)), "pair",
                                       wl.n_images * wl.n_texts, sim.timing.repeats, sim.peak_mb, sim.memory_kind,
                                       sim.increase_mb)
            rows = [strategy_row(s, costs, full, wl, settings.k) for s in STRATEGIES]
            add_speedups(rows)
            report["results"].append({
                "teacher": family, "dataset": name, "workload": wl.name, "n_images": wl.n_images,
                "n_texts": wl.n_texts, "k": settings.k, "rows": rows,
            })
            title = (f"\n{family} teacher, {wl.name} ({wl.n_images:,} images x {wl.n_texts:,} captions, "
                     f"both directions, k={settings.k}) on {device_name(settings)}")
            printed.append(format_table(title, rows))
            print(printed[-1], flush=True)
        # the plot's similarity cost per pair: from the largest workload measured
        report["teachers"][family]["costs"]["similarity"] = costs["similarity"].to_json()
        report["teachers"][family]["_costs"] = costs
        del models
    plot_costs = {f: {"costs": report["teachers"][f].pop("_costs"), "device": report["teachers"][f]["device"]}
                  for f in families}
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_curves(plot_costs, out_dir / "latency_vs_corpus.png", settings.k)
    report["curves"] = {
        f: {"n_images": [10 ** (2 + i / 4) for i in range(17)],
            **{s: [modelled_seconds(s, plot_costs[f]["costs"], 10 ** (2 + i / 4), 5 * 10 ** (2 + i / 4), settings.k)
                   for i in range(17)] for s in STRATEGIES}}
        for f in families
    }
    with open(out_dir / "latency.json", "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    print(f"\nper query: a new query against a pre-encoded gallery. '{BASELINE}' is the speed-up baseline.\n"
          f"wrote {out_dir / 'latency.json'} and {png}", flush=True)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchError as err:  # a clear message and a non-zero exit status, no traceback
        raise SystemExit(f"error: {err}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
