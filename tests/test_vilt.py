"""ViLT teacher: HF equivalence, cached block scoring, original checkpoints, preprocessing, freezing, shrink."""
import pytest
import torch
from PIL import Image
from transformers import ViltForImageAndTextRetrieval, ViltModel

import students
import teachers
from teachers.meter_checkpoint import CheckpointError
from teachers.vilt import (PRESETS, ViLT, convert_original_state_dict, original_state_dict, vilt_preset)

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "two shapes"]
TEST_SHAPES = {k: v for k, v in PRESETS["vit32x2"].items() if k == "num_attention_heads"}  # not in the tensor shapes


def _spread(model, scale=0.3, seed=0):
    """Random weights far from the 0.02 init, so that logits differ between pairs and layers matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _images(n=2, size=32):
    g = torch.Generator().manual_seed(n)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g),
            "pixel_mask": torch.ones(n, size, size, dtype=torch.long)}


def _mixed_images():
    """Three images of different sizes, zero-padded to 32 x 48 with a pixel mask (as collate_images does)."""
    g = torch.Generator().manual_seed(7)
    pixels = torch.randn(3, 3, 32, 48, generator=g)
    mask = torch.ones(3, 32, 48, dtype=torch.long)
    mask[1, :, 32:] = 0
    mask[2, 16:, :] = 0
    return {"pixel_values": pixels * mask[:, None], "pixel_mask": mask}


def _hf_logits(hf, images, texts):
    with torch.no_grad():
        return hf(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                  pixel_values=images["pixel_values"], pixel_mask=images["pixel_mask"]).logits[:, 0]


def _to_original(hf_state):
    """Invert the key map independently of teachers.vilt: what an original Lightning checkpoint holds."""
    original, qkv = {}, {}
    names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
    direct = {"vilt.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
              "vilt.embeddings.cls_token": "transformer.cls_token",
              "vilt.embeddings.position_embeddings": "transformer.pos_embed",
              "vilt.embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
              "vilt.embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
              "vilt.layernorm.weight": "transformer.norm.weight", "vilt.layernorm.bias": "transformer.norm.bias",
              "vilt.pooler.dense.weight": "pooler.dense.weight", "vilt.pooler.dense.bias": "pooler.dense.bias"}
    for key, value in hf_state.items():
        if key.startswith("vilt.embeddings.text_embeddings."):
            original[key[len("vilt.embeddings."):]] = value
        elif key.startswith("vilt.encoder.layer."):
            idx, rest = key[len("vilt.encoder.layer."):].split(".", 1)
            module, kind = rest.rsplit(".", 1)
            if module.startswith("attention.attention."):
                qkv.setdefault((idx, kind), {})[module.split(".")[-1]] = value
            else:
                original[f"transformer.blocks.{idx}.{names[module]}.{kind}"] = value
        else:
            original[direct.get(key, key)] = value
    for (idx, kind), parts in qkv.items():
        original[f"transformer.blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    original["text_embeddings.position_ids"] = torch.arange(40)[None]  # a buffer of the original, tolerated
    original["itm_score.fc.weight"] = torch.zeros(2, 4)  # a leftover head, tolerated
    return original


def test_save_pretrained_dir_loads_and_matches_hf_directly(tmp_path):
    torch.manual_seed(0)
    hf = _spread(ViltForImageAndTextRetrieval(vilt_preset("vit32x2").config)).eval()
    hf.save_pretrained(tmp_path / "vilt")
    teacher = teachers.create_teacher("vilt", checkpoint=tmp_path / "vilt")
    assert isinstance(teacher.model, ViLT) and teacher.family == "vilt"
    texts = teacher.tokenize(CAPTIONS)
    for images in (_images(3), _mixed_images()):
        direct = _hf_logits(hf, images, texts)
        assert direct.std() > 0.05  # the pairs really differ
        assert torch.allclose(teacher.score_pairs(images, texts), direct, atol=1e-5)
        assert torch.allclose(teacher.model.score_pairs_naive(images, texts), direct, atol=1e-5)
    # a hub-format directory without the rank head (an MLM / base checkpoint) is refused, naming the key
    ViltModel(vilt_preset("vit32x2").config).save_pretrained(tmp_path / "base_only")
    with pytest.raises(CheckpointError, match="rank_output.weight"):
        teachers.create_teacher("vilt", checkpoint=tmp_path / "base_only")
    with pytest.raises(FileNotFoundError):
        teachers.create_teacher("vilt", checkpoint=tmp_path / "nowhere.ckpt")


def test_block_scoring_equals_per_pair_scoring():
    model = _spread(vilt_preset("vit32x2")).eval()
    model.pair_chunk = 4  # several chunks, one of them partial
    hf = model.hf
    images, texts = _mixed_images(), model.tokenize(CAPTIONS)
    with torch.no_grad():
        block = model.score(images, texts)
        naive = model.score_naive(images, texts, text_batch=2)
        pairs = model.score_pairs({k: v.repeat_interleave(3, 0) for k, v in images.items()},
                                  {k: v.repeat(3, 1) for k, v in texts.items()}).view(3, 3)
        one_by_one = torch.stack([
            _hf_logits(hf, {k: v[i:i + 1] for k, v in images.items()}, {k: v[j:j + 1] for k, v in texts.items()})[0]
            for i in range(3) for j in range(3)]).view(3, 3)
    assert block.shape == (3, 3) and block.std() > 0.05
    for other in (naive, pairs, one_by_one):
        assert torch.allclose(block, other, atol=1e-5)


def test_patch_choice_is_deterministic_and_leaves_the_rng_alone():
    model = _spread(vilt_preset("vit32x2", max_image_length=3)).eval()  # 2 x 3 patches, keep 3: a fixed, evenly spaced subset
    images = _mixed_images()
    state = torch.random.get_rng_state()
    first, second = model.encode_images(images), model.encode_images(images)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first["tokens"].shape[1] == 4 and torch.equal(first["tokens"], second["tokens"])
    assert first["mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]
    full = vilt_preset("vit32x2").eval().encode_images(images)  # max_image_length=-1: every valid patch (6, 4, 3)
    assert full["mask"].sum(1).tolist() == [7, 5, 4]


def test_original_lightning_checkpoint_loads_with_key_map(tmp_path):
    model = _spread(vilt_preset("vit32x2")).eval()
    original = _to_original(model.hf.state_dict())
    ours = original_state_dict(model.hf.state_dict())
    assert set(ours) == set(original) - {"itm_score.fc.weight", "text_embeddings.position_ids"}
    assert all(torch.equal(ours[k], original[k]) for k in ours)
    torch.save({"state_dict": original, "epoch": 3, "hyper_parameters": {"config": {"num_heads": 2}}},
               tmp_path / "vilt_irtr_test.ckpt")
    loaded = teachers.create_model("vilt", checkpoint=tmp_path / "vilt_irtr_test.ckpt").eval()
    for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size"):
        assert getattr(loaded.config, field) == PRESETS["vit32x2"][field], field
    converted, unmapped = convert_original_state_dict(original)
    assert not unmapped and "vilt.encoder.layer.1.attention.attention.value.bias" in converted
    assert set(converted) == set(model.hf.state_dict()) - {"vilt.embeddings.text_embeddings.position_ids"}
    images, texts = _mixed_images(), model.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(loaded.score(images, texts), model.score(images, texts), atol=1e-6)
    # a bare state dict with HF names (a hub pytorch_model.bin) loads too
    torch.save(model.hf.state_dict(), tmp_path / "pytorch_model.bin")
    again = teachers.create_model("vilt", checkpoint=tmp_path / "pytorch_model.bin", **TEST_SHAPES).eval()
    with torch.no_grad():
        assert torch.allclose(again.score(images, texts), model.score(images, texts), atol=1e-6)

    broken = dict(original)
    del broken["transformer.blocks.0.mlp.fc1.weight"]
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match=r"missing vilt\.encoder\.layer\.0\.intermediate\.dense\.weight"):
        teachers.create_model("vilt", checkpoint=tmp_path / "broken.ckpt", **TEST_SHAPES)
    weird = dict(original, **{"transformer.blocks.0.attn.weird.weight": torch.zeros(1)})
    torch.save({"state_dict": weird}, tmp_path / "weird.ckpt")
    with pytest.raises(CheckpointError, match=r"transformer\.blocks\.0\.attn\.weird\.weight"):
        teachers.create_model("vilt", checkpoint=tmp_path / "weird.ckpt", **TEST_SHAPES)
    with pytest.raises(CheckpointError, match=r"unexpected vilt\.encoder\.layer\.1\."):
        teachers.create_model("vilt", checkpoint=tmp_path / "vilt_irtr_test.ckpt", num_hidden_layers=1)


def test_official_preprocessing_on_real_jpegs(tmp_path):
    Image.new("RGB", (500, 300), (255, 0, 0)).save(tmp_path / "wide.jpg")
    Image.new("RGB", (300, 1200), (0, 0, 255)).save(tmp_path / "tall.jpg")
    Image.new("L", (64, 64), 128).save(tmp_path / "grey.jpg")
    model = vilt_preset("base")
    transform = model.image_transform(train=False)
    wide = transform(Image.open(tmp_path / "wide.jpg"))
    # official MinMaxResize: 300x500 -> 384x640, longer side capped at 639 -> 383x639, floored to 32: 352x608
    assert wide.shape == (3, 352, 608)
    tall = transform(Image.open(tmp_path / "tall.jpg"))
    assert tall.shape[1] <= 640 and tall.shape[1] % 32 == 0 and tall.shape[2] % 32 == 0
    assert wide[0].mean().item() == pytest.approx(1.0, abs=0.02) and wide[2].mean().item() == pytest.approx(-1.0, abs=0.02)
    assert -1.0 <= float(wide.min()) and float(wide.max()) <= 1.0
    batch = model.collate_images([wide, tall])
    assert batch["pixel_values"].shape == (2, 3, max(352, tall.shape[1]), max(608, tall.shape[2]))
    assert batch["pixel_mask"][0].sum() == 352 * 608

    tiny = vilt_preset("vit128x4")
    grey = tiny.image_transform(train=True)(Image.open(tmp_path / "grey.jpg"))
    assert grey.shape == (3, 64, 64)  # the synthetic data set's 64 px JPEGs keep their size

    enc = vilt_preset("vit32x2").tokenize(["word " * 100, "a cat"])
    assert enc["input_ids"].shape == (2, 40) and enc["input_ids"][0, 0] == 101 and enc["input_ids"][0, -1] == 102
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"} and not enc["token_type_ids"].any()
    assert enc["attention_mask"][1].sum() == 4  # [CLS] a cat [SEP], padded per batch


def test_teacher_frozen_and_bit_identical_after_fusion_student_training():
    teacher = teachers.create_teacher("vilt", preset="vit32x2")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    student = students.FusionStudent.from_teacher(teacher, layers=(1,))
    assert student.model.num_fusion_layers == 1 and student.teacher_family == "vilt"
    params = [p for p in student.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    images, texts = _images(2), student.tokenize(CAPTIONS[:2])
    for _ in range(3):
        with torch.no_grad():
            target = teacher.score(images, texts)
        loss = (student.score(images, texts) - target).pow(2).mean() - student.score_pairs(images, texts).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(student.model.hf.rank_output.weight, teacher.model.hf.rank_output.weight)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shrink_and_save_round_trip(tmp_path):
    model = _spread(vilt_preset("vit128x4", num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                              image_size=32)).eval()
    small = model.shrink([0, 2])
    assert small.num_fusion_layers == 2 and small.config.num_hidden_layers == 2 and model.num_fusion_layers == 3
    for new, old in ((0, 0), (1, 2)):
        for (name, a), b in zip(small.hf.vilt.encoder.layer[new].state_dict().items(),
                                model.hf.vilt.encoder.layer[old].state_dict().values()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert not {p.data_ptr() for p in small.parameters()} & {p.data_ptr() for p in model.parameters()}
    small.save_pretrained(tmp_path / "small")
    again = ViLT.from_pretrained(tmp_path / "small").eval()
    assert again.tokenizer_name == "minilm" and again.num_fusion_layers == 2
    images, texts = _images(2), model.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(again.score(images, texts), small.score(images, texts), atol=1e-6)
        assert not torch.allclose(small.score(images, texts), model.score(images, texts), atol=1e-3)
    with pytest.raises(ValueError, match="layers"):
        model.shrink([5])
    with pytest.raises(ValueError, match="layers"):
        model.shrink([2, 0])


def test_raw_hf_model_is_wrapped_by_its_hook():
    hf = ViltForImageAndTextRetrieval(vilt_preset("vit32x2").config)
    teacher = teachers.as_teacher(hf)
    assert teacher.family == "vilt" and isinstance(teacher.model, ViLT) and teacher.model.hf is hf
    assert not any(p.requires_grad for p in hf.parameters())


def test_unimodal_summary_ignores_padding_and_trains_the_shared_layers():
    """The embedded teacher's contrastive warm-up runs each modality alone through ViLT's layers."""
    model = _spread(vilt_preset("vit32x2")).eval()
    texts = model.encode_texts(model.tokenize(["a red circle left of a blue square", "a cat"]))
    alone = model.encode_texts(model.tokenize(["a cat"]))
    together = model.unimodal_summary(texts)
    assert together.shape == (2, model.config.hidden_size)
    assert torch.allclose(together[1], model.unimodal_summary(alone)[0], atol=1e-5)  # padding is masked out
    assert not torch.allclose(together[0], together[1])
    model.train()
    images = model.encode_images(torch.randn(2, 3, 32, 32))
    model.unimodal_summary(images).pow(2).sum().backward()
    grad = model.hf.vilt.encoder.layer[0].attention.attention.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_presets_are_named_by_size_and_the_old_names_still_resolve():
    assert {"base", "vit128x4", "vit32x2"} <= set(PRESETS.list())
    for old, new in (("tiny", "vit128x4"), ("test", "vit32x2")):
        with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated: use '{new}'"):
            assert PRESETS[old] == PRESETS[new]
