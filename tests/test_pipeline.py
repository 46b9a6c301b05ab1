"""End to end: the embedded teacher recipe, `dcd distill` on a real-data-shaped fixture, the CLI."""
import json
from pathlib import Path

import pytest
import torch

from dcd import cli, teacher_training
from dcd.data import build_synthetic, load_karpathy
from dcd.pipeline import DistillSettings, build_student, equal_time_dual, load_teacher
from dcd.recipes import resolve
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
    directory = teacher_training.teacher_dir("meter", train)
    assert json.loads((directory / "stage.json").read_text())["kind"] == "teacher"
    # a changed recipe is not served the old teacher: it trains in a folder of its own, and the old one stays
    monkeypatch.setitem(teacher_training.EMBEDDED_TEACHERS, "meter",
                        {**teacher_training.EMBEDDED_TEACHERS["meter"], "max_steps": 2})
    _, info3 = teacher_training.embedded_teacher("meter", train, progress=False)
    assert info3["steps"] == 2 and teacher_training.teacher_dir("meter", train) != directory
    assert (directory / "model").is_dir() and (directory / "teacher.json").is_file()
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
    stages = {role: Path(path) for role, path in results["stages"].items()}
    identity = {role: json.loads((path / "stage.json").read_text())["identity"] for role, path in stages.items()}
    assert results["training"]["dcd"]["steps"] == 2 and identity["baseline"]["dcd"]["use_teacher"] is False
    recipe = json.loads((out / "recipe.json").read_text())  # the resolved recipe, kept beside the results
    assert recipe["name"] == "reference" and recipe["dcd"]["total_steps"] == 2 and recipe["total_steps"] == 2
    assert recipe["teacher"]["checkpoint"] == str(teacher_dir) and recipe["budget"]["max_steps"] == 2
    assert {p.parent for p in stages.values()} == {out / "students"} and stages["dcd"].name.startswith("dual-dcd-seed0-")
    for stage in ("baseline", "dcd", "fusion"):
        assert (stages[stage] / "student" / "config.json").is_file()
        assert (stages[stage] / "checkpoint.pt").is_file()
        assert json.loads((stages[stage] / "results.json").read_text())["rows"]
        assert list(stages[stage].glob("events.out.tfevents.*"))  # TensorBoard: tensorboard --logdir runs
    assert {k: Path(out / v) for k, v in json.loads((out / "latest.json").read_text())["stages"].items()
            if k != "score_cache"} == stages
    # a second run reuses every finished stage
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3"])
    assert json.loads((out / "results.json").read_text())["training"] == results["training"]
    # other method settings are never served a student trained with the old ones, and lose nothing earlier
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--alpha", "0.1", "--no-fusion"])
    again = json.loads((out / "results.json").read_text())
    assert Path(again["stages"]["dcd"]) != stages["dcd"] and Path(again["stages"]["baseline"]) == stages["baseline"]
    assert json.loads((Path(again["stages"]["dcd"]) / "stage.json").read_text())["identity"]["dcd"]["alpha"] == 0.1
    assert identity["baseline"]["group_size"] == 1  # data given as a file (real data): plain shuffled batches
    # another step count: both students, and both results, are on disk
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "3", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--no-fusion"])
    longer = json.loads((out / "results.json").read_text())
    assert longer["training"]["dcd"]["steps"] == 3 and Path(longer["stages"]["dcd"]) != stages["dcd"]
    for path in (stages["dcd"], Path(longer["stages"]["dcd"])):
        assert (path / "student" / "config.json").is_file() and (path / "results.json").is_file()
    # `dcd runs` lists them with their RSUM; the latest run is marked, the earlier ones kept
    capsys.readouterr()
    assert cli.main(["runs", str(out)]) == 0
    listed = capsys.readouterr().out
    assert stages["dcd"].name in listed and Path(longer["stages"]["dcd"]).name in listed and "max_steps=3" in listed
    cli.main(["runs", str(out), "--json"])
    rows = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[f"students/{stages['dcd'].name}"]["test_rsum"] is not None
    assert rows[f"students/{Path(longer['stages']['dcd']).name}"]["latest"] is True
    assert rows[f"students/{stages['dcd'].name}"]["latest"] is False
    # neighbour batches are a recipe of their own, for the baseline and the DCD student alike
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(fixture_json),
              "--out", str(out), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--alpha", "0.1", "--no-fusion", "--group-size", "2"])
    grouped = json.loads((out / "results.json").read_text())["stages"]
    for role in ("baseline", "dcd"):  # both were retrained, neither reused
        assert json.loads((Path(grouped[role]) / "stage.json").read_text())["identity"]["group_size"] == 2
    # prune only when asked, and only what the last run did not use
    with pytest.raises(SystemExit, match="--keep-latest"):
        cli.main(["runs", "prune", str(out)])
    cli.main(["runs", "prune", "--keep-latest", str(out)])
    assert not stages["dcd"].exists() and Path(grouped["dcd"]).is_dir() and Path(grouped["baseline"]).is_dir()


def test_distill_with_a_vilt_teacher_prints_its_table(fixture_json, tmp_path, capsys):
    """`make distill TEACHER=vilt`: the same flow for the single-stream teacher; its fusion student is half its
    layers, strictly smaller, and is measured as a re-ranker of the dual student."""
    from teachers.vilt import vilt_preset

    vilt_preset("vit32x2").save_pretrained(tmp_path / "vilt")
    out = tmp_path / "run"
    cli.main(["distill", "--teacher", "vilt", "--teacher-checkpoint", str(tmp_path / "vilt"), "--data",
              str(fixture_json), "--eval-split", "test", "--out", str(out), "--max-steps", "2", "--batch-size", "8",
              "--epochs", "1", "--num-negatives", "4", "--num-hard", "2", "--rerank-k", "3"])
    printed = capsys.readouterr().out
    rows = {row["model"]: row for row in json.loads((out / "results.json").read_text())["results"]}
    assert list(rows) == ["teacher", "baseline dual", "dcd dual", "dual top-3 -> baseline fusion",
                          "dual top-3 -> dcd fusion", "dual top-3 -> teacher"]
    assert "vilt teacher on" in printed and all(name in printed for name in rows)
    # an untrained teacher may or may not out-rank a 2-step student: the warning says which, and is stored
    weaker = rows["teacher"]["rsum"] <= rows["baseline dual"]["rsum"]
    assert ("note: the teacher" in printed) == weaker
    assert (json.loads((out / "results.json").read_text())["note"] is not None) == weaker
    fusion = json.loads((Path(json.loads((out / "results.json").read_text())["stages"]["fusion"]) / "student" /
                         "config.json").read_text())
    assert fusion["teacher_family"] == "vilt" and fusion["layers"] == [0]  # 2 layers -> the first
    assert rows["dual top-3 -> dcd fusion"]["params"] < rows["teacher"]["params"]


@pytest.mark.slow
def test_equal_time_dual_trains_for_the_time_it_is_given(fixture_json, tmp_path):
    splits = {role: load_karpathy(fixture_json, split=name) for role, name in (("train", "train"), ("val", "val"),
                                                                               ("eval", "test"))}
    out = equal_time_dual(2.0, splits, tmp_path, progress=False, calibration_steps=10)
    assert out["steps"] == max(1, round(2.0 / out["step_seconds"]))
    assert 0 <= out["synthetic-test"]["i2t_r1"] <= 100 and out["target_seconds"] == 2.0
    [stage] = (tmp_path / "students").glob("dual-equal-time-seed0-*")
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["steps"] == out["steps"] and summary["teacher"] is False  # the undistilled baseline
    assert (stage / "student" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "students").iterdir() if p.is_dir()) == [stage.name]  # no calibration


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
        load_teacher(resolve(DistillSettings(data="coco")), {})


def test_cli_student_option_is_not_taken_for_student_checkpoint(capsys):
    """`make distill` passes --student; an abbreviation must never be read as --student-checkpoint."""
    args = cli.build_parser().parse_args(["distill", "--student", "dual_tiny"])
    assert args.student == "dual_tiny" and args.student_checkpoint is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--student-check", "x"])
    assert "unrecognized arguments: --student-check" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--student 'nope' is not a registered student"):
        build_student("dual", resolve(DistillSettings(student="nope")), as_teacher(meter_preset("roberta32x1-vit32x2")))


def test_embedded_and_reference_method_defaults():
    embedded, coco = resolve(DistillSettings()).dcd_config(), resolve(DistillSettings(data="coco")).dcd_config()
    assert (embedded.alpha, embedded.entropy_temperature, embedded.num_negatives, embedded.num_hard) == (0.5, 4.0, 7, 3)
    assert (coco.alpha, coco.entropy_temperature, coco.num_negatives, coco.num_hard) == (0.2, 1.0, 15, 7)
    chosen = resolve(DistillSettings(alpha=0.0, entropy_temperature=1.0)).dcd_config()  # an explicit 0 is kept
    assert (chosen.alpha, chosen.entropy_temperature) == (0.0, 1.0)
    args = cli.build_parser().parse_args(["distill", "--alpha", "0.3"])
    assert args.alpha == 0.3 and args.entropy_temperature is None and args.teacher_temperature is None
    args = cli.build_parser().parse_args(["ablations", "--teacher-temperature", "3"])
    assert resolve(DistillSettings(teacher_temperature=args.teacher_temperature)).dcd_config().teacher_temperature == 3.0
