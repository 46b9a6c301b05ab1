"""Out-of-fold teacher targets: every list the student learns from is scored by a teacher that never trained on it.

Why: DCD distils the teacher's scores on the *training* captions. A teacher trained 4x longer ranked test 48 RSUM
better, yet gave worse students: on its own training lists it had put 0.61 of its softmax on the positive (the
default teacher 0.46), a near one-hot target exactly where the student learns (docs/experiments.md). Cross-fitting,
as stacking does it: the training images are dealt into K folds; teacher f trains on every fold but f and scores the
lists whose query lies in fold f -- an image for image->text, a caption's image for text->image -- so a target is
always what the teacher predicts on data it has not seen. Images whose captions are each other's nearest
neighbours (the binding twins of the embedded set) share a fold, so no teacher has trained on a query's hardest
negatives either. Outside the training split (val, test: no fold) the K teachers' logits are averaged; the teacher
row of a report is then the K of them (K times the parameters and the scoring time).

``dcd distill --teacher-folds K`` / ``dcd ablations --teacher-folds K`` train the K teachers with the embedded
recipe (:func:`dcd.teacher_training.out_of_fold_teacher`: each a stage folder of its own, keyed by the images it
trains on), and :class:`FoldEnsemble` is the teacher the run sees.
The two places that score training lists, the score cache and :class:`dcd.distiller.Distiller`, mark each list's
query with :func:`query_folds`; for any other teacher that is a no-op.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from teachers.base import Features, Inputs, Scorer, Teacher, Towers, select

log = logging.getLogger(__name__)

__all__ = ["FoldEnsemble", "assign_folds", "neighbour_groups", "images_sha256", "query_folds"]

#: the feature key that names, per item, the fold whose teacher scores the pairs that item is the query of
FOLD = "fold"


def assign_folds(num_images: int, folds: int, seed: int = 0,
                 groups: Optional[Sequence[Sequence[int]]] = None) -> Tensor:
    """``fold[i]`` in ``0..folds-1`` for each training image, the same for the same split every time.

    ``groups`` (lists of image indices covering every image once) are dealt whole: in a seeded order, largest
    first, each to the fold with the fewest images so far, so the folds stay within a group's size of each other.
    Without them each image is its own group."""
    if folds < 2:
        raise ValueError(f"out-of-fold targets need at least 2 folds, got {folds}")
    if num_images < folds:
        raise ValueError(f"{num_images} training image(s) cannot be dealt into {folds} folds")
    groups = [list(g) for g in groups] if groups is not None else [[i] for i in range(num_images)]
    if sorted(i for g in groups for i in g) != list(range(num_images)):
        raise ValueError(f"groups must cover each of the {num_images} training images exactly once")
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda g: -len(groups[g]))  # stable: the seeded order within each size
    fold = torch.empty(num_images, dtype=torch.long)
    sizes = [0] * folds
    for g in order:
        target = min(range(folds), key=lambda f: (sizes[f], f))
        fold[groups[g]] = target
        sizes[target] += len(groups[g])
    return fold


def neighbour_groups(split) -> List[List[int]]:
    """The training images in groups that must share a fold: the connected parts of the graph joining each image
    to its nearest neighbour by caption words (:func:`dcd.data.neighbour_batches.caption_neighbours`). On the
    embedded set those are the binding twins (groups of 2 to 7 images): a teacher trained on one twin has trained
    on the captions that are its twin's hardest negatives."""
    from dcd.data.neighbour_batches import caption_neighbours

    if split.num_images < 2:
        return [[i] for i in range(split.num_images)]
    nearest = caption_neighbours(split, 1)[:, 0].tolist()
    parent = list(range(split.num_images))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in enumerate(nearest):
        parent[root(i)] = root(j)
    groups: Dict[int, List[int]] = {}
    for i in range(split.num_images):
        groups.setdefault(root(i), []).append(i)
    return list(groups.values())


def images_sha256(split) -> str:
    """sha256 of a split's image ids, in order: what a fold teacher trained on, part of its identity."""
    return hashlib.sha256("\n".join(str(i) for i in split.image_ids).encode()).hexdigest()


class FoldEnsemble(Scorer):
    """K teachers of one architecture and the fold of each training image; scores each pair with the teacher of
    its query's fold (:data:`FOLD` on the image features, else on the text features), else their mean."""

    def __init__(self, members: Sequence[Scorer], fold_of_image: Tensor):
        super().__init__()
        if len(members) < 2:
            raise ValueError("a FoldEnsemble needs at least 2 members")
        if int(fold_of_image.max()) >= len(members) or int(fold_of_image.min()) < 0:
            raise ValueError(f"fold_of_image names folds outside 0..{len(members) - 1}")
        self.members = nn.ModuleList(members)
        self.register_buffer("fold_of_image", fold_of_image.long().clone())
        first = members[0]
        self.family = first.family
        self.pair_chunk = first.pair_chunk
        self.fusion_frozen = getattr(first, "fusion_frozen", ())

    @property
    def folds(self) -> int:
        return len(self.members)

    # ------------------------------------------------------------------ preprocessing: the members share it
    def image_transform(self, train: bool = False) -> Callable:
        return self.members[0].image_transform(train)

    def collate_images(self, images: List[Tensor]) -> Inputs:
        return self.members[0].collate_images(images)

    def tokenize(self, texts: Sequence[str]) -> Inputs:
        return self.members[0].tokenize(texts)

    @property
    def tokenizer(self):
        return self.members[0].tokenizer

    def input_image_hw(self) -> Tuple[int, int]:
        return self.members[0].input_image_hw()

    # ------------------------------------------------------------------ features: every member's, prefixed
    def encode_images(self, images: Inputs) -> Features:
        return {f"{f}/{key}": value for f, member in enumerate(self.members)
                for key, value in member.encode_images(images).items()}

    def encode_texts(self, texts: Inputs) -> Features:
        return {f"{f}/{key}": value for f, member in enumerate(self.members)
                for key, value in member.encode_texts(texts).items()}

    def score_feature_pairs(self, image_features: Features, text_features: Features) -> Tensor:
        fold = image_features.get(FOLD, text_features.get(FOLD))
        count = len(next(v for k, v in image_features.items() if k != FOLD))
        device = next(iter(image_features.values())).device
        if fold is None:
            fold = torch.full((count,), -1, dtype=torch.long, device=device)
        logits = torch.zeros(count, dtype=torch.float32, device=device)
        unmarked = fold < 0
        for f, member in enumerate(self.members):
            rows = ((fold == f) | unmarked).nonzero(as_tuple=True)[0]
            if len(rows) == 0:
                continue
            scores = member.score_feature_pairs(select(_member_part(image_features, f), rows),
                                                select(_member_part(text_features, f), rows)).float()
            logits[rows] += torch.where(unmarked[rows], scores / self.folds, scores)
        return logits

    def score_features(self, image_features: Features, text_features: Features) -> Tensor:
        """Every image with every text; unmarked (val, test): each member's own full-matrix path, averaged."""
        if FOLD in image_features or FOLD in text_features:
            return super().score_features(image_features, text_features)
        total = sum(member.score_features(_member_part(image_features, f), _member_part(text_features, f)).float()
                    for f, member in enumerate(self.members))
        return total / self.folds

    # ------------------------------------------------------------------ what students take: the first member's
    def unimodal_towers(self) -> Towers:
        return self.members[0].unimodal_towers()

    @property
    def num_fusion_layers(self) -> int:
        from teachers.base import num_fusion_layers

        return num_fusion_layers(self.members[0])

    def shrink(self, layers):
        """A fusion student starts from the first member's layers (every member is the same architecture)."""
        return self.members[0].shrink(layers)

    def save_pretrained(self, directory) -> None:
        raise NotImplementedError("a FoldEnsemble is not saved as one model: each member is in its own teacher "
                                  "folder (folds.json beside the ensemble's scores names them)")


def _member_part(features: Features, member: int) -> Features:
    prefix = f"{member}/"
    return {key[len(prefix):]: value for key, value in features.items() if key.startswith(prefix)}


def _ensemble_of(teacher: Optional[nn.Module]) -> Optional[FoldEnsemble]:
    model = teacher.model if isinstance(teacher, Teacher) else teacher
    return model if isinstance(model, FoldEnsemble) else None


def query_folds(teacher: Optional[nn.Module], features: Optional[Features], image_index: Tensor) -> Optional[Features]:
    """``features`` marked as the queries of the lists they head: item i belongs to training image
    ``image_index[i]`` (an image, or a caption's image). Unchanged (the same object) for any teacher that is not
    a :class:`FoldEnsemble`."""
    ensemble = _ensemble_of(teacher)
    if ensemble is None or features is None:
        return features
    index = image_index.to(ensemble.fold_of_image.device).long()
    if int(index.max()) >= len(ensemble.fold_of_image):
        raise ValueError(f"training image {int(index.max())} has no fold: the ensemble's folds were dealt over "
                         f"{len(ensemble.fold_of_image)} images (another training split?)")
    device = next(iter(features.values())).device
    return {**features, FOLD: ensemble.fold_of_image[index].to(device)}
