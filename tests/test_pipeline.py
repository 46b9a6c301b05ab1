"""End to end: the embedded teacher recipe, `dcd distill` on a real-data-shaped fixture, the CLI."""
import json

import pytest
import torch

from dcd import cli, teacher_training
from dcd.data import build_synthetic, load_karpathy
from dcd.pipeline import DistillSettings, build_dual, equal_time_dual, load_teacher
from teachers import as_teacher
from teachers.meter import meter_preset


@pytest.fixture(scope="module")
def fixture_json(tmp_path_factory):
    return build_synthetic(tmp_path_factory.mktemp("data"), sizes=(24, 4, 4), image_size=32)


def test_teacher_finetuning_trains_and_is_reused(fixture_json, tmp_path, monkeypatch, unit_teacher_recipe):
    unit_teacher_recipe(max_steps=3)
    train = load_karpathy(fixture_json, split="train")
    model, info = teacher_training.embedded_teacher("meter", train, progress=False)
    records = [json.loads(line) for line in (teacher_training.teacher_dir("meter", train) / "training" / "metrics.jsonl")
               .read_text().splitlines()]
    assert records[-1]["step"] == 3 and {"itc", "rank"} <= set(records[-1])
    assert info["steps"] == 3 and (tmp_path / "home" / "teachers").is_dir()
    again, info2 = teacher_training.embedded_teacher("meter", train, progress=False)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert info2 == info
    # a teacher cached when its preset had the old name ("test") is still reused: only the name changed
    recipe_path = teacher_training.teacher_dir("meter", train) / "recipe.json"
    recipe_path.write_text(recipe_path.read_text().replace('"roberta32x1-vit32x2"', '"test"'))
    _, info_renamed = teacher_training.embedded_teacher("meter", train, progress=False)
    assert info_renamed == info and '"roberta32x1-vit32x2"' in recipe_path.read_text()
    # teacher.json left with the old name by an earlier version (recipe.json already renamed) is renamed too
    info_path = teacher_training.teacher_dir("meter", train) / "teacher.json"
    info_path.write_text(info_path.read_text().replace('"roberta32x1-vit32x2"', '"test"'))
    teacher_training.embedded_teacher("meter", train, progress=False)
    assert json.loads(info_path.read_text())["preset"] == "roberta32x1-vit32x2"
    # a changed recipe is not served the old teacher: it retrains from scratch
    monkeypatch.setitem(teacher_training.EMBEDDED_TEACHERS, "meter",
                        {**teacher_training.EMBEDDED_TEACHERS["meter"], "max_steps": 2})
    _, info3 = teacher_training.embedded_teacher("meter", train, progress=False)
    assert info3["steps"] == 2
    with pytest.raises(ValueError, match="no embedded recipe"):
        teacher_training.embedded_teacher("blip", train)


@pytest.mark.slow
def test_distill_end_to_end_on_a_fixture_with_a_checkpoint(fixture_json, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    out = tmp_path / "run"
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--eval-split", "test", "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1",
              "--num-negatives", "4", "--num-hard", "2", "--rerank-k", "3"])
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    names = [row["model"] for row in results["results"]]
    # fusion students are re-rankers: measured on the dual student's top-k (--exhaustive-fusion: on every pair)
    assert names == ["teacher", "baseline dual", "dcd dual", "dual top-3 -> baseline fusion",
                     "dual top-3 -> dcd fusion", "dual top-3 -> teacher"]
    assert all(row["params"] > 0 for row in results["results"][:3])
    assert all(row["params"] < results["results"][0]["params"] for row in results["results"][1:5])
    for stage in ("fusion-baseline", "fusion"):
        assert results["training"][stage]["steps"] == 2
    for row in results["results"]:
        assert 0 <= row["i2t_r1"] <= 100 and row["seconds"] > 0 and row["model"] in printed
    assert results["training"]["dcd"]["steps"] == 2 and results["training"]["baseline"]["dcd"]["use_teacher"] is False
    recipe = json.loads((out / "recipe.json").read_text())  # the resolved recipe, kept beside the results
    assert recipe["name"] == "reference" and recipe["dcd"]["total_steps"] == 2
    assert recipe["teacher"]["checkpoint"] == str(teacher_dir) and recipe["budget"]["max_steps"] == 2
    for stage in ("baseline", "dcd", "fusion"):
        assert (out / stage / "student" / "config.json").is_file()
        assert (out / stage / "checkpoint.pt").is_file()
    # a second run reuses every finished stage
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3"])
    assert json.loads((out / "results.json").read_text())["training"] == results["training"]
    # other method settings are never served a student trained with the old ones
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--alpha", "0.1", "--no-fusion"])
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["dcd"]["dcd"]["alpha"] == 0.1 and training["baseline"] == results["training"]["baseline"]
    assert training["baseline"]["group_size"] == 1  # data given as a file (real data): plain shuffled batches
    # neighbour batches are a recipe of their own, for the baseline and the DCD student alike
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--alpha", "0.1", "--no-fusion", "--group-size", "2"])
    grouped = json.loads((out / "results.json").read_text())["training"]
    # a summary records the recipe its student was trained with: both were retrained, neither reused
    assert grouped["baseline"]["group_size"] == grouped["dcd"]["group_size"] == 2


@pytest.mark.slow
def test_equal_time_dual_trains_for_the_time_it_is_given(fixture_json, tmp_path):
    splits = {role: load_karpathy(fixture_json, split=name) for role, name in (("train", "train"), ("val", "val"),
                                                                               ("eval", "test"))}
    out = equal_time_dual(2.0, splits, tmp_path, progress=False, calibration_steps=10)
    assert out["steps"] == max(1, round(2.0 / out["step_seconds"]))
    assert 0 <= out["synthetic-test"]["i2t_r1"] <= 100 and out["target_seconds"] == 2.0
    summary = json.loads((tmp_path / "equal-time-dual" / "summary.json").read_text())
    assert summary["steps"] == out["steps"] and summary["teacher"] is False  # the undistilled baseline
    assert (tmp_path / "equal-time-dual" / "student" / "config.json").is_file()
    assert not (tmp_path / "calibration").exists()  # the timing run leaves nothing behind


def test_cli_help_and_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    text = capsys.readouterr().out
    for option in ("--teacher-checkpoint", "--data-root", "--num-negatives", "--alpha-schedule", "--max-steps"):
        assert option in text
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            cli.main(["distill", "--device", "cuda"])
    with pytest.raises(ValueError, match="needs --teacher-checkpoint"):
        load_teacher(DistillSettings(data="coco"), {})


def test_cli_student_option_is_not_taken_for_student_checkpoint(capsys):
    """`make distill` passes --student; an abbreviation must never be read as --student-checkpoint."""
    args = cli.build_parser().parse_args(["distill", "--student", "dual_tiny"])
    assert args.student == "dual_tiny" and args.student_checkpoint is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--student-check", "x"])
    assert "unrecognized arguments: --student-check" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--student 'nope' is not a registered student"):
        build_dual(DistillSettings(student="nope"), as_teacher(meter_preset("roberta32x1-vit32x2")))


def test_embedded_and_reference_method_defaults():
    embedded, coco = DistillSettings().dcd_config(), DistillSettings(data="coco").dcd_config()
    assert (embedded.alpha, embedded.entropy_temperature, embedded.num_negatives, embedded.num_hard) == (0.5, 4.0, 7, 3)
    assert (coco.alpha, coco.entropy_temperature, coco.num_negatives, coco.num_hard) == (0.2, 1.0, 15, 7)
    chosen = DistillSettings(alpha=0.0, entropy_temperature=1.0).dcd_config()  # an explicit 0 is kept
    assert (chosen.alpha, chosen.entropy_temperature) == (0.0, 1.0)
    args = cli.build_parser().parse_args(["distill", "--alpha", "0.3"])
    assert args.alpha == 0.3 and args.entropy_temperature is None and args.teacher_temperature is None
    args = cli.build_parser().parse_args(["ablations", "--teacher-temperature", "3"])
    assert DistillSettings(teacher_temperature=args.teacher_temperature).dcd_config().teacher_temperature == 3.0
