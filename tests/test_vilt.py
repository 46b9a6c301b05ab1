"""ViLT teacher: HF equivalence, cached block scoring, original checkpoints, preprocessing, freezing."""
import pytest
import torch
from PIL import Image
from transformers import ViltForImageAndTextRetrieval

import students
import teachers
from teachers.meter_checkpoint import CheckpointError
from teachers.vilt import PRESETS, convert_original_state_dict, vilt_base, vilt_test

CAPTIONS = ["a red circle left of a blue square", "a small green triangle", "two shapes"]


def _images(n=2, size=32):
    return {"pixel_values": torch.randn(n, 3, size, size), "pixel_mask": torch.ones(n, size, size, dtype=torch.long)}


def _to_original(hf_state):
    """Invert the key map: what an original ViLT Lightning checkpoint of this model holds."""
    original = {}
    layers = {}
    for key, value in hf_state.items():
        if key.startswith("vilt.embeddings.text_embeddings."):
            original[key[len("vilt.embeddings."):]] = value
        elif key.startswith("vilt.encoder.layer."):
            idx, rest = key[len("vilt.encoder.layer."):].split(".", 1)
            names = {"layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
                     "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
            module, kind = rest.rsplit(".", 1)
            if module.startswith("attention.attention."):
                layers.setdefault((idx, kind), {})[module.split(".")[-1]] = value
            else:
                original[f"transformer.blocks.{idx}.{names[module]}.{kind}"] = value
        else:
            direct = {"vilt.embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
                      "vilt.embeddings.cls_token": "transformer.cls_token",
                      "vilt.embeddings.position_embeddings": "transformer.pos_embed",
                      "vilt.embeddings.patch_embeddings.projection.weight": "transformer.patch_embed.proj.weight",
                      "vilt.embeddings.patch_embeddings.projection.bias": "transformer.patch_embed.proj.bias",
                      "vilt.layernorm.weight": "transformer.norm.weight", "vilt.layernorm.bias": "transformer.norm.bias",
                      "vilt.pooler.dense.weight": "pooler.dense.weight", "vilt.pooler.dense.bias": "pooler.dense.bias"}
            original[direct.get(key, key)] = value
    for (idx, kind), parts in layers.items():
        original[f"transformer.blocks.{idx}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    original["itm_score.fc.weight"] = torch.zeros(2, 4)  # a leftover head, tolerated
    return original


def test_save_pretrained_dir_loads_and_matches_hf_directly(tmp_path):
    torch.manual_seed(0)
    hf = ViltForImageAndTextRetrieval(vilt_test().config).eval()
    hf.save_pretrained(tmp_path / "vilt")
    teacher = teachers.create_teacher("vilt", checkpoint=str(tmp_path / "vilt"))
    images, texts = _images(3), teacher.tokenize(CAPTIONS)
    with torch.no_grad():
        direct = hf(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                    pixel_values=images["pixel_values"], pixel_mask=images["pixel_mask"]).logits[:, 0]
    assert torch.allclose(teacher.score_pairs(images, texts), direct, atol=1e-5)


def test_block_scoring_equals_per_pair_scoring():
    torch.manual_seed(0)
    model = vilt_test().eval()
    images, texts = _images(2), model.tokenize(CAPTIONS)
    with torch.no_grad():
        block = model.score(images, texts)
        naive = model.score_naive(images, texts)
        pairs = torch.stack([model.forward_naive({k: v[i:i + 1] for k, v in images.items()},
                                                 {k: v[j:j + 1] for k, v in texts.items()})[0]
                             for i in range(2) for j in range(3)]).view(2, 3)
    assert block.shape == (2, 3)
    assert torch.allclose(block, naive, atol=1e-5) and torch.allclose(block, pairs, atol=1e-5)


def test_original_lightning_checkpoint_loads_with_key_map(tmp_path):
    torch.manual_seed(0)
    model = vilt_test().eval()
    original = _to_original(model.hf.state_dict())
    torch.save({"state_dict": original, "epoch": 3}, tmp_path / "vilt_irtr_test.ckpt")
    loaded = teachers.create_model("vilt", checkpoint=tmp_path / "vilt_irtr_test.ckpt",
                                   **{k: v for k, v in PRESETS["test"].items() if k != "num_hidden_layers"}).eval()
    images, texts = _images(2), model.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(loaded.score(images, texts), model.score(images, texts), atol=1e-6)
    converted, unmapped = convert_original_state_dict(original)
    assert not unmapped and "vilt.encoder.layer.1.attention.attention.value.bias" in converted
    broken = dict(original)
    del broken["transformer.blocks.0.mlp.fc1.weight"]
    torch.save({"state_dict": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="vilt.encoder.layer.0.intermediate.dense.weight"):
        teachers.create_model("vilt", checkpoint=tmp_path / "broken.ckpt",
                              **{k: v for k, v in PRESETS["test"].items() if k != "num_hidden_layers"})
    broken["transformer.blocks.0.attn.weird.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, tmp_path / "weird.ckpt")
    with pytest.raises(CheckpointError, match="attn.weird"):
        teachers.create_model("vilt", checkpoint=tmp_path / "weird.ckpt")


def test_official_preprocessing_on_real_jpegs(tmp_path):
    Image.new("RGB", (500, 300), (255, 0, 0)).save(tmp_path / "wide.jpg")
    Image.new("RGB", (300, 1200), (0, 0, 255)).save(tmp_path / "tall.jpg")
    transform = vilt_base().image_transform()
    wide = transform(Image.open(tmp_path / "wide.jpg"))
    # official MinMaxResize: 300x500 -> 384x640, longer side capped at 639 -> 383x639, floored to 32: 352x608
    assert wide.shape == (3, 352, 608)
    tall = transform(Image.open(tmp_path / "tall.jpg"))
    assert tall.shape[1] <= 640 and tall.shape[1] % 32 == 0 and tall.shape[2] % 32 == 0
    assert wide[0].mean().item() == pytest.approx(1.0, abs=0.02) and wide[2].mean().item() == pytest.approx(-1.0, abs=0.02)
    model = vilt_test()
    ids = model.tokenize(["word " * 100])["input_ids"]
    assert ids.shape[1] == 40


def test_teacher_frozen_and_bit_identical_after_fusion_student_training():
    teacher = teachers.create_teacher("vilt", preset="test")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training
    student = students.create_student("fusion", teacher=teacher, layers=(1,))
    params = [p for p in student.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    images, texts = _images(2), student.tokenize(CAPTIONS[:2])
    for _ in range(3):
        loss = student.score(images, texts).logsumexp(1).mean() - student.score_pairs(images, texts).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_shrink_and_save_round_trip(tmp_path):
    torch.manual_seed(0)
    model = vilt_test().eval()
    small = model.shrink([1])
    assert small.num_fusion_layers == 1
    assert torch.equal(small.hf.vilt.encoder.layer[0].output.dense.weight, model.hf.vilt.encoder.layer[1].output.dense.weight)
    assert small.hf.vilt.encoder.layer[0].output.dense.weight.data_ptr() != model.hf.vilt.encoder.layer[1].output.dense.weight.data_ptr()
    small.save_pretrained(tmp_path / "small")
    again = type(small).from_pretrained(tmp_path / "small").eval()
    images, texts = _images(2), model.tokenize(CAPTIONS)
    with torch.no_grad():
        assert torch.allclose(again.score(images, texts), small.score(images, texts), atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        model.shrink([5])


def test_raw_hf_model_is_wrapped_by_its_hook():
    hf = ViltForImageAndTextRetrieval(vilt_test().config)
    teacher = teachers.as_teacher(hf)
    assert teacher.family == "vilt" and not any(p.requires_grad for p in hf.parameters())
