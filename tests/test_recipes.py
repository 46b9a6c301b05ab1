"""Recipes: named presets resolved once, shown by --print-recipe, read from --recipe files, teacher overrides."""
import json

import pytest

from dcd import cli, recipes, teacher_training
from dcd.data import build_synthetic, load_karpathy
from dcd.pipeline import DistillSettings


@pytest.fixture(scope="module")
def fixture_json(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("data"), sizes=(16, 4, 4), image_size=32)


def test_each_regime_is_a_named_preset():
    embedded, coco, flickr = (DistillSettings(data=d).recipe() for d in ("synthetic", "coco", "flickr30k"))
    assert (embedded.name, coco.name, flickr.name) == ("embedded", "reference", "reference")
    assert embedded.budget == recipes.PRESETS["embedded"].budget and coco.budget.epochs == 10
    assert (embedded.dcd["num_negatives"], coco.dcd["num_negatives"], flickr.dcd["num_negatives"]) == (7, 15, 63)
    assert embedded.score_cache == {"pool_size": 14, "near": 7, "seed": 0} and coco.score_cache["near"] == 0
    assert embedded.student["name"] == "dual-minilm1-vit128x2" and coco.student["name"] == "dual"
    chosen = DistillSettings(alpha=0.0, epochs=5, num_negatives=4).recipe()  # what the user sets wins, 0 included
    assert chosen.dcd["alpha"] == 0.0 and chosen.budget.epochs == 5 and chosen.score_cache["pool_size"] == 8


def test_print_recipe_round_trips_through_a_recipe_file(fixture_json, tmp_path, capsys):
    base = ["distill", "--data", str(fixture_json), "--print-recipe"]
    cli.main(base + ["--alpha", "0.7", "--epochs", "3", "--teacher-config", "num_fusion_layers=3"])
    shown = json.loads(capsys.readouterr().out)
    assert shown["resolved"]["dcd"]["alpha"] == 0.7 and shown["resolved"]["teacher"]["config"] == {"num_fusion_layers": 3}
    assert shown["resolved"]["dcd"]["total_steps"] == 3 * (80 // 32)  # 16 images x 5 captions, batches of 32
    assert shown["resolved"]["total_steps"] == 3 * (80 // 32)  # fixed before training starts
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(shown["settings"]))
    cli.main(["distill", "--recipe", str(path), "--print-recipe"])
    assert json.loads(capsys.readouterr().out) == shown
    cli.main(["distill", "--recipe", str(path), "--print-recipe", "--seed", "5"])  # a flag given wins over the file
    again = json.loads(capsys.readouterr().out)["resolved"]
    assert again["seed"] == 5 and again["dcd"]["alpha"] == 0.7


def test_a_yaml_recipe_file(fixture_json, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {fixture_json}\nnum_hard: 2\ndirections: [i2t, t2i]\n")
    cli.main(["distill", "--recipe", str(path), "--print-recipe"])
    resolved = json.loads(capsys.readouterr().out)["resolved"]
    assert resolved["dcd"]["num_hard"] == 2 and resolved["dcd"]["directions"] == ["i2t", "t2i"]


@pytest.mark.parametrize("text,message", [('{"alpha": 0.3, "bogus": 1}', "unknown field(s) bogus"),
                                          ("{not json", "is not valid json"),
                                          ("[1, 2]", "must hold a mapping")])
def test_bad_recipe_files_are_one_line_errors(tmp_path, capsys, text, message):
    path = tmp_path / "recipe.json"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["distill", "--recipe", str(path), "--print-recipe"])
    assert str(exit_info.value).startswith("dcd: error: ") and message in str(exit_info.value)
    assert str(path) in str(exit_info.value) and "\n" not in str(exit_info.value)


def test_teacher_config_overrides_parse_and_reject_bad_input():
    assert recipes.parse_overrides(["num_layers=6", "hidden_act=gelu", "dropout=0.1", "flag=True"]) == \
        {"num_layers": 6, "hidden_act": "gelu", "dropout": 0.1, "flag": True}
    with pytest.raises(SystemExit, match="dcd: error: --teacher-config takes key=value, got 'num_layers'"):
        cli.main(["distill", "--teacher-config", "num_layers", "--print-recipe"])


def test_a_teacher_override_trains_its_own_teacher_and_keeps_the_default(fixture_json, tmp_path, unit_teacher_recipe):
    """The teacher stage's identity holds its config: an override is a new teacher, in a folder of its own."""
    unit_teacher_recipe(max_steps=2)
    train = load_karpathy(fixture_json, split="train")
    default, _ = teacher_training.embedded_teacher("meter", train, progress=False)
    wider, _ = teacher_training.embedded_teacher("meter", train, progress=False, overrides={"num_fusion_layers": 2})
    assert wider.config.num_fusion_layers == 2 != default.config.num_fusion_layers
    assert teacher_training.teacher_dir("meter", train) != teacher_training.teacher_dir("meter", train, {"num_fusion_layers": 2})
    assert (teacher_training.teacher_dir("meter", train) / "model").is_dir()  # the default was not cleared
    longer, info = teacher_training.embedded_teacher("meter", train, progress=False, overrides={"max_steps": 3})
    assert info["max_steps"] == 3 and longer.config.num_fusion_layers == default.config.num_fusion_layers
    assert info["steps"] == 2  # what it trained: one epoch of the fixture's captions at batch 32, under the cap


def test_dcd_teacher_trains_an_overridden_teacher_and_caches_its_scores(fixture_json, tmp_path, monkeypatch, capsys,
                                                                        unit_teacher_recipe):
    unit_teacher_recipe(max_steps=3)
    import dcd.data

    monkeypatch.setattr(dcd.data, "build_synthetic", lambda root=None, **kwargs: fixture_json)  # the small set
    cli.main(["teacher", "--teacher-config", "max_steps=2"])
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and info["synthetic-test"]["rsum"] >= 0 and "binding" in info["synthetic-val"]
    scores = sorted(p.name for p in (tmp_path / "home" / "teachers").glob("meter-*/scores/*.npy"))
    assert scores == ["synthetic-test.npy", "synthetic-val.npy"]
