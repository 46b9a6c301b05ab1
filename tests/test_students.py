"""Students: the dual encoder, the fusion cross-encoder and the registry (all tiny, CPU, offline)."""
import copy
import json
import math

import pytest
import torch
from PIL import Image

import students
import teachers
from students import DualEncoder, DualEncoderConfig, FusionStudent, create_student, load_student
from students.dual import dual_test
from students.fusion import default_fusion_layers, register_fusion_family, validate_layers
from teachers.base import Teacher

CAPTIONS = ["a dog runs on the grass", "two people ride bicycles down a busy street", "a cat", "a red bus"]


def _images(n: int, size: int) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "pixel_mask": torch.ones(n, size, size).long()}


def _ptrs(module: torch.nn.Module) -> set:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers()) if t.numel()}


# ============================================================================================ dual encoder
@pytest.fixture
def dual():
    return dual_test().eval()


def test_dual_shapes_normalised_and_scores_compose(dual):
    images, texts = _images(3, 32), dual.tokenize(CAPTIONS)
    img, txt = dual.encode_images(images), dual.encode_texts(texts)
    assert img["embedding"].shape == (3, 16) and txt["embedding"].shape == (4, 16)
    torch.testing.assert_close(img["embedding"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt["embedding"].norm(dim=-1), torch.ones(4))
    scores = dual.score(images, texts)
    assert scores.shape == (3, 4)
    torch.testing.assert_close(scores, dual.score_features(img, txt))
    torch.testing.assert_close(scores, math.exp(dual.config.init_logit_scale) * img["embedding"] @ txt["embedding"].T)
    three = {k: v[:3] for k, v in texts.items()}
    torch.testing.assert_close(dual.score_pairs(images, three), scores[:, :3].diagonal())


def test_dual_tokenize_pads_to_longest_and_truncates(dual):
    out = dual.tokenize(["short", "word " * 100])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].shape == (2, dual.config.max_text_len) and out["input_ids"].dtype == torch.long
    assert dual.tokenize(["a b", "a"])["input_ids"].shape[1] == 4  # [CLS] a b [SEP], not max_length


def test_dual_image_transform(dual):
    image = Image.new("RGBA", (50, 40), (255, 0, 0, 255))
    x = dual.image_transform()(image)
    assert x.shape == (3, 32, 32)
    batch = dual.collate_images([x, x])
    assert dual.encode_images(batch)["embedding"].shape == (2, 16)


def test_dual_gradients_reach_both_towers_and_scale(dual):
    dual.train()
    images, texts = _images(4, 32), dual.tokenize(CAPTIONS)
    logits = dual.score(images, texts)
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for module in (dual.visual, dual.text, dual.image_projection, dual.text_projection):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads), type(module).__name__
        assert any(g.abs().sum() > 0 for g in grads)
    assert dual.logit_scale.grad is not None and dual.logit_scale.grad.abs() > 0


def test_dual_logit_scale_clamped(dual):
    with torch.no_grad():
        dual.logit_scale.fill_(10.0)
    assert dual.scale().item() == pytest.approx(100.0)
    with torch.no_grad():
        dual.logit_scale.fill_(-3.0)
    assert dual.scale().item() == pytest.approx(1.0)


def test_dual_save_load_round_trip(dual, tmp_path):
    with torch.no_grad():
        dual.logit_scale.fill_(3.0)
    dual.save_pretrained(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["family"] == "dual" and config["embed_dim"] == 16
    assert not list((tmp_path / "s").glob("*.tmp"))
    for loaded in (DualEncoder.from_pretrained(tmp_path / "s"), load_student(tmp_path / "s")):
        assert isinstance(loaded, DualEncoder)
        loaded.eval()
        images, texts = _images(2, 32), dual.tokenize(CAPTIONS)
        assert torch.equal(loaded.score(images, texts), dual.score(images, texts))
        assert loaded.config == dual.config


def test_dual_load_errors_name_what_is_missing(dual, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DualEncoder.from_pretrained(tmp_path)
    dual.save_pretrained(tmp_path / "s")
    (tmp_path / "s" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        DualEncoder.from_pretrained(tmp_path / "s")
    dual.save_pretrained(tmp_path / "t")
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "embed_dimm": 3}))
    with pytest.raises(KeyError, match="embed_dimm"):
        DualEncoder.from_pretrained(tmp_path / "t")
    (tmp_path / "t" / "config.json").write_text(json.dumps({**config, "family": "fusion"}))
    with pytest.raises(ValueError, match="fusion"):
        DualEncoder.from_pretrained(tmp_path / "t")
    del config["family"]
    (tmp_path / "t" / "config.json").write_text(json.dumps(config))
    with pytest.raises(KeyError, match="family"):
        load_student(tmp_path / "t")


def test_dual_config_json_round_trip_and_validation():
    config = DualEncoderConfig(text_layers=2, image_mean=[0.1, 0.2, 0.3])
    again = DualEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.image_mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match="img_size"):
        DualEncoderConfig(image_size=96)
    with pytest.raises(ValueError, match="meter_config"):
        DualEncoderConfig(image_tower="meter")


def test_dual_packaged_minilm_truncated_loads_offline():
    from safetensors.torch import load_file

    from teachers.tokenizers import minilm_path

    model = DualEncoder(DualEncoderConfig(
        timm_kwargs={"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}, image_size=32,
        text_layers=1, text_pooling="mean", embed_dim=8,
    )).eval()
    bert = model.text.model
    assert len(bert.encoder.layer) == 1 and model.config.text_config["num_hidden_layers"] == 1
    assert model.text.width == 384 and bert.pooler is None
    reference = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in reference if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(bert.encoder.layer[0].attention.self.query.weight, reference[key])
    assert model.encode_texts(model.tokenize(CAPTIONS[:2]))["embedding"].shape == (2, 8)


def test_dual_timm_tower_loads_local_checkpoint(tmp_path):
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **kwargs)
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    model = dual_test(image_checkpoint=str(tmp_path / "vit.pth"))
    assert torch.equal(model.visual.model.patch_embed.proj.weight, source.patch_embed.proj.weight)


def test_dual_from_vilt_refused_clearly():
    class FakeViLT(torch.nn.Module):
        family = "vilt"

    with pytest.raises(NotImplementedError, match="single-stream"):
        DualEncoder.from_teacher(FakeViLT())


# ============================================================================================ registry
def test_small_dual_is_smaller_than_the_embedded_teacher_in_every_tower():
    from teachers.meter import METER, METERConfig

    small = create_student(students.SMALL_DUAL, pretrained=False)
    teacher = METER(METERConfig.preset("minilm2-vit128x4"))
    assert len(small.visual.model.blocks) < teacher.config.vision_layers
    assert small.visual.width <= teacher.config.vision_width
    assert small.config.text_layers < teacher.config.text_config["num_hidden_layers"]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    # its position table starts as the 2-D sin-cos table, as the teacher's does
    from teachers.position_tables import sincos_2d

    assert torch.allclose(small.visual.model.pos_embed[0], sincos_2d(4, 128))


def test_registry_create_list_and_unknown():
    assert {"dual", "dual-minilm6-vit192x4", "dual-bert32x1-vit32x1", "fusion", students.SMALL_DUAL} <= set(
        students.list_students())
    model = create_student("dual", **dual_test().config.to_dict())
    assert isinstance(model, DualEncoder) and model.config.embed_dim == 16
    with pytest.raises(KeyError, match="dual, dual-bert32x1-vit32x1, dual-minilm1-vit128x2, dual-minilm2"):
        create_student("no-such-student")
    with pytest.raises(ValueError, match="teacher"):
        create_student("fusion")


def test_registry_register_student():
    @students.register_student("test-custom-dual")
    def build(teacher=None, **config):
        return dual_test(**config)

    assert "test-custom-dual" in students.list_students()
    assert create_student("test-custom-dual", embed_dim=4).config.embed_dim == 4
    with pytest.raises(ValueError, match="already registered"):
        students.register_student("test-custom-dual")(lambda teacher=None: None)


# ============================================================================================ fusion helpers
def test_default_fusion_layers():
    assert default_fusion_layers(6) == (0, 3, 5)  # DCD's METER student
    assert default_fusion_layers(3) == (0, 2)
    assert default_fusion_layers(4) == (0, 3)
    assert default_fusion_layers(5) == (0, 2, 4)
    assert default_fusion_layers(2) == (0,)
    assert default_fusion_layers(12) == (0, 2, 4, 7, 9, 11)
    with pytest.raises(ValueError, match="out of range"):
        validate_layers((0, 6), 6)
    with pytest.raises(ValueError, match="increasing"):
        validate_layers((3, 0), 6)
    with pytest.raises(ValueError, match="empty"):
        validate_layers((), 6)


# ============================================================================================ fusion, contract
class ToyCrossEncoder(teachers.Scorer):
    """The smallest cross-encoder with the contract FusionStudent relies on (towers, fusion layers, shrink)."""

    family = "toy-cross"

    def __init__(self, depth: int = 4, width: int = 8):
        super().__init__()
        self.depth, self.width = depth, width
        self.vit_model = torch.nn.Linear(3 * 4 * 4, width)
        self.text_transformer = torch.nn.Embedding(50, width)
        self.cross_modal_text_layers = torch.nn.ModuleList(torch.nn.Linear(2 * width, width) for _ in range(depth))
        self.rank_output = torch.nn.Linear(width, 1)

    def encode_images(self, images):
        return {"tokens": self.vit_model(images["pixel_values"].flatten(1))}

    def encode_texts(self, texts):
        return {"tokens": self.text_transformer(texts["input_ids"]).mean(1)}

    def score_feature_pairs(self, image_features, text_features):
        x, y = image_features["tokens"], text_features["tokens"]
        for layer in self.cross_modal_text_layers:
            x = torch.tanh(layer(torch.cat([x, y], -1)))
        return self.rank_output(x).squeeze(-1)

    def shrink(self, layer_indices):
        out = copy.deepcopy(self)
        out.cross_modal_text_layers = torch.nn.ModuleList(out.cross_modal_text_layers[i] for i in layer_indices)
        out.depth = len(layer_indices)
        return out

    def save_pretrained(self, directory):
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "toy.json").write_text(json.dumps({"depth": self.depth, "width": self.width}))
        torch.save(self.state_dict(), directory / "toy.pt")

    @classmethod
    def from_pretrained(cls, directory):
        model = cls(**json.loads((directory / "toy.json").read_text()))
        model.load_state_dict(torch.load(directory / "toy.pt", weights_only=True))
        return model


def _toy_inputs(n: int = 3):
    g = torch.Generator().manual_seed(5)
    return {"pixel_values": torch.randn(n, 3, 4, 4, generator=g)}, {"input_ids": torch.randint(0, 50, (n, 5), generator=g)}


def _check_fusion_student(teacher_model, student, trainable_prefixes, frozen_prefixes, images, texts, steps=3):
    """Shared checks: no shared storage, frozen parts frozen, training the student leaves the teacher intact."""
    raw = teacher_model.model if isinstance(teacher_model, Teacher) else teacher_model
    assert not (_ptrs(student) & _ptrs(raw)), "student shares storage with the teacher"
    for name, p in student.model.named_parameters():
        if any(name.startswith(f) for f in frozen_prefixes):
            assert not p.requires_grad, name
        if any(name.startswith(t) for t in trainable_prefixes):
            assert p.requires_grad, name
    assert student.trainable_parameters() and all(p.requires_grad for p in student.trainable_parameters())
    before = {k: v.clone() for k, v in raw.state_dict().items()}
    frozen_before = {n: p.clone() for n, p in student.model.named_parameters() if not p.requires_grad}
    trainable_before = {n: p.clone() for n, p in student.named_trainable_parameters()}
    optimiser = torch.optim.AdamW(student.trainable_parameters(), lr=1e-2)
    student.train()
    for _ in range(steps):
        logits = student.score(images, texts)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(logits)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    after = raw.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    for n, p in student.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p, frozen_before[n]), f"frozen {n} changed"
    assert any(not torch.equal(p, trainable_before[n]) for n, p in student.named_trainable_parameters())


def test_fusion_contract_with_toy_cross_encoder(tmp_path):
    register_fusion_family("toy-cross", ToyCrossEncoder, frozen=("vit_model", "text_transformer"))
    teacher = Teacher(ToyCrossEncoder(depth=4))
    student = FusionStudent.from_teacher(teacher)
    assert student.layers == (0, 3) and len(student.model.cross_modal_text_layers) == 2
    for mine, theirs in zip(student.model.cross_modal_text_layers, [teacher.model.cross_modal_text_layers[i] for i in (0, 3)]):
        assert torch.equal(mine.weight, theirs.weight)
    torch.testing.assert_close(student.model.rank_output.weight, teacher.model.rank_output.weight)
    images, texts = _toy_inputs(4)
    _check_fusion_student(teacher, student, ("cross_modal", "rank_output"), ("vit_model", "text_transformer"), images, texts)
    assert not student.model.vit_model.training and student.model.rank_output.training  # frozen stay in eval
    with pytest.raises(ValueError, match="out of range"):
        FusionStudent.from_teacher(teacher, layers=(0, 4))

    student.eval()
    student.save_pretrained(tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["family"] == "fusion" and config["teacher_family"] == "toy-cross" and config["layers"] == [0, 3]
    loaded = load_student(tmp_path / "f").eval()
    assert isinstance(loaded, FusionStudent) and loaded.layers == (0, 3)
    assert torch.equal(loaded.score(images, texts), student.score(images, texts))
    assert not any(p.requires_grad for p in loaded.model.vit_model.parameters())
    assert all(p.requires_grad for p in loaded.model.rank_output.parameters())
    with pytest.raises(TypeError, match="from_teacher"):
        FusionStudent(teacher)
    (tmp_path / "f" / "config.json").write_text(json.dumps({"family": "fusion", "layers": [0]}))
    with pytest.raises(KeyError, match="teacher_family"):
        load_student(tmp_path / "f")
    (tmp_path / "f" / "config.json").write_text(json.dumps({**config, "teacher_family": "nope"}))
    with pytest.raises(KeyError, match="no fusion student for teacher family 'nope'"):
        load_student(tmp_path / "f")


def test_fusion_refuses_non_cross_encoders(dual):
    with pytest.raises(TypeError, match="shrink"):
        FusionStudent.from_teacher(dual)


# ============================================================================================ METER teacher
@pytest.fixture(scope="module")
def meter_teacher():
    from teachers.meter import meter_preset

    torch.manual_seed(11)
    return Teacher(meter_preset("roberta32x1-vit32x2"))  # 3 co-attention layers per stream, 32 px, 32 wide


def _meter_inputs(teacher, n=3):
    g = torch.Generator().manual_seed(7)
    return {"pixel_values": torch.randn(n, 3, 32, 32, generator=g)}, teacher.tokenize(CAPTIONS[:n])


def test_dual_from_meter_copies_towers(meter_teacher, tmp_path):
    meter = meter_teacher.model
    dual = DualEncoder.from_teacher(meter_teacher, embed_dim=8)
    assert dual.config.image_tower == dual.config.text_tower == "meter"
    assert dual.config.tokenizer == meter.config.tokenizer and dual.config.image_size == meter.config.image_size
    assert dual.config.image_mean == tuple(meter.config.image_mean)
    pairs = [(dual.visual.vit_model, meter.vit_model), (dual.text.text_transformer, meter.text_transformer),
             (dual.visual.cross_modal_image_transform, meter.cross_modal_image_transform),
             (dual.text.cross_modal_text_transform, meter.cross_modal_text_transform)]
    for mine, theirs in pairs:
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (_ptrs(dual) & _ptrs(meter))
    assert all(p.requires_grad for p in dual.parameters()) and dual.training

    dual.eval()
    images, texts = _meter_inputs(meter_teacher)
    assert torch.equal(texts["input_ids"], dual.tokenize(CAPTIONS[:3])["input_ids"])
    with torch.no_grad():  # the towers compute what the teacher's towers compute (class / <s> token)
        image_cls = meter.cross_modal_image_transform(meter.vit_model(images["pixel_values"]))[:, 0]
        torch.testing.assert_close(dual.visual(images), image_cls)
        text_tokens = meter_teacher.encode_texts(texts)["tokens"] - meter.token_type_embeddings.weight[0]
        torch.testing.assert_close(dual.text(texts), text_tokens[:, 0])
    scores = dual.score(images, texts)
    dual.save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["meter_config"]["hidden_size"] == 32
    loaded = load_student(tmp_path / "d").eval()
    assert torch.equal(loaded.score(images, texts), scores)
    assert create_student("dual", teacher=meter_teacher, embed_dim=8).config.image_tower == "meter"


def test_fusion_from_meter(meter_teacher, tmp_path):
    meter = meter_teacher.model
    student = FusionStudent.from_teacher(meter_teacher, layers=(0, 2))
    inner = student.model
    assert student.teacher_family == "meter" and student.layers == (0, 2) and inner.num_fusion_layers == 2
    for stream in ("cross_modal_text_layers", "cross_modal_image_layers"):
        for mine, i in zip(getattr(inner, stream), (0, 2)):
            a, b = mine.state_dict(), getattr(meter, stream)[i].state_dict()
            assert all(torch.equal(a[k], b[k]) for k in a)
    for name in ("rank_output", "cross_modal_text_pooler", "cross_modal_image_pooler", "vit_model"):
        a, b = inner.get_submodule(name).state_dict(), meter.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    frozen = ("vit_model", "text_transformer", "cross_modal_image_transform", "cross_modal_text_transform",
              "token_type_embeddings", "itm_score")
    images, texts = _meter_inputs(meter_teacher)
    _check_fusion_student(meter_teacher, student, ("cross_modal_text_layers", "cross_modal_image_layers",
                                                   "cross_modal_text_pooler", "rank_output"), frozen, images, texts)
    assert not inner.vit_model.training and inner.cross_modal_text_layers.training
    trainable = {n.split(".")[0] for n, p in inner.named_parameters() if p.requires_grad}
    assert trainable == {"cross_modal_image_layers", "cross_modal_text_layers", "cross_modal_image_pooler",
                         "cross_modal_text_pooler", "rank_output"}

    assert FusionStudent.from_teacher(meter).layers == (0, 2)  # raw architecture; default for 3 layers
    with pytest.raises(ValueError, match="out of range"):
        FusionStudent.from_teacher(meter, layers=(0, 3))

    student.eval()
    scores = student.score(images, texts)
    torch.testing.assert_close(scores.diagonal(), student.score_pairs(images, texts))
    student.save_pretrained(tmp_path / "f")
    config = json.loads((tmp_path / "f" / "config.json").read_text())
    assert config["family"] == "fusion" and config["teacher_family"] == "meter" and config["layers"] == [0, 2]
    loaded = load_student(tmp_path / "f").eval()
    assert isinstance(loaded, FusionStudent) and loaded.frozen == frozen
    assert torch.equal(loaded.score(images, texts), scores)
    assert not any(p.requires_grad for p in loaded.model.vit_model.parameters())
    assert all(p.requires_grad for p in loaded.model.cross_modal_text_layers.parameters())
