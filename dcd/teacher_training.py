"""Training the embedded default's teacher: a small cross-encoder fine-tuned for retrieval on the set.

Offline there are no pretrained METER / ViLT weights, and a cross-encoder trained from scratch with
random negatives alone stays at chance: random pairs are told apart by words, never by bindings, and
nothing teaches its towers to see. The recipe is METER's fine-tuning objective plus ALBEF's remedy:

* an image-text contrastive loss (ITC) on the pooled unimodal features (small projection heads used
  only here), which trains the towers quickly; a model without towers (ViLT) provides
  ``unimodal_summary``: each modality alone through its shared layers;
* the retrieval ranking loss on the fusion head: softmax cross-entropy over the positive and K
  negatives per sample, both directions, the negatives drawn from the batch in proportion to the
  ITC similarity (hard ones, as ALBEF samples its ITM negatives);
* neighbour batches (:mod:`dcd.data.neighbour_batches`): each batch holds pairs of images whose
  captions share their words, so those hard negatives include the pairs that differ only in how
  attributes bind. In a random batch of 32 out of 1500 images a binding twin almost never appears, and
  a teacher trained that way ranks like a bag of words (image-to-text R@1 at the 34% a perfect
  bag-of-words ranker gets on the validation split).

Like METER, whose towers start from pretrained CLIP and RoBERTa, the METER teacher's text tower starts
from the packaged pretrained MiniLM-L6 (the only pretrained weights we have offline; the dual student
gets the same one): measured on the embedded validation split after 200 steps, RSUM 418 with it
against 249 with a random 2-layer text tower.

The trained model is saved with ``save_pretrained`` (safetensors + config) under
``$DCD_HOME/teachers/<family>-<data set>-<hash>/`` (a stage folder of :mod:`dcd.stages`), and reused on the
next run.
"""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import teachers
from teachers.base import Features, Scorer
from teachers.files import write_text

from . import retrieval
from .data import CaptionSplit, TrainPairs, collate_train, dcd_home
from .data.neighbour_batches import NeighbourGrouping
from .losses import contrastive_loss, self_loss
from .out_of_fold import FoldEnsemble, assign_folds, images_sha256, neighbour_groups
from .recipes import EMBEDDED_DATA, EMBEDDED_TEACHERS, embedded_recipe
from .stages import claim_stage, stage_dir, stage_lock
from .trainer import TrainConfig, Trainer, from_main_process, is_main_process, seconds_trained

log = logging.getLogger(__name__)

def pooled(features: Features) -> Tensor:
    """Mean of a feature set's tokens over its mask: the unimodal summary the ITC heads read."""
    tokens = features["tokens"]
    mask = features.get("mask")
    if mask is None:
        return tokens.mean(1)
    mask = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class RetrievalFinetuning(nn.Module):
    """``forward(batch) -> {"loss", "itc", "rank"}`` for a cross-encoder ``model`` (a :class:`Scorer`)."""

    def __init__(self, model: Scorer, width: int, num_negatives: int = 3, embed_dim: int = 128):
        super().__init__()
        self.model = model
        self.num_negatives = num_negatives
        self.image_head = nn.Linear(width, embed_dim)
        self.text_head = nn.Linear(width, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1 / 0.07)

    def forward(self, batch: Dict[str, Any]) -> Dict[str, Tensor]:
        image_index = batch["image_index"]
        img = self.model.encode_images(batch["images"]["model"])
        txt = self.model.encode_texts(batch["texts"]["model"])
        summary = getattr(self.model, "unimodal_summary", None) or pooled
        zi = F.normalize(self.image_head(summary(img)), dim=-1)
        zt = F.normalize(self.text_head(summary(txt)), dim=-1)
        scale = self.logit_scale.clamp(0, 4.6052).exp()
        itc = contrastive_loss(zi, zt, scale, image_index).mean()

        with torch.no_grad():  # hard negatives in proportion to the ITC similarity, never the same image
            other = image_index[:, None] != image_index[None, :]
            k = min(self.num_negatives, int(other.sum(1).min()))
            sim = (zi @ zt.t()).float() * scale.detach()
            weights_i2t = torch.softmax(sim.masked_fill(~other, float("-inf")), dim=1)
            weights_t2i = torch.softmax(sim.t().masked_fill(~other, float("-inf")), dim=1)
            neg_texts = torch.multinomial(weights_i2t, k)
            neg_images = torch.multinomial(weights_t2i, k)
        rows = torch.arange(len(image_index), device=image_index.device)[:, None]
        texts_i2t = torch.cat([rows, neg_texts], dim=1)
        images_t2i = torch.cat([rows, neg_images], dim=1)
        i2t = self.model.score_index_pairs(img, txt, rows.expand_as(texts_i2t).reshape(-1), texts_i2t.reshape(-1))
        t2i = self.model.score_index_pairs(img, txt, images_t2i.reshape(-1), rows.expand_as(images_t2i).reshape(-1))
        rank = 0.5 * (self_loss(i2t.view(texts_i2t.shape), "ce").mean() + self_loss(t2i.view(images_t2i.shape), "ce").mean())
        return {"loss": itc + rank, "itc": itc.detach(), "rank": rank.detach()}


def feature_width(model: Scorer) -> int:
    """Width of the model's unimodal token features (what :func:`pooled` returns)."""
    config = model.config
    for name in ("hidden_size",):
        if hasattr(config, name):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell the feature width of {type(model).__name__}")


def finetune_teacher(model: Scorer, train: CaptionSplit, val: Optional[CaptionSplit], out_dir: Path,
                     epochs: int = 4, lr: float = 3e-4, batch_size: int = 32, device: str = "cpu",
                     progress: bool = True, seed: int = 0, max_steps: Optional[int] = None,
                     group_size: int = 1, num_negatives: int = 3, precision: str = "fp32") -> Dict[str, Any]:
    """Fine-tune ``model`` for retrieval on ``train`` (resumable in ``out_dir``); returns the history.

    ``group_size > 1`` builds each batch from groups of that many caption-neighbour images
    (:class:`~dcd.data.neighbour_batches.NeighbourGrouping`), so in-batch negatives are hard ones.
    """
    task = RetrievalFinetuning(model, feature_width(model), num_negatives=num_negatives)
    grouping = NeighbourGrouping(train, group_size) if group_size > 1 else None
    dataset = TrainPairs(train, {"model": model.image_transform(train=True)})
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, warmup=0.05, device=device, seed=seed,
                         progress=progress, desc="teacher", save_every=50, log_every=10, max_steps=max_steps,
                         precision=precision)

    def validate(module: RetrievalFinetuning) -> Dict[str, float]:
        return retrieval.evaluate(module.model, val, device=device, progress=False)

    trainer = Trainer(task, dataset, collate_train({"model": model}), config, out_dir,
                      evaluate=validate if val is not None else None, grouping=grouping)
    return trainer.fit(resume=True)


def embedded_identity(family: str, overrides: Optional[Dict[str, Any]] = None, precision: str = "auto",
                      device: str = "cpu", data: str = EMBEDDED_DATA, data_root: Optional[str] = None) -> Dict[str, Any]:
    """The identity of the teacher dcd trains for ``family`` on ``data`` (the embedded set, or a user's own file):
    :meth:`dcd.recipes.Recipe.identity` of its stage, for callers that have no recipe of their own (``dcd
    index``, the benchmarks)."""
    from .recipes import DistillSettings, resolve

    settings = DistillSettings(teacher=family, teacher_config=dict(overrides or {}), precision=precision, device=device,
                               data=data, data_root=data_root)
    return resolve(settings).identity("teacher")


def teacher_dir(family: str, train: CaptionSplit, overrides: Optional[Dict[str, Any]] = None,
                precision: str = "fp32", device: str = "cpu", identity: Optional[Dict[str, Any]] = None,
                data: str = EMBEDDED_DATA, data_root: Optional[str] = None) -> Path:
    """Where the teacher dcd trains for ``family`` on this data lives: ``$DCD_HOME/teachers/<family>-<data
    folder>-<hash>``, one folder per identity (recipe, data, config overrides, training precision), so trying
    another never touches the default teacher."""
    identity = identity or embedded_identity(family, overrides, precision, device, data, data_root)
    return stage_dir(dcd_home() / "teachers", f"{family}-{Path(str(train.source)).parent.name}", identity)


def embedded_architecture(family: str, recipe: Optional[Dict[str, Any]] = None) -> Scorer:
    """The embedded ``family`` teacher as its recipe builds it before training (pretrained parts loaded, the rest
    initialised from the current RNG state)."""
    recipe = recipe or EMBEDDED_TEACHERS[family]
    return teachers.create_model(family, preset=recipe["preset"], **recipe.get("pretrained", {}), **recipe["overrides"])


def find_embedded_teacher(family: str, train: CaptionSplit, data: str = EMBEDDED_DATA,
                          data_root: Optional[str] = None) -> Optional[Path]:
    """The folder of a ``family`` teacher dcd trained on ``data`` with the current recipe, or None: the one ``make
    distill`` trains on this machine (``--precision auto``), else one trained in fp32. Never trains one."""
    from teachers.precision import plan

    from .migrate import legacy_teacher_dir

    for precision in dict.fromkeys((plan("auto", "cpu").cross, "fp32")):
        directory = teacher_dir(family, train, precision=precision, data=data, data_root=data_root)
        if (directory / "teacher.json").is_file():
            return directory
        if data != EMBEDDED_DATA:
            continue
        legacy = legacy_teacher_dir(family, train, None, precision, embedded_recipe(family, precision=precision))
        if legacy is not None:
            return legacy
    return None


def embedded_teacher(family: str, train: CaptionSplit, device: str = "cpu", progress: bool = True,
                     evaluate_on: Optional[CaptionSplit] = None,
                     overrides: Optional[Dict[str, Any]] = None,
                     precision: str = "auto", identity: Optional[Dict[str, Any]] = None,
                     start: Optional[str] = None, reuse_legacy: bool = True) -> Tuple[Scorer, Dict[str, Any]]:
    """The embedded default's teacher of ``family``: trained once, then loaded from disk.

    ``overrides`` (``--teacher-config key=value``) change the training recipe (:data:`dcd.recipes.TRAINING_KEYS`, e.g.
    ``max_steps=3200``) or the preset's config (any other key, e.g. ``num_fusion_layers=3``); such a teacher is
    trained and kept in a folder of its own, as is one trained at another ``precision`` (fp32 / bf16 autocast;
    ``auto``: what pays on ``device`` for a cross-encoder, :func:`teachers.precision.choose`). ``identity``: the
    run recipe's ``identity("teacher")``, when there is one. ``start``: a checkpoint (official, or a teacher saved
    by dcd) to fine-tune further with the recipe's training budget, instead of the recipe's untrained model. A
    teacher trained by an earlier dcd, in the folder it named then, is used where it is (:mod:`dcd.migrate`),
    unless ``reuse_legacy`` is False (a teacher of part of the data, :mod:`dcd.out_of_fold`: such a folder names
    the family and data only, and holds the teacher of the whole split).
    """
    from teachers.precision import choose

    from .migrate import legacy_teacher_dir

    precision = choose(precision, device, "cross")
    recipe = embedded_recipe(family, overrides, precision)
    identity = identity or embedded_identity(family, overrides, precision, device)
    directory = teacher_dir(family, train, identity=identity)
    legacy = None if directory.is_dir() or not reuse_legacy else \
        legacy_teacher_dir(family, train, overrides, precision, recipe)
    directory = legacy or directory
    weights, info_path = directory / "model", directory / "teacher.json"
    with stage_lock(directory) if is_main_process() else contextlib.nullcontext():
        finished = from_main_process((legacy is not None or claim_stage(directory, identity, "teacher",
                                                                         is_main_process())) and info_path.is_file())
        if finished:  # rank 0 decided, behind the lock; every rank reuses (or trains) with it
            log.info("teacher: reusing %s", weights)
            model = teachers.create_model(family, checkpoint=weights)
            return model.to(device), {**json.loads(info_path.read_text()), "path": str(weights)}
        torch.manual_seed(0)
        model = teachers.create_model(family, checkpoint=start) if start else embedded_architecture(family, recipe)
        history = finetune_teacher(model, train, None, directory / "training", epochs=recipe["epochs"],
                                   lr=recipe["lr"], max_steps=recipe["max_steps"], device=device, progress=progress,
                                   group_size=recipe.get("group_size", 1), precision=precision)
        info: Dict[str, Any] = {"family": family, "preset": None if start else recipe["preset"], "start": start,
                                "precision": precision,
                                "train_seconds": seconds_trained(history),
                                "steps": max((int(r["step"]) for r in history if "step" in r), default=0),
                                "max_steps": recipe["max_steps"], "lr": recipe["lr"], "path": str(weights)}
        if evaluate_on is not None:
            info[evaluate_on.name] = retrieval.evaluate(model, evaluate_on, device=device, progress=False)
        if is_main_process():
            model.save_pretrained(weights)
            write_text(info_path, json.dumps(info, indent=1))
    return model.to(device), info


# ---------------------------------------------------------------------------------------------- out-of-fold teachers
def fold_members(recipe, train) -> Tuple[Tensor, List[Any], List[Dict[str, Any]]]:
    """``(fold_of_image, training split of each fold teacher, identity of each)``: each fold teacher is keyed by the
    images it trains on, so another split (or another dealing) is another teacher, never a reused one."""
    folds = int(recipe.teacher["folds"])
    fold_of_image = assign_folds(train.num_images, folds, seed=0, groups=neighbour_groups(train))
    subsets = [train.select_images((fold_of_image != f).nonzero(as_tuple=True)[0].tolist(),
                                   f"{train.name}-without-fold{f}of{folds}") for f in range(folds)]
    identity = recipe.identity("teacher")
    return fold_of_image, subsets, [{**identity, "fold": f, "images": images_sha256(subsets[f])} for f in range(folds)]


def out_of_fold_teacher(recipe, train, progress: bool = True) -> Tuple[FoldEnsemble, Dict[str, Any]]:
    """The K teachers of ``recipe.teacher["folds"]``, each trained (once, then reused) by the embedded recipe on
    every training image but its fold's, as one :class:`FoldEnsemble`; and its info (``path``: the ensemble's
    ``folds.json``, beside which its exhaustive scores are cached)."""
    from .stages import stage_busy

    family, identity = recipe.teacher["family"], recipe.identity("teacher")
    fold_of_image, subsets, member_identity = fold_members(recipe, train)
    folds = len(subsets)
    trained: Dict[int, Tuple[Scorer, Dict[str, Any]]] = {}
    while len(trained) < folds:  # a fold another process is training waits until last: two sweeps share the work
        pending = [f for f in range(folds) if f not in trained]
        free = next((f for f in pending if not stage_busy(teacher_dir(family, subsets[f], identity=member_identity[f]))),
                    pending[0])
        f = from_main_process(free)  # under torchrun every rank trains (or loads) the fold rank 0 chose
        log.info("teacher fold %d of %d: trains on %d of %d training images, scores the other %d", f + 1, folds,
                 subsets[f].num_images, train.num_images, train.num_images - subsets[f].num_images)
        trained[f] = embedded_teacher(family, subsets[f], device=recipe.device, progress=progress,
                                      overrides=recipe.teacher["config"], precision=recipe.precision["cross"],
                                      identity=member_identity[f], reuse_legacy=False)
    members = [trained[f][0] for f in range(folds)]
    infos = [trained[f][1] for f in range(folds)]
    ensemble = FoldEnsemble(members, fold_of_image)
    directory = stage_dir(dcd_home() / "teachers", f"{family}-folds{folds}", identity)
    summary = {"family": family, "folds": folds, "precision": infos[0].get("precision"),
               "train_seconds": round(sum(float(i.get("train_seconds") or 0) for i in infos), 1),
               "members": [i["path"] for i in infos],
               "fold_sizes": torch.bincount(fold_of_image, minlength=folds).tolist()}
    if is_main_process():
        claim_stage(directory, identity, "teacher-folds")
        write_text(directory / "folds.json", json.dumps({**summary, "identity": identity}, indent=1, default=str))
    return ensemble, {**summary, "path": str(directory / "folds.json")}

