"""The teacher seam and the registries: a third teacher family, registered from this file alone, gets a
fusion and a dual student distilled from it; students/ and benchmarks/ import no teacher family module."""
import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import dcd
import students
import teachers
from dcd.data import TrainPairs, build_synthetic, load_karpathy
from teachers.base import Scorer, Towers
from teachers.files import load_weights, read_json, save_weights, write_json
from teachers.registry import Registry, UnknownName
from teachers.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAMILY = "toy-two-stream"


# ============================================================================================ a third family
class ToyImageTower(nn.Module):
    def __init__(self, pixels: nn.Linear):
        super().__init__()
        self.pixels, self.width = pixels, pixels.out_features

    def forward(self, images):
        return torch.tanh(self.pixels(images["pixel_values"].flatten(1)))


class ToyTextTower(nn.Module):
    def __init__(self, words: nn.Embedding):
        super().__init__()
        self.words, self.width = words, words.embedding_dim

    def forward(self, texts):
        mask = texts["attention_mask"].unsqueeze(-1).float()
        return (self.words(texts["input_ids"]) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class ToyTwoStream(Scorer):
    """A two-stream cross-encoder with the whole teacher interface of teachers/base.py, in a few lines."""

    family = FAMILY
    fusion_frozen = ("image_tower", "text_tower")

    def __init__(self, image_size: int = 8, width: int = 16, depth: int = 3, max_text_len: int = 16):
        super().__init__()
        self.config = {"image_size": image_size, "width": width, "depth": depth, "max_text_len": max_text_len}
        self.image_tower = ToyImageTower(nn.Linear(3 * image_size * image_size, width))
        self.text_tower = ToyTextTower(nn.Embedding(len(load_tokenizer("minilm")), width, padding_idx=0))
        self.fusion = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)

    @property
    def num_fusion_layers(self) -> int:
        return len(self.fusion)

    def image_transform(self, train: bool = False):
        from torchvision import transforms as T

        size = self.config["image_size"]
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])

    def tokenize(self, texts):
        enc = load_tokenizer("minilm")(list(texts), padding="longest", truncation=True,
                                       max_length=self.config["max_text_len"], return_tensors="pt")
        return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}

    def encode_images(self, images):
        return {"vector": self.image_tower(images)}

    def encode_texts(self, texts):
        return {"vector": self.text_tower(texts)}

    def score_feature_pairs(self, image_features, text_features):
        x, y = image_features["vector"], text_features["vector"]
        for layer in self.fusion:
            x = torch.tanh(layer(torch.cat([x, y], -1))) + x
        return self.head(x)[:, 0]

    def forward(self, images, texts):
        return self.score_pairs(images, texts)

    # -- what students take
    def unimodal_towers(self) -> Towers:
        size = self.config["image_size"]
        return Towers(FAMILY, self.image_tower, self.text_tower, dict(self.config),
                      {"tokenizer": "minilm", "max_text_len": self.config["max_text_len"], "image_size": size,
                       "image_mean": (0.5,) * 3, "image_std": (0.5,) * 3})

    def shrink(self, layers):
        small = copy.deepcopy(self)
        small.fusion = nn.ModuleList(small.fusion[i] for i in layers)
        small.config["depth"] = len(layers)
        return small

    def save_pretrained(self, directory):
        save_weights(Path(directory) / "model.safetensors", self.state_dict())
        write_json(Path(directory) / "config.json", {"family": FAMILY, **self.config})
        return Path(directory)


@teachers.register_teacher(FAMILY)
def create_toy(checkpoint=None, config=None, **fields):
    if checkpoint is not None:
        config = {k: v for k, v in read_json(Path(checkpoint) / "config.json").items() if k != "family"}
        model = ToyTwoStream(**config)
        model.load_state_dict(load_weights(Path(checkpoint) / "model.safetensors"))
        return model
    return ToyTwoStream(**{**(config or {}), **fields})


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    path = build_synthetic(tmp_path_factory.mktemp("synthetic"), sizes=(16, 2, 4), image_size=32)
    return load_karpathy(path, split="train")


def _distil(teacher, student, split, steps=2):
    """A couple of DCD steps; returns the loss of each."""
    distiller = dcd.wrap(teacher, student, captions=split.captions, caption_image=split.caption_image_tensor(),
                         num_negatives=4, num_hard=2)
    pairs = TrainPairs(split, distiller.transforms())
    optimiser = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        batch = distiller.collate()([pairs[(i + step) * 5] for i in range(6)])
        out = distiller(batch)
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
        losses.append(float(out["loss"].detach()))
    return losses


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_third_teacher_family_gets_fusion_and_dual_students(split, tmp_path):
    assert FAMILY in teachers.list_teachers()
    teacher = teachers.create_teacher(FAMILY, depth=3)
    teacher_before = _state(teacher)

    fusion = students.create_student("fusion", teacher=teacher)
    assert fusion.teacher_family == FAMILY and fusion.layers == (0, 2)  # half the layers, first to last
    assert not any(p.requires_grad for p in fusion.model.image_tower.parameters())  # the family's fusion_frozen
    dual = students.create_student("dual", teacher=teacher, embed_dim=8)
    assert dual.config.image_tower == dual.config.text_tower == FAMILY and dual.config.image_size == 8
    assert torch.equal(dual.visual.pixels.weight, teacher.model.image_tower.pixels.weight)

    for student in (fusion, dual):
        before = {n: p.clone() for n, p in student.named_parameters() if p.requires_grad}
        losses = _distil(teacher, student, split)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(p, before[n]) for n, p in student.named_parameters() if n in before)
    assert _same(teacher_before, teacher.state_dict())  # the teacher never trains

    # saved and read back through the registry: no module of the family named anywhere
    images = teacher.collate_images([teacher.image_transform()(split_image) for split_image in _images(split, 3)])
    texts = teacher.tokenize(split.captions[:4])
    for student, name in ((fusion.eval(), "fusion"), (dual.eval(), "dual")):
        student.save_pretrained(tmp_path / name)
        loaded = students.load_student(tmp_path / name).eval()
        student_texts = student.tokenize(split.captions[:4])
        with torch.no_grad():
            torch.testing.assert_close(loaded.score(images, student_texts), student.score(images, student_texts))
    teacher.model.save_pretrained(tmp_path / "teacher")
    assert teachers.saved_family(tmp_path / "teacher") == FAMILY
    again = teachers.create_model(teachers.saved_family(tmp_path / "teacher"), checkpoint=tmp_path / "teacher")
    assert _same(again.state_dict(), teacher.model.state_dict())
    with torch.no_grad():
        assert teacher.score(images, texts).shape == (3, 4)


def _images(split, n):
    from PIL import Image

    return [Image.open(split.image_paths[i]) for i in range(n)]


def test_students_and_benchmarks_import_no_teacher_family():
    """The seam: students/ and benchmarks/ reach a teacher family only through teachers/__init__ and base."""
    family_modules = re.compile(r"teachers\.(meter|vilt)|import_module\(f?[\"']teachers\.")
    sources = [*ROOT.joinpath("students").rglob("*.py"), *ROOT.joinpath("benchmarks").rglob("*.py"),
               *ROOT.joinpath("dcd", "bench").rglob("*.py")]
    assert sources
    offenders = [f"{p.relative_to(ROOT)}:{n}" for p in sources
                 for n, line in enumerate(p.read_text().splitlines(), 1) if family_modules.search(line)]
    assert not offenders, offenders


# ============================================================================================ the Registry
def test_registry_register_create_list_and_one_error_format():
    things = Registry("thing", hint="(add one with register_thing)")

    @things.register("b-small")
    def small(width=1):
        return ("small", width)

    things.register("a-large", lambda: "large")
    things.alias("b_small", "b-small")
    assert things.list() == ["a-large", "b-small"] and "b_small" in things and "nope" not in things
    assert things.create("b-small", width=3) == ("small", 3) and things.get("b-small") is small
    with pytest.warns(DeprecationWarning, match="'b_small' is deprecated: use 'b-small'"):
        assert things.create("b_small") == ("small", 1)
    with pytest.raises(UnknownName) as err:
        things.get("c")
    assert str(err.value) == "unknown thing 'c'; registered: a-large, b-small (add one with register_thing)"
    with pytest.raises(ValueError, match="already registered"):
        things.register("a-large", lambda: "other")
    things.register("a-large", small, replace=True)
    assert things.get("a-large") is small


def test_every_registry_speaks_the_same_error():
    with pytest.raises(KeyError, match=r"^unknown teacher 'nope'; registered: meter, "):
        teachers.create_teacher("nope")
    with pytest.raises(KeyError, match=r"^unknown student 'nope'; registered: dual, "):
        students.create_student("nope")
    from dcd.data import DATA_SETS

    with pytest.raises(KeyError, match=r"^unknown data set 'nope'; registered: coco, flickr30k, synthetic"):
        DATA_SETS.get("nope")


def test_deprecated_student_name_still_builds():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = students.create_student("dual_test", pretrained=False)
    assert model.config.embed_dim == 16 and any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert "dual_test" not in students.list_students()


def test_dcd_list_prints_what_is_registered(capsys):
    from dcd import cli

    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for line in ("teachers:", "students:", "student families:", "data sets:"):
        assert line in out
    for name in ("meter", "vilt", "dual-minilm1-vit128x2", "fusion", "synthetic", "coco"):
        assert re.search(rf"^\s+{re.escape(name)}\b", out, re.M), name
    assert "dual_test -> dual-bert32x1-vit32x1 (deprecated)" in out
