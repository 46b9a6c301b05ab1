"""What earlier versions wrote stays usable: the embedded teacher, score headers and ablation records, read in place."""
import json
import multiprocessing
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch

import teachers
from dcd import ablations, score_matrices, teacher_training
from dcd.data import load_karpathy
from dcd.migrate import legacy_sha1
from dcd.pipeline import DistillSettings, build_student, train_student
from dcd.recipes import resolve
from teachers import as_teacher
from teachers.meter import meter_preset



def test_a_teacher_in_the_folder_an_earlier_version_named_is_used_where_it_is(tiny_data_json, unit_teacher_recipe,
                                                                              tmp_path):
    unit_teacher_recipe(max_steps=2)
    train = load_karpathy(tiny_data_json, split="train")
    model, info = teacher_training.embedded_teacher("meter", train, progress=False, precision="fp32")
    new = teacher_training.teacher_dir("meter", train, precision="fp32")
    # the layout before stage folders: <family>-<data build>, a recipe.json, no stage.json (and an older preset name)
    legacy = new.parent / f"meter-{Path(str(train.source)).parent.name}"
    shutil.move(str(new), legacy)
    (legacy / "stage.json").unlink()
    recipe = teacher_training.embedded_recipe("meter", precision="fp32")
    (legacy / "recipe.json").write_text(json.dumps({**recipe, "preset": "test"}))
    again, info2 = teacher_training.embedded_teacher("meter", train, progress=False, precision="fp32")
    assert not new.exists()  # nothing retrained
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert info2["path"] == str(legacy / "model") and json.loads((legacy / "recipe.json").read_text())["preset"] == \
        recipe["preset"]
    assert teacher_training.find_embedded_teacher("meter", train) == legacy


def test_a_score_matrix_header_with_the_old_sha1_is_reused(tiny_splits, tmp_path):
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    _, info = score_matrices.cached_score_matrix(teacher, tiny_splits["eval"], tmp_path, progress=False)
    path = next(tmp_path.glob("*.json"))
    stored = json.loads(path.read_text())
    stored["header"]["model"] = legacy_sha1(teacher)  # as an earlier dcd wrote it
    path.write_text(json.dumps(stored))
    assert score_matrices.stored_score_info(teacher, tiny_splits["eval"], tmp_path)["metrics"] == info["metrics"]
    torch.manual_seed(7)
    other = as_teacher(meter_preset("roberta32x1-vit32x2"))
    assert score_matrices.stored_score_info(other, tiny_splits["eval"], tmp_path) is None  # another model: not reused


def test_an_ablation_record_an_earlier_version_wrote_is_reported_and_its_student_kept(tiny_data_json, tmp_path):
    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    settings = DistillSettings(data=str(tiny_data_json), student="dual-bert32x1-vit32x1", progress=False,
                               max_steps=2, epochs=1, batch_size=4, num_negatives=4, num_hard=2, teacher_checkpoint=str(teacher_dir),
                               eval_split="test")
    out = tmp_path / "sweep"
    [_, measured] = ablations.run_ablations(settings, seeds=(0,), methods=["dcd"], out=out, results_json=tmp_path / "c.json")
    [record_path] = (out / "records").glob("dual-dcd-seed0-*.json")
    stored = json.loads(record_path.read_text())
    # rewrite it as the layout before stage folders had it: records/<kind>-<method>-seed<s>.json with the old
    # identity (SHA-1 fingerprints, the score cache's header, no step count), the student in dual/<method>/seed<s>
    teacher = as_teacher(teachers.create_model("meter", checkpoint=teacher_dir))
    recipe = resolve(replace(settings, **{k: v for k, v in ablations.METHODS["dcd"].items()}),
                     load_karpathy(tiny_data_json, split="train"))
    start = build_student("dual", recipe, teacher)
    [cache_dir] = out.glob("score-cache-*")
    header = json.loads((cache_dir / "header.json").read_text())
    new = stored["identity"]
    old_identity = _old_form(new, recipe, start, teacher, header)
    old_record = {k: v for k, v in measured.items() if k != "stage"}
    (out / "records" / "dual-dcd-seed0.json").write_text(json.dumps({"identity": old_identity, "record": old_record}))
    shutil.move(stored["stage"], out / "dual" / "dcd" / "seed0")
    record_path.unlink()
    # a report finds it, names today's file for it and points at the student where it is; nothing is retrained
    [_, reported] = ablations.run_ablations(settings, seeds=(0,), methods=["dcd"], out=out,
                                            results_json=tmp_path / "c.json", train_missing=False)
    assert reported == {**old_record, "stage": str(out / "dual" / "dcd" / "seed0")}
    migrated = json.loads(record_path.read_text())
    assert migrated["migrated_from"] == str(out / "records" / "dual-dcd-seed0.json") and migrated["identity"] == new
    assert (out / "records" / "dual-dcd-seed0.json").is_file()  # the old file stays
    assert not list((out / "students").glob("dual-dcd-seed0-*"))
    # a record of another identity is not taken for this row
    (out / "records" / "dual-dcd-seed0.json").write_text(json.dumps({"identity": {**old_identity, "seed": 3},
                                                                    "record": old_record}))
    record_path.unlink()
    [_] = ablations.run_ablations(settings, seeds=(0,), methods=["dcd"], out=out, results_json=tmp_path / "c.json",
                                  train_missing=False)


def _old_form(new, recipe, start, teacher, header):
    """A student identity as dcd wrote it before stage folders (written out here from that format, field by field)."""
    return {
        "student": {"name": start.family, "start": legacy_sha1(start)},
        "teacher": legacy_sha1(teacher) if header else None, "data": new["train"],
        "score_cache": {**header, "teacher": legacy_sha1(teacher)} if header else None,
        "budget": asdict(recipe.budget), "dcd": {**new["dcd"], "total_steps": None}, "group_size": new["group_size"],
        "seed": new["seed"], "precision": new["precision"], "device_type": "cpu",
    }


def test_a_distill_student_an_earlier_version_trained_is_reused_where_it_is(tiny_data_json, tmp_path):
    from dcd import cli

    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    out = tmp_path / "run"
    argv = ["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(tiny_data_json),
            "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--epochs", "1", "--num-negatives", "4",
            "--num-hard", "2", "--rerank-k", "3", "--no-fusion", "--no-baseline", "--student", "dual-bert32x1-vit32x1"]
    cli.main(argv)
    stage = Path(json.loads((out / "results.json").read_text())["stages"]["dcd"])
    new = json.loads((stage / "stage.json").read_text())["identity"]
    # as the layout before stage folders had it: runs/<run>/dcd with recipe.json (the old identity) and summary.json
    teacher = as_teacher(teachers.create_model("meter", checkpoint=teacher_dir))
    recipe = resolve(DistillSettings(data=str(tiny_data_json), student="dual-bert32x1-vit32x1", max_steps=2, epochs=1,
                                     batch_size=4, num_negatives=4, num_hard=2, teacher_checkpoint=str(teacher_dir)),
                     load_karpathy(tiny_data_json, split="train"))
    start = build_student("dual", recipe, teacher)
    [cache] = out.glob("score-cache-*")
    header = json.loads((cache / "header.json").read_text())
    shutil.move(str(stage), out / "dcd")
    (out / "dcd" / "stage.json").unlink()
    (out / "dcd" / "recipe.json").write_text(json.dumps(_old_form(new, recipe, start, teacher, header)))
    (out / "dcd" / "summary.json").write_text(json.dumps({"name": "dcd", "teacher": True, "train_seconds": 1.0,
                                                          "steps": 2}))
    cli.main(argv)
    again = json.loads((out / "results.json").read_text())
    assert again["stages"]["dcd"] == str(out / "dcd") and again["training"]["dcd"]["steps"] == 2
    assert not list((out / "students").glob("dual-dcd-*"))  # nothing retrained


def _train_baseline(data_json, run_dir, queue):
    torch.set_num_threads(1)
    splits = {role: load_karpathy(data_json, split=name) for role, name in (("train", "train"), ("val", "val"))}
    recipe = resolve(DistillSettings(data=str(data_json), student="dual-bert32x1-vit32x1", progress=False, max_steps=4,
                                     epochs=1, batch_size=4), splits["train"])
    _, summary = train_student("baseline", build_student("dual", recipe, None), None, recipe, splits, run_dir)
    queue.put(summary)


def test_two_processes_on_one_stage_train_it_once(tiny_data_json, tmp_path):
    """Two `dcd ablations` / `dcd distill` side by side on one folder: the second waits, then reuses the student."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    workers = [ctx.Process(target=_train_baseline, args=(tiny_data_json, tmp_path, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    summaries = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(60)
    assert summaries[0] == summaries[1]
    stage = Path(summaries[0]["stage"])
    steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 4  # one training run, not two interleaved
    assert (stage / "student" / "config.json").is_file() and not list(stage.parent.glob("*.tmp*"))
