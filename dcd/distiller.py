"""``dcd.wrap(teacher, student)``: Dynamic Contrastive Distillation as one ``nn.Module``.

Per training sample (image I, positive caption t+), in each enabled direction:

1. candidates: K negatives (:mod:`dcd.candidates`): image->text from the caption corpus (random, or
   the student's nearest captions) or, with no corpus given, from the batch; text->image from the
   batch's other images;
2. the frozen teacher scores the 1 + K candidates (or the :class:`~dcd.score_cache.TeacherScoreCache`
   supplies the scores) and keeps the positive plus its k hardest negatives
   (:mod:`dcd.hard_negatives`); the student scores exactly those, in the same order;
3. per-sample losses (:mod:`dcd.losses`) weighted per sample (:mod:`dcd.weighting`)::

       L = c * L_contrastive + alpha * sum_i r_i * L_distill_i + (1 - alpha) * sum_i w_i * L_self_i

   where ``L_contrastive`` is a dual student's in-batch InfoNCE (gathered across ranks). It stays
   outside the alpha mix: inside it (``contrastive_in_mix=True``, the earlier form) alpha also scaled
   the term closest to the retrieval metric, and the distilled student trained less than the baseline
   (dcd_review.md, finding 2).

With ``use_teacher=False`` (or no teacher) the same module trains the student on its own: 1 + k
random candidates, the self-learning loss, uniform weights. That is the undistilled baseline, and
with ``self_loss="ce"`` it is also how a cross-encoder is fine-tuned for retrieval (the embedded
default's teacher is trained that way).

Batches are those of :func:`dcd.data.collate_train` with models ``{"teacher": ..., "student": ...}``:
``{"images": {role: ...}, "texts": {role: ...}, "captions", "image_index", "caption_index"}``.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from teachers import as_teacher
from teachers.base import Features, Scorer, Teacher, concat, to_device

from . import candidates as cands
from .hard_negatives import gather, select_hard
from .losses import DISTILL_LOSSES, SELF_LOSSES, contrastive_loss, distill_loss, self_loss
from .out_of_fold import query_folds
from .weighting import WEIGHTINGS, AlphaSchedule, dynamic_weights, gap_alpha, gap_weights, uniform_weights

log = logging.getLogger(__name__)

__all__ = ["DCDConfig", "Distiller", "wrap"]

DIRECTIONS = ("i2t", "t2i")
SELECTIONS = ("hardest", "random", "all")
SELF_CANDIDATES = ("teacher", "random")


@dataclass
class DCDConfig:
    """Every knob of the method; defaults follow the reference (COCO) except where noted."""

    num_negatives: int = 15  # K candidates the teacher scores per sample (reference: 15 COCO, 63 Flickr30K)
    num_hard: int = 7  # k hardest kept for the student (reference: 7)
    negatives: str = "random"  # image->text source: "random" corpus captions or the student's "nearest"
    refresh_every: int = 100  # steps between refreshes of the student's caption bank ("nearest")
    directions: Tuple[str, ...] = DIRECTIONS  # reference: image->text only
    distill_loss: str = "kl"  # "kl" or "mse" (reference)
    self_loss: str = "ce"  # "ce" or "bce" (reference)
    temperature: float = 1.0  # KL temperature (both sides, Hinton)
    teacher_temperature: float = 1.0  # divides the teacher's logits only: how soft the KL target is
    entropy_temperature: float = 1.0  # T of the teacher distribution behind the dynamic weights
    alpha: float = 0.2  # distillation share of the loss
    alpha_end: Optional[float] = None  # with alpha_schedule linear / cosine; default: alpha
    alpha_schedule: str = "constant"
    total_steps: Optional[int] = None  # training length, for an alpha schedule
    dynamic: bool = True  # per-sample weights (entropy or gap, ``weighting``); False: uniform
    selection: str = "hardest"  # which k of the K scored candidates the student sees: the teacher's
    # "hardest" (DCD), k "random" ones (the ablation without teacher hard negatives), or "all" K
    contrastive: float = 1.0  # weight of a dual student's in-batch contrastive loss
    contrastive_in_mix: bool = False  # True: alpha scales the contrastive loss too (the earlier form)
    use_teacher: bool = True  # False: the undistilled baseline
    # -- added after the first compression sweep; left out of to_dict() at their defaults (see there)
    self_candidates: str = "teacher"  # the self-learning loss over the teacher's selection ("teacher", DCD) or
    # over 1 + k fresh random candidates, as the baseline's ("random"): distillation then adds to the baseline
    drop_false_negatives: bool = False  # the self-learning loss ignores candidates the teacher scores above
    # the positive (RocketQA's denoised hard negatives); the distillation term still sees them
    weighting: str = "entropy"  # per-sample weights from the teacher's entropy (the paper) or the student's
    # per-sample losses ("gap", dcd.weighting.gap_weights)

    def __post_init__(self) -> None:
        for spec in fields(self):  # alpha: 1 in a recipe file is alpha: 1.0 (one identity, not two)
            value = getattr(self, spec.name)
            if "float" in str(spec.type) and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, spec.name, float(value))
        self.directions = tuple(self.directions)
        if not self.directions or set(self.directions) - set(DIRECTIONS):
            raise ValueError(f"directions must be a non-empty subset of {DIRECTIONS}, got {self.directions}")
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, not {self.distill_loss!r}")
        if self.self_loss not in SELF_LOSSES:
            raise ValueError(f"self_loss must be one of {SELF_LOSSES}, not {self.self_loss!r}")
        if self.negatives not in ("random", "nearest"):
            raise ValueError(f"negatives must be 'random' or 'nearest', not {self.negatives!r}")
        if not 0 < self.num_hard <= self.num_negatives:
            raise ValueError(f"num_hard ({self.num_hard}) must be in 1..num_negatives ({self.num_negatives})")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.distill_loss != "kl" and (self.temperature != 1.0 or self.teacher_temperature != 1.0):
            raise ValueError(f"temperature / teacher_temperature act on the KL loss only; distill_loss="
                             f"{self.distill_loss!r} would ignore them")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, not {self.weighting!r}")
        if self.self_candidates not in SELF_CANDIDATES:
            raise ValueError(f"self_candidates must be one of {SELF_CANDIDATES}, not {self.self_candidates!r}")
        AlphaSchedule(self.alpha, self.alpha if self.alpha_end is None else self.alpha_end, self.alpha_schedule)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "DCDConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown DCD option(s) {unknown}; options are {sorted(known)}")
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """Every field, except later additions still at their defaults: stage identities are built from
        this dict, so students trained before a field existed keep their identity (and are reused)."""
        data = asdict(self)
        for name, default in _LATER_FIELDS.items():
            if data[name] == default:
                del data[name]
        return data


#: fields added after the first recorded runs, with the defaults that reproduce those runs
_LATER_FIELDS = {"self_candidates": "teacher", "drop_false_negatives": False, "weighting": "entropy"}


class Distiller(nn.Module):
    """Teacher (frozen) + student; ``forward(batch)`` returns ``{"loss", "distill", "self", ...}``.

    Only the student trains: the teacher is wrapped in :class:`teachers.Teacher`, sharing no storage
    with the student, and left out of ``state_dict`` (checkpoints hold the student only).
    """

    def __init__(self, teacher: Optional[Any], student: Scorer, config: Optional[DCDConfig] = None,
                 captions: Optional[Sequence[str]] = None, caption_image: Optional[Tensor] = None,
                 score_cache=None):
        super().__init__()
        self.config = config or DCDConfig()
        if teacher is None:
            self.config.use_teacher = False
        self.teacher: Optional[Teacher] = as_teacher(teacher) if teacher is not None else None
        self.student = student
        if self.teacher is not None:
            _check_no_shared_storage(self.teacher, student)
        if (captions is None) != (caption_image is None):
            raise ValueError("pass both captions and caption_image (the corpus of image->text negatives), or neither")
        if captions is not None and len(captions) != len(caption_image):
            raise ValueError(f"captions has {len(captions)} entries but caption_image {len(caption_image)}")
        self.captions = list(captions) if captions is not None else None
        # kept on the CPU, where candidates are drawn and captions tokenised
        self.caption_image = None if caption_image is None else torch.as_tensor(caption_image).long().cpu()
        if self.config.negatives == "nearest" and self.captions is None:
            raise ValueError("negatives='nearest' needs the caption corpus: wrap(..., captions=, caption_image=)")
        self.score_cache = score_cache
        self.alpha_schedule = AlphaSchedule(self.config.alpha, self.config.alpha if self.config.alpha_end is None
                                            else self.config.alpha_end, self.config.alpha_schedule)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # checkpointed: drives the alpha schedule
        self._caption_bank: Optional[Tensor] = None

    # ------------------------------------------------------------------ what a training loop needs
    def roles(self) -> Dict[str, Scorer]:
        """The models whose inputs a batch carries: ``{"student": ..., "teacher": ...}``."""
        return {"student": self.student, **({"teacher": self.teacher} if self.config.use_teacher else {})}

    def transforms(self) -> Dict[str, Callable]:
        """Per-role image preprocessing for :class:`dcd.data.TrainPairs` (the student's with augmentation)."""
        return {role: model.image_transform(train=role == "student") for role, model in self.roles().items()}

    def trainable_parameters(self) -> List[nn.Parameter]:
        """What the optimiser gets: the student's trainable parameters, never the teacher's."""
        return [p for p in self.parameters() if p.requires_grad]

    def collate(self):
        """Collate function for :class:`dcd.data.TrainPairs` batches."""
        from dcd.data import collate_train

        return collate_train(self.roles())

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(prefix + "teacher.")]:
            del state[key]
        return state

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)
        return self

    def alpha(self) -> float:
        """This step's alpha; a schedule runs over ``total_steps`` forward passes (given to :func:`wrap` for a
        loop of your own; :meth:`fit` sets it to the passes its trainer runs)."""
        if self.alpha_schedule.kind in ("constant", "gap"):  # gap: set in forward, from the step's losses
            return self.alpha_schedule.start
        if not self.config.total_steps:
            raise ValueError(f"alpha_schedule={self.config.alpha_schedule!r} needs total_steps: pass it to wrap() "
                             "or train with Distiller.fit, which sets it from the trainer's step count")
        return self.alpha_schedule(float(self.step) / self.config.total_steps)

    # ------------------------------------------------------------------ the loss
    def forward(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        cfg = self.config
        device = self.student.device
        image_index = batch["image_index"].to(device)
        use_teacher = cfg.use_teacher and self.teacher is not None

        s_img = self.student.encode_images(batch["images"]["student"])
        s_txt = self.student.encode_texts(batch["texts"]["student"])
        t_img = t_txt = None
        if use_teacher:
            t_img = self.teacher.encode_images(batch["images"]["teacher"])
            if "t2i" in cfg.directions or self.captions is None:
                t_txt = self.teacher.encode_texts(batch["texts"]["teacher"])

        parts: Dict[str, List[Tensor]] = {"distill": [], "self": []}
        weights: Dict[str, Tensor] = {}
        stats: Dict[str, Tensor] = {}
        for direction in cfg.directions:
            corpus = direction == "i2t" and self.captions is not None
            # out-of-fold teachers score a list with the teacher that never trained on its query (dcd.out_of_fold)
            t_img_q, t_txt_q = (query_folds(self.teacher, t_img, image_index), t_txt) if direction == "i2t" else \
                (t_img, query_folds(self.teacher, t_txt, image_index))
            if corpus:
                student_scores, teacher_scores = self._i2t_corpus(batch, s_img, t_img_q, s_txt, t_txt_q)
            else:
                student_scores, teacher_scores = self._in_batch(direction, image_index, s_img, s_txt, t_img_q, t_txt_q)
            self_scores, keep = student_scores, None
            if teacher_scores is not None and cfg.self_candidates == "random":
                self_scores = self._i2t_corpus(batch, s_img, None, s_txt) if corpus else \
                    self._in_batch(direction, image_index, s_img, s_txt, None, None)
                self_scores = self_scores[0]
            elif teacher_scores is not None and cfg.drop_false_negatives:
                keep = teacher_scores <= teacher_scores[:, :1]
                stats[f"false_negatives_{direction}"] = 1.0 - keep[:, 1:].float().mean()
            own = self_loss(self_scores, cfg.self_loss, keep)  # per sample
            if teacher_scores is not None:
                imitation = distill_loss(student_scores, teacher_scores, cfg.distill_loss, cfg.temperature,
                                         cfg.teacher_temperature)  # per sample
                if not cfg.dynamic:
                    w = r = uniform_weights(len(teacher_scores), device)
                elif cfg.weighting == "gap":
                    w, r = gap_weights(own, imitation)
                else:
                    w, r = dynamic_weights(teacher_scores, cfg.entropy_temperature)
                parts["distill"].append((r * imitation).sum())
                stats[f"r_spread_{direction}"] = r.max() / r.min().clamp(min=1e-12)
                stats[f"teacher_top1_{direction}"] = (teacher_scores.argmax(1) == 0).float().mean()
                weights[direction] = torch.stack([w, r])
            else:
                w = uniform_weights(len(student_scores), device)
            parts["self"].append((w * own).sum())

        loss_self = torch.stack(parts["self"]).mean()
        out: Dict[str, Any] = {}
        loss_contrast = loss_self.new_zeros(())
        if cfg.contrastive and "embedding" in s_img and hasattr(self.student, "scale"):
            contrast = contrastive_loss(s_img["embedding"], s_txt["embedding"], self.student.scale(), image_index).mean()
            loss_contrast = cfg.contrastive * contrast
            out["contrastive"] = contrast.detach()
        if use_teacher:
            loss_distill = torch.stack(parts["distill"]).mean()
            alpha = self.alpha() if cfg.alpha_schedule != "gap" else \
                gap_alpha(loss_distill, loss_self, self.alpha_schedule.start, self.alpha_schedule.end)
            if cfg.contrastive_in_mix:
                loss = alpha * loss_distill + (1.0 - alpha) * (loss_self + loss_contrast)
            else:
                loss = loss_contrast + alpha * loss_distill + (1.0 - alpha) * loss_self
            out.update(distill=loss_distill.detach(), alpha=torch.tensor(alpha))
        else:
            loss = loss_contrast + loss_self
        if self.training:
            self.step += 1
        out.update(loss=loss, self=loss_self.detach(), weights=weights, **stats)
        return out

    # ------------------------------------------------------------------ candidate sets
    def _i2t_corpus(self, batch, s_img: Features, t_img: Optional[Features], s_txt: Optional[Features] = None,
                    t_txt: Optional[Features] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Image->text over corpus captions: ``(student [B, 1+k], teacher [B, 1+k] or None)``.

        ``s_txt`` / ``t_txt``: the batch's own captions, already encoded; a candidate among them is not
        encoded again (every positive is a candidate: a fifth of a dual student's text work at k = 3)."""
        cfg = self.config
        image_index, caption_index = batch["image_index"].cpu(), batch["caption_index"].cpu()
        use_teacher = cfg.use_teacher and self.teacher is not None and t_img is not None
        teacher_scores = None
        if use_teacher and self.score_cache is not None and cfg.negatives == "random":
            candidates, teacher_scores = self.score_cache.lookup(image_index, caption_index, cfg.num_negatives)
            teacher_scores = teacher_scores.to(self.student.device)
        else:
            count = cfg.num_negatives if use_teacher else cfg.num_hard
            if cfg.negatives == "nearest":
                negatives = cands.nearest_captions(s_img["embedding"], self._bank(), image_index, self.caption_image, count)
            else:
                negatives = cands.random_captions(image_index, self.caption_image, count)
            candidates = torch.cat([caption_index[:, None], negatives.cpu()], dim=1)
            if use_teacher:
                teacher_scores = self._score_captions(self.teacher, t_img, candidates, caption_index, t_txt)
        if teacher_scores is not None:
            keep = _select(teacher_scores, cfg.num_hard, cfg.selection)
            teacher_scores = gather(teacher_scores, keep)
            candidates = gather(candidates, keep.to(candidates.device))
        return self._score_captions(self.student, s_img, candidates, caption_index, s_txt), teacher_scores

    def _in_batch(self, direction: str, image_index: Tensor, s_img: Features, s_txt: Features,
                  t_img: Optional[Features], t_txt: Optional[Features]) -> Tuple[Tensor, Optional[Tensor]]:
        """Candidates from the batch: for each row, other rows' captions (i2t) or images (t2i)."""
        cfg = self.config
        use_teacher = t_img is not None
        negatives = cands.in_batch(image_index, cfg.num_negatives if use_teacher else cfg.num_hard)
        rows = torch.arange(len(image_index), device=image_index.device)
        candidates = torch.cat([rows[:, None], negatives], dim=1)  # [B, 1 + K] batch rows
        anchors = rows[:, None].expand_as(candidates)
        pairs = (anchors, candidates) if direction == "i2t" else (candidates, anchors)  # (image rows, text rows)
        teacher_scores = None
        if use_teacher:
            teacher_scores = _score_rows(self.teacher, t_img, t_txt, *pairs)
            keep = _select(teacher_scores, min(cfg.num_hard, teacher_scores.shape[1] - 1), cfg.selection)
            teacher_scores = gather(teacher_scores, keep)
            pairs = tuple(gather(p, keep) for p in pairs)
        return _score_rows(self.student, s_img, s_txt, *pairs), teacher_scores

    def _score_captions(self, model: Scorer, image_features: Features, candidates: Tensor,
                        known_index: Optional[Tensor] = None, known: Optional[Features] = None) -> Tensor:
        """Logits ``[B, C]`` of batch image i with corpus captions ``candidates[i]`` (each encoded once).

        ``known``: features of the captions ``known_index`` (the batch's, encoded by ``model``): reused."""
        unique, inverse = candidates.unique(return_inverse=True)
        row_of = {} if known is None else {int(c): row for row, c in reversed(list(enumerate(known_index.tolist())))}
        fresh = [int(c) for c in unique.tolist() if int(c) not in row_of]
        parts = [] if known is None else [known]
        if fresh:
            parts.append(model.encode_texts(to_device(model.tokenize([self.captions[c] for c in fresh]), model.device)))
        text_features = concat(parts) if len(parts) > 1 else parts[0]
        offset = 0 if known is None else len(known_index)
        row_of.update({c: offset + i for i, c in enumerate(fresh)})
        lookup = torch.tensor([row_of[int(c)] for c in unique.tolist()], dtype=torch.long)
        rows = torch.arange(len(candidates), device=model.device)[:, None].expand_as(candidates)
        return _score_rows(model, image_features, text_features, rows, lookup[inverse].to(model.device))

    @torch.no_grad()
    def _bank(self) -> Tensor:
        """The student's embedding of every corpus caption, refreshed every ``refresh_every`` steps."""
        if self._caption_bank is None or int(self.step) % self.config.refresh_every == 0:
            was_training = self.student.training
            self.student.eval()
            chunks = []
            for start in range(0, len(self.captions), 512):
                texts = to_device(self.student.tokenize(self.captions[start:start + 512]), self.student.device)
                chunks.append(self.student.encode_texts(texts))
            if "embedding" not in chunks[0]:
                raise ValueError(f"negatives='nearest' needs a student with text embeddings (a dual encoder), "
                                 f"not a {type(self.student).__name__}")
            self._caption_bank = concat(chunks)["embedding"]
            self.student.train(was_training)
        return self._caption_bank

    # ------------------------------------------------------------------ convenience loop
    def fit(self, split, out_dir: str | Path, config=None, evaluate=None, resume: bool = False, group_size: int = 1,
            **train_kwargs):
        """Train on a :class:`dcd.data.CaptionSplit` with :class:`dcd.trainer.Trainer`; returns the history.

        ``group_size > 1``: neighbour batches (:class:`~dcd.data.neighbour_batches.NeighbourGrouping`), groups
        of that many images whose captions share their words, so in-batch candidates include hard ones.
        """
        from dcd.data import TrainPairs
        from dcd.data.neighbour_batches import NeighbourGrouping
        from dcd.trainer import TrainConfig, Trainer

        config = config or TrainConfig(**train_kwargs)
        grouping = NeighbourGrouping(split, group_size) if group_size > 1 else None
        trainer = Trainer(self, TrainPairs(split, self.transforms()), self.collate(), config, Path(out_dir), evaluate,
                          grouping=grouping)
        # the schedule spans the loop that runs it: a length worked out beforehand (the recipe's, from the
        # data size) misses what only the trainer knows, e.g. each of N torchrun ranks takes 1/N of the steps
        # (its clock, ``self.step``, counts forward passes: grad_accum of them per optimiser step)
        passes = trainer.total_steps * trainer.config.grad_accum
        if self.config.alpha_schedule not in ("constant", "gap") and self.config.total_steps != passes:
            if self.config.total_steps is not None:
                log.info("alpha schedule: %d training passes, not the %d given", passes, self.config.total_steps)
            self.config.total_steps = passes
        return trainer.fit(resume=resume)


def _select(teacher_scores: Tensor, k: int, selection: str) -> Tensor:
    """Columns ``[B, 1 + k]`` (positive first) of the candidates the student trains on."""
    if selection == "hardest":
        return select_hard(teacher_scores, k)
    rows, columns = teacher_scores.shape
    if selection == "all":
        return torch.arange(columns, device=teacher_scores.device).expand(rows, columns)
    picked = torch.rand(rows, columns - 1).argsort(dim=1)[:, :k].to(teacher_scores.device) + 1
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1)


def _score_rows(model: Scorer, image_features: Features, text_features: Features, image_rows: Tensor,
                text_rows: Tensor) -> Tensor:
    """``[B, C]`` logits of pairs (image_rows[i, j], text_rows[i, j])."""
    flat = model.score_index_pairs(image_features, text_features, image_rows.reshape(-1), text_rows.reshape(-1))
    return flat.view(image_rows.shape)


def _check_no_shared_storage(teacher: nn.Module, student: nn.Module) -> None:
    teacher_ptrs = {t.untyped_storage().data_ptr() for t in teacher.state_dict().values()}
    shared = [n for n, p in student.named_parameters() if p.untyped_storage().data_ptr() in teacher_ptrs]
    if shared:
        raise ValueError(
            f"student parameters share storage with the teacher ({shared[:3]}...): training would change the "
            "teacher; build the student from a deep copy (students.create_student does)"
        )


def wrap(teacher: Optional[Any], student: Scorer, captions: Optional[Sequence[str]] = None,
         caption_image: Optional[Tensor] = None, score_cache=None, **config) -> Distiller:
    """The plug-in API: a :class:`Distiller` for ``teacher`` -> ``student`` (options: :class:`DCDConfig`).

    ``teacher`` may be a dcd teacher, any ``Scorer``, or a raw model with a registered hook (e.g. a
    transformers ``ViltForImageAndTextRetrieval``). Give ``captions`` / ``caption_image`` (the training
    corpus) for image->text negatives from the whole corpus; without them negatives come from the batch.
    """
    return Distiller(teacher, student, DCDConfig.from_kwargs(**config), captions, caption_image, score_cache)
