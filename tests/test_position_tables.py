"""Sin-cos image position tables: the table itself, and that from-scratch towers start from it on request
while loaded weights always win."""
import torch
import pytest

from teachers.meter import METER, meter_preset
from teachers.position_tables import sincos_2d
from teachers.vilt import ViLT, vilt_preset


def test_sincos_table_encodes_the_grid():
    table = sincos_2d(4, 8)
    assert table.shape == (17, 8) and torch.equal(table[0], torch.zeros(8))
    patches = table[1:].view(4, 4, 8)
    assert torch.equal(patches[0, 0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))  # sin 0, cos 0 for x and y
    assert torch.allclose(patches[:, 2, :4], patches[0, 2, :4].expand(4, 4))  # x channels ignore the row
    assert torch.allclose(patches[3, :, 4:], patches[3, 0, 4:].expand(4, 4))  # y channels ignore the column
    near, far = (patches[1, 1] - patches[1, 2]).norm(), (patches[1, 1] - patches[1, 3]).norm()
    assert near < far  # neighbouring patches have closer codes
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 6)


def test_meter_position_init_applies_from_scratch_only(tmp_path):
    model = meter_preset("roberta32x1-vit32x2", vision_position_init="sincos")
    visual = model.vit_model.visual
    assert torch.equal(visual.positional_embedding.detach(), sincos_2d(visual.grid, visual.conv1.out_channels))
    assert not torch.equal(meter_preset("roberta32x1-vit32x2").vit_model.visual.positional_embedding.detach()[1:], sincos_2d(4, 32)[1:])
    with torch.no_grad():
        visual.positional_embedding.add_(1.0)  # "trained"
    model.save_pretrained(tmp_path / "m")
    loaded = METER.from_pretrained(tmp_path / "m")
    assert loaded.config.vision_position_init == "sincos"
    assert torch.equal(loaded.vit_model.visual.positional_embedding, visual.positional_embedding.detach())
    with pytest.raises(ValueError, match="vision_position_init"):
        meter_preset("roberta32x1-vit32x2", vision_position_init="learned")


def test_vilt_position_init_applies_from_scratch_only(tmp_path):
    model = vilt_preset("vit32x2", dcd_position_init="sincos")
    table = model.hf.vilt.embeddings.position_embeddings
    grid = model.config.image_size // model.config.patch_size
    assert torch.equal(table[0].detach(), sincos_2d(grid, table.shape[-1]))
    assert not vilt_preset("vit32x2").hf.vilt.embeddings.position_embeddings.any()  # HF's default: zeros
    with torch.no_grad():
        table.add_(1.0)
    model.save_pretrained(tmp_path / "v")
    loaded = ViLT.from_pretrained(tmp_path / "v")
    assert torch.equal(loaded.hf.vilt.embeddings.position_embeddings, table.detach())
    with pytest.raises(ValueError, match="dcd_position_init"):
        vilt_preset("vit32x2", dcd_position_init="learned")
