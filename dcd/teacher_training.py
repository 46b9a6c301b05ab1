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
``$DCD_HOME/teachers/<family>-<data set>/`` with its recall, and reused on the next run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import teachers
from teachers.base import Features, Scorer
from teachers.files import write_json, write_text

from . import retrieval
from .checkpoint import RECIPE_NAME, claim_run_dir
from .data import CaptionSplit, TrainPairs, collate_train, dcd_home
from .data.neighbour_batches import NeighbourGrouping
from .losses import contrastive_loss, self_loss
from .trainer import TrainConfig, Trainer, is_main_process, seconds_trained

log = logging.getLogger(__name__)

#: from-scratch training breaks the symmetry of near-uniform attention far sooner with a wider init
#: (BERT's 0.02 is meant for width 768) and no dropout: measured, the ranking loss leaves chance
#: within 10 steps instead of not at all in 200
SCRATCH_OVERRIDES = {"initializer_range": 0.1, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

#: embedded teacher per family: registry preset, config overrides, training budget
EMBEDDED_TEACHERS: Dict[str, Dict[str, Any]] = {
    "meter": {"preset": "minilm2-vit128x4", "overrides": SCRATCH_OVERRIDES, "pretrained": {"text_pretrained": "minilm"},
              "epochs": 4, "max_steps": 800, "lr": 3e-4, "group_size": 2},
    "vilt": {"preset": "vit128x4", "overrides": SCRATCH_OVERRIDES, "epochs": 4, "max_steps": 800, "lr": 1e-3, "group_size": 2},
}


#: the keys of an embedded teacher's recipe that ``--teacher-config`` may override besides its model config
TRAINING_KEYS = ("epochs", "max_steps", "lr", "group_size")


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


def teacher_dir(family: str, train: CaptionSplit, overrides: Optional[Dict[str, Any]] = None,
                precision: str = "fp32") -> Path:
    """Where the embedded teacher of ``family`` for this data set lives (one per data set build, one per set of
    config overrides and one per training precision, so trying either never clears the default teacher)."""
    source = Path(str(train.source))
    suffix = ""
    if overrides:
        suffix = "-" + hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:10]
    if precision != "fp32":
        suffix += f"-{precision}"
    return dcd_home() / "teachers" / f"{family}-{source.parent.name}{suffix}"


def embedded_recipe(family: str, overrides: Optional[Dict[str, Any]] = None, precision: str = "fp32") -> Dict[str, Any]:
    """The training recipe of the embedded ``family`` teacher with ``--teacher-config`` overrides and the training
    precision applied: what its folder's ``recipe.json`` must hold for it to be reused."""
    if family not in EMBEDDED_TEACHERS:
        raise ValueError(f"no embedded recipe for teacher {family!r}; known: {sorted(EMBEDDED_TEACHERS)} "
                         "(bring a checkpoint with --teacher-checkpoint)")
    recipe = EMBEDDED_TEACHERS[family]
    if overrides:
        training = {k: v for k, v in overrides.items() if k in TRAINING_KEYS}
        model = {k: v for k, v in overrides.items() if k not in TRAINING_KEYS}
        recipe = {**recipe, **training, "overrides": {**recipe["overrides"], **model}}
    if precision != "fp32":  # part of its identity; an fp32 teacher keeps the recipe it was stored under
        recipe = {**recipe, "precision": precision}
    return recipe


def rename_stored_preset(directory: Path, family: str, recipe: Dict[str, Any]) -> None:
    """A teacher trained when its preset had an older name ("tiny") keeps its identity under the new one.

    The stored ``recipe.json`` (and the preset named in ``teacher.json``) is rewritten when it differs from
    ``recipe`` only by a deprecated preset name that resolves to ``recipe["preset"]``; without this,
    renaming a preset would retrain every cached teacher (hours on CPU) for weights that are the same.
    Every rank of a torchrun job calls it: the main one rewrites, the others wait for that before they
    read the file (a rank that read the old name would retrain while the main one reuses).
    """
    path = directory / RECIPE_NAME
    stored = json.loads(path.read_text()) if path.is_file() else None
    old = stored.get("preset") if isinstance(stored, dict) else None
    presets = getattr(teachers.TEACHERS.get(family), "presets", None)
    aliases = presets.aliases() if presets is not None else {}
    same = old is not None and {**stored, "preset": recipe["preset"]} == json.loads(json.dumps(recipe))
    if same and old != recipe["preset"] and aliases.get(old) == recipe["preset"] and is_main_process():
        log.info("teacher: %s names preset %r by its old name; now %r", path, old, recipe["preset"])
        write_json(path, {**stored, "preset": recipe["preset"]}, indent=1, sort_keys=False, newline=False)
    info_path = directory / "teacher.json"
    if same and info_path.is_file() and is_main_process():  # also when an earlier version renamed the recipe only
        info = json.loads(info_path.read_text())
        if aliases.get(info.get("preset")) == recipe["preset"]:
            write_text(info_path, json.dumps({**info, "preset": recipe["preset"]}, indent=1))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def embedded_architecture(family: str, recipe: Optional[Dict[str, Any]] = None) -> Scorer:
    """The embedded ``family`` teacher as its recipe builds it before training (pretrained parts loaded, the rest
    initialised from the current RNG state)."""
    recipe = recipe or EMBEDDED_TEACHERS[family]
    return teachers.create_model(family, preset=recipe["preset"], **recipe.get("pretrained", {}), **recipe["overrides"])


def find_embedded_teacher(family: str, train: CaptionSplit) -> Optional[Path]:
    """The folder of a trained embedded ``family`` teacher made by the current recipe, or None: the one ``make
    distill`` trains on this machine (``--precision auto``), else one trained in fp32. Never trains one."""
    from teachers.precision import plan

    for precision in dict.fromkeys((plan("auto", "cpu").cross, "fp32")):
        directory, expected = teacher_dir(family, train, precision=precision), embedded_recipe(family, precision=precision)
        rename_stored_preset(directory, family, expected)  # cached under a preset's old name
        recipe = directory / RECIPE_NAME
        if (directory / "teacher.json").is_file() and recipe.is_file() and \
                json.loads(recipe.read_text()) == json.loads(json.dumps(expected)):
            return directory
    return None


def embedded_teacher(family: str, train: CaptionSplit, device: str = "cpu", progress: bool = True,
                     evaluate_on: Optional[CaptionSplit] = None,
                     overrides: Optional[Dict[str, Any]] = None,
                     precision: str = "auto") -> Tuple[Scorer, Dict[str, Any]]:
    """The embedded default's teacher of ``family``: trained once, then loaded from disk.

    ``overrides`` (``--teacher-config key=value``) change the training recipe (:data:`TRAINING_KEYS`, e.g.
    ``max_steps=3200``) or the preset's config (any other key, e.g. ``num_fusion_layers=3``); such a teacher is
    trained and kept in a folder of its own, as is one trained at another ``precision`` (fp32 / bf16 autocast;
    ``auto``: what pays on ``device`` for a cross-encoder, :func:`teachers.precision.choose`).
    """
    from teachers.precision import choose

    precision = choose(precision, device, "cross")
    recipe = embedded_recipe(family, overrides, precision)
    directory = teacher_dir(family, train, overrides, precision)
    weights, info_path = directory / "model", directory / "teacher.json"
    rename_stored_preset(directory, family, recipe)
    # a teacher trained (or half-trained) by another recipe is cleared, never reused or resumed
    if claim_run_dir(directory, recipe, is_main_process()) and info_path.is_file():
        log.info("teacher: reusing %s", weights)
        model = teachers.create_model(family, checkpoint=weights)
        return model.to(device), json.loads(info_path.read_text())
    torch.manual_seed(0)
    model = embedded_architecture(family, recipe)
    history = finetune_teacher(model, train, None, directory / "training", epochs=recipe["epochs"], lr=recipe["lr"],
                     max_steps=recipe["max_steps"], device=device, progress=progress,
                     group_size=recipe.get("group_size", 1), precision=precision)
    info: Dict[str, Any] = {"family": family, "preset": recipe["preset"], "precision": precision,
                            "train_seconds": seconds_trained(history),
                            "steps": recipe["max_steps"], "lr": recipe["lr"], "path": str(weights)}
    if evaluate_on is not None:
        info[evaluate_on.name] = retrieval.evaluate(model, evaluate_on, device=device, progress=False)
    if is_main_process():
        model.save_pretrained(weights)
        write_text(info_path, json.dumps(info, indent=1))
    return model.to(device), info
