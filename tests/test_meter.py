"""METER teacher: cached scoring == the naive full forward, official checkpoint format, preprocessing,
save/load, shrink. Tiny random models (preset ``roberta32x1-vit32x2``: 32 px, width 32) so the file runs in seconds."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import teachers
from teachers.base import Scorer, Teacher
from teachers.meter_checkpoint import config_from_checkpoint
from teachers.meter import (
    CLIP_MEAN, CLIP_STD, METER, CheckpointError, METERConfig, create_meter, load_official_checkpoint, meter_preset,
)

ATOL = 1e-5  # fp32; scores are O(1) after _spread, so this is ~1e-5 relative
CAPTIONS = [
    "a dog",
    "two cats sitting on a red sofa next to an open window",
    "a man rides a bicycle down a busy street while it rains",
    "kitchen",
]


@torch.no_grad()
def _spread(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-randomise so that activations and scores are O(1) and differ from pair to pair."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.copy_(noise / math.sqrt(fan_in))
        elif name.endswith("LayerNorm.weight") or ".ln_" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)
    return model


def _model(seed=0, **overrides) -> METER:
    torch.manual_seed(seed)
    return _spread(meter_preset("roberta32x1-vit32x2", **overrides), seed).eval()


def _images(model: METER, n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    return {"pixel_values": torch.randn(n, 3, s, s, generator=g), "pixel_mask": torch.ones(n, s, s, dtype=torch.long)}


# --------------------------------------------------------------------------------------------- scoring
def test_cached_score_equals_naive_full_forward_per_pair():
    model = _model()
    images, texts = _images(model, 3), model.tokenize(CAPTIONS)
    assert texts["attention_mask"].sum(1).tolist() != [texts["input_ids"].shape[1]] * 4  # padding is exercised
    with torch.no_grad():
        cached = model.score(images, texts)
        naive = model.score_naive(images, texts, text_batch=3)  # whole model per pair, as METER's evaluation
        generic = Scorer.score_features(model, model.encode_images(images), model.encode_texts(texts))
        one_by_one = torch.tensor([[float(model.forward_naive(
            {"pixel_values": images["pixel_values"][i:i + 1]}, model.tokenize([c]))) for c in CAPTIONS] for i in range(3)])
    assert cached.shape == (3, 4)
    assert cached.std() > 0.05  # the check below is not vacuous
    torch.testing.assert_close(cached, naive, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached, generic, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached, one_by_one, atol=ATOL, rtol=0)  # unpadded captions give the same scores


def test_score_pairs_is_the_diagonal_and_small_chunks_agree():
    model = _model()
    images, texts = _images(model, 4), model.tokenize(CAPTIONS)
    with torch.no_grad():
        full = model.score(images, texts)
        pairs = model.score_pairs(images, texts)
        model.pair_chunk = 3  # chunk boundaries inside an image's row
        chunked = model.score(images, texts)
    torch.testing.assert_close(pairs, full.diagonal(), atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, full, atol=ATOL, rtol=0)


def test_gradients_flow_and_teacher_wrapper_freezes():
    model = _model().train()
    images, texts = _images(model, 2), model.tokenize(CAPTIONS[:2])
    model.score_pairs(images, texts).sum().backward()
    for name in ("vit_model.visual.conv1.weight", "text_transformer.embeddings.word_embeddings.weight",
                 "cross_modal_image_layers.0.crossattention.self.key.weight", "rank_output.weight"):
        assert model.get_parameter(name).grad is not None, name
    assert not model.itm_score.fc.weight.requires_grad  # frozen, unused (kept for loading), as in METER
    assert teachers.TEACHERS.get("meter") is create_meter  # registered on import of teachers.meter
    teacher = Teacher(create_meter(preset="roberta32x1-vit32x2"))
    assert isinstance(teacher, Teacher) and teacher.family == "meter"
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_fusion_layer_matches_transformers_bert_layer_with_cross_attention():
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer

    model = _model()
    ours = model.cross_modal_text_layers[1]
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, is_decoder=True,
                     add_cross_attention=True, attn_implementation="eager")
    ref = BertLayer(cfg).eval()
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    x_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    y_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])

    def additive(mask):
        return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    with torch.no_grad():
        expected = ref(x, additive(x_mask), encoder_hidden_states=y, encoder_attention_mask=additive(y_mask))
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours(x, y, x_mask, y_mask)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_clip_tower_matches_timm_openai_clip_conversion():
    from timm.layers import QuickGELU
    from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip

    model = _model()
    visual = {f"visual.{k}": v for k, v in model.vit_model.visual.state_dict().items()}
    visual["visual.proj"] = torch.zeros(32, 16)  # present in OpenAI files; METER never applies it
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, pre_norm=True,
                            num_classes=0, act_layer=QuickGELU, norm_layer=nn.LayerNorm).eval()
    converted = _convert_openai_clip(visual, ref)
    converted = {k: v for k, v in converted.items() if not k.startswith("head.")}
    ref.load_state_dict(converted)
    pixels = _images(model, 2)["pixel_values"]
    with torch.no_grad():
        torch.testing.assert_close(model.vit_model(pixels), ref.forward_features(pixels), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- official checkpoints
def _official_ckpt(model: METER, path, image_size=None, drop=None, rename=None):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    width = model.config.vision_width
    state["vit_model.token_embedding.weight"] = torch.randn(10, width)  # leftovers of the released files
    state["vit_model.positional_embedding"] = torch.randn(7, width)
    state["vit_model.ln_final.weight"] = torch.ones(width)
    state["text_transformer.embeddings.position_ids"] = torch.arange(48)[None]
    state["text_transformer.pooler.dense.weight"] = torch.zeros(32, 32)
    for name in ("weight", "bias"):  # as in METER's files: rank_output is a view of itm_score.fc's "match" row
        state[f"itm_score.fc.{name}"][1:] = state[f"rank_output.{name}"]
        state[f"rank_output.{name}"] = state[f"itm_score.fc.{name}"][1:]
    if drop:
        del state[drop]
    if rename:
        state[rename[1]] = state.pop(rename[0])
    hp = {"config": {"image_size": image_size or model.config.image_size, "max_text_len": 40, "tokenizer": "minilm",
                     "num_heads": 2, "vit": "ViT-B/16", "loss_names": {"itm": 0.5, "irtr": 1}}}
    torch.save({"state_dict": state, "hyper_parameters": hp, "epoch": 3, "global_step": 100}, path)
    return path


def test_official_checkpoint_loads_and_reproduces_scores(tmp_path):
    model = _model()
    path = _official_ckpt(model, tmp_path / "x.ckpt")
    images, texts = _images(model, 2), model.tokenize(CAPTIONS)
    with torch.no_grad():
        expected = model.score(images, texts)
    fresh = meter_preset("roberta32x1-vit32x2").eval()
    report = load_official_checkpoint(fresh, path)
    assert "vit_model.token_embedding.weight" in report["ignored"]
    assert "text_transformer.pooler.dense.weight" in report["ignored"] and not report["interpolated"]
    built = create_meter(checkpoint=str(path), preset="roberta32x1-vit32x2").eval()  # config from shapes + hyper_parameters
    assert built.config == model.config
    ptrs = [p.untyped_storage().data_ptr() for p in built.parameters()]
    assert len(ptrs) == len(set(ptrs))  # the shared rank_output / itm_score storage of the file is not kept
    with torch.no_grad():
        torch.testing.assert_close(fresh.score(images, texts), expected, atol=0, rtol=0)
        torch.testing.assert_close(built.score(images, texts), expected, atol=0, rtol=0)
    teacher = Teacher(create_meter(checkpoint=str(path), preset="roberta32x1-vit32x2"))
    torch.testing.assert_close(teacher.score(images, texts), expected, atol=0, rtol=0)


def test_checkpoint_at_another_resolution_interpolates_positions(tmp_path):
    model = _model()  # 32 px, patch 8: a 4x4 grid
    path = _official_ckpt(model, tmp_path / "x288.ckpt", image_size=48)  # trained at 32, run at 48 (6x6)
    big = create_meter(checkpoint=str(path), preset="roberta32x1-vit32x2")
    assert big.config.image_size == 48
    pos = big.vit_model.visual.positional_embedding.detach()
    old = model.vit_model.visual.positional_embedding.detach()
    assert pos.shape == (37, 32)
    torch.testing.assert_close(pos[0], old[0])  # class row kept
    grid = old[1:].reshape(4, 4, 32).permute(2, 0, 1)[None]
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(36, 32)
    torch.testing.assert_close(pos[1:], want)
    report = load_official_checkpoint(meter_preset("roberta32x1-vit32x2", image_size=48), path)
    assert report["interpolated"] == ["vit_model.visual.positional_embedding"]
    with torch.no_grad():
        assert big.encode_images(_images(big, 1))["tokens"].shape == (1, 37, 32)


def test_checkpoint_with_wrong_keys_names_them(tmp_path):
    model = _model()
    renamed = _official_ckpt(model, tmp_path / "renamed.ckpt",
                             rename=("cross_modal_text_layers.1.output.dense.weight",
                                     "cross_modal_text_layers.1.out.dense.weight"))
    with pytest.raises(CheckpointError) as err:
        load_official_checkpoint(meter_preset("roberta32x1-vit32x2"), renamed)
    assert "cross_modal_text_layers.1.output.dense.weight" in str(err.value)  # missing
    assert "cross_modal_text_layers.1.out.dense.weight" in str(err.value)  # unexpected
    missing = _official_ckpt(model, tmp_path / "missing.ckpt", drop="rank_output.bias")
    with pytest.raises(CheckpointError, match=r"missing key.*rank_output\.bias"):
        create_meter(checkpoint=str(missing), preset="roberta32x1-vit32x2")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*cross_modal_text_transform\.weight"):
        load_official_checkpoint(meter_preset("roberta32x1-vit32x2", hidden_size=64, num_heads=2), _official_ckpt(model, tmp_path / "s.ckpt"))


class _Opaque:  # a pickled object that weights_only loading refuses
    pass


def test_checkpoint_with_pickled_objects_loads_them_inert(tmp_path):
    """weights_only refuses the object; the allow-listed unpickler reads it as an inert placeholder (no trust needed:
    tests/test_released_checkpoints.py has the released layout and a payload that is refused)."""
    model = _model()
    path = tmp_path / "opaque.ckpt"
    torch.save({"state_dict": model.state_dict(), "callbacks": _Opaque()}, path)
    loaded = create_meter(checkpoint=str(path), preset="roberta32x1-vit32x2")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert isinstance(create_meter(checkpoint=str(path), preset="roberta32x1-vit32x2", trusted=True), METER)


def test_base_preset_has_the_official_key_names():
    with torch.device("meta"):  # no 1.3 GB allocation
        model = METER(METERConfig.preset("base"))
    state = model.state_dict()
    keys = set(state)
    blocks = {int(k.split(".")[4]) for k in keys if k.startswith("vit_model.visual.transformer.resblocks.")}
    assert blocks == set(range(11))  # CLIP's 12th block is not built
    assert {int(k.split(".")[3]) for k in keys if k.startswith("text_transformer.encoder.layer.")} == set(range(12))
    for stream in ("image", "text"):
        assert {int(k.split(".")[1]) for k in keys if k.startswith(f"cross_modal_{stream}_layers.")} == set(range(6))
    shapes = {
        "vit_model.visual.conv1.weight": (768, 3, 16, 16), "vit_model.visual.class_embedding": (768,),
        "vit_model.visual.positional_embedding": (577, 768), "vit_model.visual.ln_pre.weight": (768,),
        "vit_model.visual.transformer.resblocks.10.attn.in_proj_weight": (2304, 768),
        "vit_model.visual.transformer.resblocks.10.attn.in_proj_bias": (2304,),
        "vit_model.visual.transformer.resblocks.10.attn.out_proj.weight": (768, 768),
        "vit_model.visual.transformer.resblocks.10.mlp.c_fc.weight": (3072, 768),
        "vit_model.visual.transformer.resblocks.10.mlp.c_proj.weight": (768, 3072),
        "vit_model.visual.ln_post.bias": (768,),
        "text_transformer.embeddings.word_embeddings.weight": (50265, 768),
        "text_transformer.embeddings.position_embeddings.weight": (514, 768),
        "text_transformer.embeddings.token_type_embeddings.weight": (1, 768),
        "text_transformer.encoder.layer.11.output.LayerNorm.weight": (768,),
        "cross_modal_text_transform.weight": (768, 768), "cross_modal_image_transform.bias": (768,),
        "token_type_embeddings.weight": (2, 768),
        "cross_modal_image_layers.5.attention.self.query.weight": (768, 768),
        "cross_modal_image_layers.5.attention.output.LayerNorm.weight": (768,),
        "cross_modal_text_layers.0.crossattention.self.value.weight": (768, 768),
        "cross_modal_text_layers.0.crossattention.output.dense.weight": (768, 768),
        "cross_modal_text_layers.0.intermediate.dense.weight": (3072, 768),
        "cross_modal_text_layers.0.output.dense.weight": (768, 3072),
        "cross_modal_image_pooler.dense.weight": (768, 768), "cross_modal_text_pooler.dense.bias": (768,),
        "itm_score.fc.weight": (2, 1536), "itm_score.fc.bias": (2,),
        "rank_output.weight": (1, 1536), "rank_output.bias": (1,),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert "vit_model.visual.conv1.bias" not in keys and "vit_model.visual.proj" not in keys
    assert not any(k.startswith("text_transformer.pooler") for k in keys)
    families = ("vit_model.visual.", "text_transformer.embeddings.", "text_transformer.encoder.layer.",
                "cross_modal_text_transform.", "cross_modal_image_transform.", "token_type_embeddings.",
                "cross_modal_image_layers.", "cross_modal_text_layers.", "cross_modal_image_pooler.dense.",
                "cross_modal_text_pooler.dense.", "itm_score.fc.", "rank_output.")
    assert all(k.startswith(families) for k in keys)
    n = sum(p.numel() for p in model.parameters())
    assert 318e6 < n < 320e6  # CLIP-B/16 (11 blocks) + roberta-base + 12 co-attention layers + heads
    # the config is recovered from an official-shaped state dict (+ hyper_parameters), whatever the base preset
    official = dict(state)
    official["vit_model.visual.positional_embedding"] = torch.empty(18 * 18 + 1, 768, device="meta")  # stored at 288
    hp = {"config": {"image_size": 384, "tokenizer": "roberta-base", "num_heads": 12, "max_text_len": 40,
                     "vit": "ViT-B/16", "drop_rate": 0.1, "num_top_layer": 6}}
    assert config_from_checkpoint(official, hp, base=METERConfig.preset("minilm2-vit128x4")) == METERConfig.preset("base")
    assert config_from_checkpoint(official, {}).image_size == 288  # no hyper_parameters: the stored grid


# --------------------------------------------------------------------------------------------- preprocessing
def test_image_transform_on_real_jpeg_files(tmp_path):
    from PIL import Image

    model = meter_preset("roberta32x1-vit32x2")  # image_size 32
    transform = model.image_transform(train=False)
    files = []
    specs = [((80, 48), "RGB", (255, 0, 128)), ((30, 90), "L", 77), ((33, 33), "CMYK", (0, 0, 0, 0))]
    for i, (size, mode, colour) in enumerate(specs):
        path = tmp_path / f"img{i}.jpg"
        Image.new(mode, size, colour).save(path, quality=100)
        files.append(path)
    tensors = [transform(Image.open(p)) for p in files]
    for t in tensors:
        assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    want = (torch.tensor([255.0, 0.0, 128.0])[:, None, None] / 255 - mean) / std
    torch.testing.assert_close(tensors[0], want.expand(3, 32, 32), atol=0.05, rtol=0)  # JPEG is lossy on chroma
    torch.testing.assert_close(tensors[1], ((77 / 255 - mean) / std).expand(3, 32, 32), atol=0.02, rtol=0)
    assert model.config.image_mean == (0.48145466, 0.4578275, 0.40821073)
    assert model.config.image_std == (0.26862954, 0.26130258, 0.27577711)
    # a 2:1 image: shorter side -> 32 (bicubic), center crop keeps the middle
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (16, 0, 48, 32))
    out = transform(img)
    assert out[:, :, 8:24].mean() > 1.5 and out[:, :, :2].mean() > 1.5  # only the white middle survives the crop
    batch = model.collate_images(tensors)
    with torch.no_grad():
        assert model.encode_images(batch)["tokens"].shape == (3, 17, 32)


def test_tokenize_pads_to_longest_and_truncates():
    model = meter_preset("roberta32x1-vit32x2")
    out = model.tokenize(["a dog", "word " * 100])
    assert out["input_ids"].shape == (2, 40) and out["attention_mask"][1].sum() == 40
    assert out["attention_mask"][0].sum() == 4 and (out["input_ids"][0, 4:] == 0).all()  # minilm pads with 0
    assert model.tokenize(["a dog", "a cat"])["input_ids"].shape == (2, 4)


# --------------------------------------------------------------------------------------------- save / load / shrink
def test_config_json_round_trip_and_presets(tmp_path):
    for name in ("base", "minilm2-vit128x4", "roberta32x1-vit32x2"):
        config = METERConfig.preset(name)
        assert METERConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.warns(DeprecationWarning, match="'tiny' is deprecated: use 'minilm2-vit128x4'"):
        assert METERConfig.preset("tiny") == METERConfig.preset("minilm2-vit128x4")  # the name before sizes
    config = METERConfig.preset("minilm2-vit128x4", max_text_len=32)
    config.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["family"] == "meter"
    assert METERConfig.load(tmp_path) == config
    with pytest.raises(ValueError, match="unknown METERConfig field"):
        METERConfig.from_dict({"bogus": 1})
    with pytest.raises(KeyError, match="unknown METER preset"):
        METERConfig.preset("huge")


def test_save_pretrained_round_trip(tmp_path):
    model = _model()
    images, texts = _images(model, 2), model.tokenize(CAPTIONS)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = METER.from_pretrained(tmp_path / "m").eval()
    via_registry = Teacher(create_meter(checkpoint=str(tmp_path / "m")))
    with torch.no_grad():
        expected = model.score(images, texts)
        torch.testing.assert_close(loaded.score(images, texts), expected, atol=0, rtol=0)
        torch.testing.assert_close(via_registry.score(images, texts), expected, atol=0, rtol=0)
    assert loaded.text_transformer.embeddings.position_ids.device.type == "cpu"


def test_shrink_copies_layers_and_shares_no_storage():
    model = _model().train()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    small = model.shrink((0, 2))
    assert small.num_fusion_layers == 2 and small.config.num_fusion_layers == 2 and model.num_fusion_layers == 3
    for new, old in ((0, 0), (1, 2)):
        for stream in ("text", "image"):
            a = getattr(small, f"cross_modal_{stream}_layers")[new].state_dict()
            b = getattr(model, f"cross_modal_{stream}_layers")[old].state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("vit_model", "text_transformer", "cross_modal_text_pooler", "rank_output", "token_type_embeddings"):
        a, b = small.get_submodule(name).state_dict(), model.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    ptrs = lambda m: {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    assert not ptrs(small) & ptrs(model)
    # training the shrunk model leaves the original bit-identical
    opt = torch.optim.AdamW([p for p in small.parameters() if p.requires_grad], lr=1e-2)
    images, texts = _images(model, 2), model.tokenize(CAPTIONS[:2])
    for _ in range(2):
        opt.zero_grad()
        small.score_pairs(images, texts).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(small.rank_output.weight, model.rank_output.weight)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_shrink_validates_indices_and_scores_like_a_shallower_model():
    model = _model()
    for bad in [(3,), (), (2, 0), (1, 1), (-1,), ("a",)]:
        with pytest.raises(ValueError, match="layer_indices"):
            model.shrink(bad)
    small = model.eval().shrink((0, 1, 2))  # all layers: same scores
    images, texts = _images(model, 2), model.tokenize(CAPTIONS[:3])
    with torch.no_grad():
        torch.testing.assert_close(small.score(images, texts), model.score(images, texts), atol=0, rtol=0)


def test_building_from_openai_clip_weights(tmp_path):
    donor = _model(seed=5)
    visual = {f"visual.{k}": v.clone() for k, v in donor.vit_model.visual.state_dict().items()}
    for k, v in list(visual.items()):  # CLIP has one block more than METER builds
        if ".resblocks.1." in k:
            visual[k.replace(".resblocks.1.", ".resblocks.2.")] = torch.randn_like(v)
    visual["visual.positional_embedding"] = torch.randn(3 * 3 + 1, 32)  # CLIP at 24 px -> METER at 32
    visual.update({"visual.proj": torch.randn(32, 16), "token_embedding.weight": torch.randn(10, 16)})
    torch.save(visual, tmp_path / "ViT-tiny.pt")
    model = create_meter(preset="roberta32x1-vit32x2", clip_checkpoint=str(tmp_path / "ViT-tiny.pt"))
    mine = model.vit_model.visual.state_dict()
    assert torch.equal(mine["transformer.resblocks.1.mlp.c_fc.weight"], visual["visual.transformer.resblocks.1.mlp.c_fc.weight"])
    assert torch.equal(mine["conv1.weight"], visual["visual.conv1.weight"])
    assert mine["positional_embedding"].shape == (17, 32)
    assert torch.equal(mine["positional_embedding"][0], visual["visual.positional_embedding"][0])
