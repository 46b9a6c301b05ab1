"""Out-of-fold teacher targets: K teachers, each scoring only the lists whose query it never trained on."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dcd
import students
from dcd import cli
from dcd.data import EvalImages, TrainPairs, load_karpathy
from dcd.out_of_fold import FOLD, FoldEnsemble, assign_folds, images_sha256, query_folds
from dcd.recipes import DistillSettings, RecipeError, resolve
from dcd.score_cache import TeacherScoreCache
from teachers import as_teacher
from teachers.meter import meter_preset


@pytest.fixture(scope="module")
def split(tiny_data_json):
    return load_karpathy(tiny_data_json, split="train")  # 16 images, 5 captions each


def _members():
    torch.manual_seed(1)
    first = meter_preset("roberta32x1-vit32x2")
    torch.manual_seed(2)
    return first, meter_preset("roberta32x1-vit32x2")


def test_folds_are_balanced_seeded_and_refused_when_impossible():
    fold = assign_folds(15, 2)
    assert torch.equal(fold, assign_folds(15, 2)) and not torch.equal(fold, assign_folds(15, 2, seed=1))
    assert sorted(torch.bincount(fold).tolist()) == [7, 8]
    assert torch.bincount(assign_folds(9, 3)).tolist() == [3, 3, 3]
    groups = [[0, 5, 6], [1, 2], [3], [4, 7, 8, 9]]  # dealt whole, largest first, to the emptier fold
    grouped = assign_folds(10, 2, groups=groups)
    assert all(len(set(grouped[g].tolist())) == 1 for g in groups) and sorted(torch.bincount(grouped).tolist()) == [5, 5]
    with pytest.raises(ValueError, match="exactly once"):
        assign_folds(4, 2, groups=[[0, 1], [1, 2, 3]])
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(10, 1)
    with pytest.raises(ValueError, match="cannot be dealt"):
        assign_folds(1, 2)


def test_caption_neighbours_share_a_fold(split):
    from dcd.data.neighbour_batches import caption_neighbours
    from dcd.out_of_fold import neighbour_groups

    groups = neighbour_groups(split)
    assert sorted(i for g in groups for i in g) == list(range(split.num_images)) and len(groups) > 2
    fold = assign_folds(split.num_images, 2, groups=groups)
    nearest = caption_neighbours(split, 1)[:, 0]
    assert torch.equal(fold, fold[nearest])  # every image is in its nearest neighbour's fold


def test_each_pair_is_scored_by_the_teacher_of_its_querys_fold(split):
    first, second = _members()
    fold = torch.tensor([0, 1] * 8)
    teacher = as_teacher(FoldEnsemble([first, second], fold))
    images = EvalImages(split, teacher.image_transform(False))
    pixels = teacher.collate_images([images[i] for i in range(4)])
    texts = teacher.tokenize([split.captions[5 * i] for i in range(4)])  # caption i belongs to image i
    img, txt = teacher.encode_images(pixels), teacher.encode_texts(texts)
    rows = torch.tensor([0, 0, 1, 1, 2, 3])
    cols = torch.tensor([0, 1, 1, 2, 0, 3])
    own = {f: as_teacher(m).score_pairs({k: v[rows] for k, v in pixels.items()}, {k: v[cols] for k, v in texts.items()})
           for f, m in enumerate((first, second))}
    assert not torch.allclose(own[0], own[1])  # two different teachers, or the test proves nothing
    by_image = teacher.score_index_pairs(query_folds(teacher, img, torch.arange(4)), txt, rows, cols)
    expected = torch.where(fold[rows] == 0, own[0], own[1])
    assert torch.allclose(by_image, expected, atol=1e-5)  # image->text lists: the image's fold
    by_caption = teacher.score_index_pairs(img, query_folds(teacher, txt, torch.arange(4)), rows, cols)
    assert torch.allclose(by_caption, torch.where(fold[cols] == 0, own[0], own[1]), atol=1e-5)  # text->image
    unmarked = teacher.score_index_pairs(img, txt, rows, cols)  # val / test: no fold, the mean
    assert torch.allclose(unmarked, (own[0] + own[1]) / 2, atol=1e-5)
    matrix = teacher.score_features(img, txt)
    assert torch.allclose(matrix[rows, cols], unmarked, atol=1e-5)
    # a plain teacher is left as it is; a query outside the folds' split is an error, not a silent wrap-around
    plain = as_teacher(first)
    assert query_folds(plain, img, torch.arange(4)) is img and FOLD not in img
    with pytest.raises(ValueError, match="has no fold"):
        query_folds(teacher, img, torch.tensor([0, 1, 2, 16]))


def test_the_score_cache_scores_each_image_with_its_folds_teacher(split, tmp_path):
    first, second = _members()
    fold = assign_folds(split.num_images, 2)
    ensemble = as_teacher(FoldEnsemble([first, second], fold))
    cache = TeacherScoreCache.build(ensemble, split, tmp_path / "folds", pool_size=6, batch_size=5, progress=False)
    alone = [TeacherScoreCache.build(as_teacher(m), split, tmp_path / f"member{f}", pool_size=6, batch_size=5,
                                     progress=False) for f, m in enumerate((first, second))]
    assert np.array_equal(cache.pool, alone[0].pool)  # the pools depend on the seed only
    image_of = split.caption_image_tensor()
    for f in (0, 1):
        rows = (fold == f).numpy()
        assert np.allclose(cache.scores[rows], alone[f].scores[rows], atol=1e-5)
        assert not np.allclose(cache.scores[rows], alone[1 - f].scores[rows], atol=1e-3)
        captions = (fold[image_of] == f).numpy()
        assert np.allclose(cache.positive[captions], alone[f].positive[captions], atol=1e-5)
    assert cache.header["teacher"] != alone[0].header["teacher"]  # the ensemble (and its folds) is the teacher


@pytest.mark.parametrize("corpus", [False, True])
def test_the_distiller_scores_each_list_with_its_querys_fold(split, monkeypatch, corpus):
    first, second = _members()
    fold = assign_folds(split.num_images, 2)
    teacher = FoldEnsemble([first, second], fold)
    corpus_args = {"captions": split.captions, "caption_image": split.caption_image_tensor()} if corpus else {}
    distiller = dcd.wrap(teacher, students.dual_test(pretrained=False), num_negatives=4, num_hard=2,
                         directions=("i2t", "t2i"), **corpus_args)
    images = [3, 8, 1, 12, 6, 15]  # one caption of each: a batch whose rows are not in image order
    batch = distiller.collate()([TrainPairs(split, distiller.transforms())[i * 5] for i in images])
    seen = []
    scored = FoldEnsemble.score_feature_pairs

    def spy(self, image_features, text_features):
        seen.append({side: features[FOLD].tolist() for side, features in (("image", image_features),
                                                                           ("text", text_features)) if FOLD in features})
        return scored(self, image_features, text_features)

    monkeypatch.setattr(FoldEnsemble, "score_feature_pairs", spy)
    out = distiller(batch)
    assert torch.isfinite(out["loss"]) and len(seen) >= 2
    assert all(len(marks) == 1 for marks in seen)  # one side marked per list: never a mix of both
    batch_folds = set(fold[images].tolist())
    i2t = [m["image"] for m in seen if "image" in m]
    t2i = [m["text"] for m in seen if "text" in m]
    assert i2t and t2i  # image->text lists by the image's fold, text->image lists by the caption's image's
    for marks in i2t + t2i:  # every mark is the fold of a batch image (the pair chunks select rows of the batch)
        assert set(marks) <= batch_folds
    # the text->image lists: each caption (batch row b) keeps the fold of its own image, in every pair it heads
    scored_t2i = t2i[0]  # the teacher's pass over every candidate: [caption b, candidate j], row by row
    per_caption = len(scored_t2i) // len(images)
    assert per_caption >= 2 and scored_t2i == [int(fold[images[b]]) for b in range(len(images))
                                               for _ in range(per_caption)]


def test_one_fold_keeps_the_teacher_identity_and_folds_need_a_teacher_dcd_trains(split):
    base = resolve(DistillSettings(), split)
    # the fields of a one-teacher identity, as every stored stage has them: a new field would orphan them all
    assert set(base.identity("teacher")) == {"family", "checkpoint", "config", "data", "device_type", "precision",
                                             "training"}
    assert resolve(DistillSettings(teacher_folds=1), split).identity("student") == base.identity("student")
    folded = resolve(DistillSettings(teacher_folds=2), split)
    assert folded.identity("teacher")["folds"] == 2
    assert folded.identity("student") != base.identity("student")  # another teacher: other students
    with pytest.raises(RecipeError, match="--teacher-folds"):
        resolve(DistillSettings(teacher_folds=2, data="coco", teacher_checkpoint="dandelin/x"), split)
    with pytest.raises(RecipeError, match="--teacher-folds 0"):
        resolve(DistillSettings(teacher_folds=0), split)


@pytest.mark.slow
def test_distill_with_out_of_fold_teachers_end_to_end(tiny_data_json, tmp_path, capsys, unit_teacher_recipe):
    unit_teacher_recipe(max_steps=2)
    run = tmp_path / "run"
    argv = ["distill", "--data", str(tiny_data_json), "--out", str(run), "--max-steps", "2", "--batch-size", "4",
            "--epochs", "1", "--rerank-k", "3", "--student", "dual-bert32x1-vit32x1", "--no-fusion",
            "--teacher-folds", "2"]
    # `dcd teacher --teacher-folds 2` trains both and scores val and test with their mean
    assert cli.main(["teacher", "--data", str(tiny_data_json), "--teacher-folds", "2"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["folds"] == 2 and 0 < shown["synthetic-test"]["rsum"] <= 600
    home = tmp_path / "home" / "teachers"
    members = sorted(p for p in home.iterdir() if p.is_dir() and (p / "model").is_dir())
    trained = {p: p.stat().st_mtime for p in members}
    assert cli.main(argv) == 0  # dcd distill finds them
    assert {p: p.stat().st_mtime for p in members} == trained
    assert len(members) == 2  # one teacher per fold, each in a stage folder of its own
    identities = [json.loads((p / "stage.json").read_text())["identity"] for p in members]
    assert sorted(i["fold"] for i in identities) == [0, 1] and all(i["folds"] == 2 for i in identities)
    [ensemble] = [p for p in home.iterdir() if p.name.startswith("meter-folds2-")]
    folds = json.loads((ensemble / "folds.json").read_text())
    train = load_karpathy(tiny_data_json, split="train")
    assert sum(folds["fold_sizes"]) == train.num_images and len(folds["members"]) == 2
    for member in members:  # each trained on the other fold only: one epoch of 8 images' 40 captions at batch 32
        records = (member / "training" / "metrics.jsonl").read_text().splitlines()  # is 1 step (all 16 images: 2)
        assert json.loads(records[-1])["step"] == 1 == json.loads((member / "teacher.json").read_text())["steps"]
    results = json.loads((run / "results.json").read_text())
    assert [r["model"] for r in results["results"]][:3] == ["teacher", "baseline dual", "dcd dual"]
    assert results["teacher"]["folds"] == 2 and (ensemble / "scores").is_dir()  # its exhaustive test scores
    dcd_stage = json.loads((Path(results["stages"]["dcd"]) / "stage.json").read_text())
    assert dcd_stage["identity"]["teacher"]["scoring"]["teacher"]["folds"] == 2
    # a second run reuses both teachers and the students
    before = {p: p.stat().st_mtime for p in members}
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime for p in members} == before
    assert json.loads((run / "results.json").read_text())["training"] == results["training"]
    # a checkpoint given as the teacher cannot be cross-fitted: one line, the flag named
    checkpoint = tmp_path / "official"
    meter_preset("roberta32x1-vit32x2").save_pretrained(checkpoint)
    with pytest.raises(SystemExit) as stop:
        cli.main(["distill", "--data", str(tiny_data_json), "--teacher-checkpoint", str(checkpoint), "--out",
                  str(tmp_path / "other"), "--teacher-folds", "2"])
    assert str(stop.value.code).startswith("dcd: error: --teacher-folds 2:")



def test_a_fold_another_process_is_training_is_left_until_last(split, monkeypatch, caplog, unit_teacher_recipe):
    import logging

    from dcd import stages
    from dcd.teacher_training import fold_members, out_of_fold_teacher, teacher_dir

    unit_teacher_recipe(max_steps=1)
    recipe = resolve(DistillSettings(teacher_folds=2, progress=False), split)
    _, _, identities = fold_members(recipe, split)
    held = teacher_dir("meter", split, identity=identities[0])
    monkeypatch.setattr(stages, "stage_busy", lambda directory: Path(directory) == held and not (held / "model").exists())
    with caplog.at_level(logging.INFO, logger="dcd.teacher_training"):
        ensemble, info = out_of_fold_teacher(recipe, split, progress=False)
    order = [r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("teacher fold")]
    assert order == ["teacher fold 2 of 2", "teacher fold 1 of 2"]  # the free fold first, the held one after
    assert ensemble.folds == 2 and info["fold_sizes"] == [8, 8] and (held / "model").is_dir()
    # each fold teacher is keyed by the images it trained on: those outside its fold
    stored = json.loads((held / "stage.json").read_text())["identity"]
    outside = [i for i, f in enumerate(ensemble.fold_of_image.tolist()) if f != 0]
    assert stored["fold"] == 0 and stored["images"] == images_sha256(split.select_images(outside))


def test_the_target_sharpness_benchmark(tiny_data_json, tmp_path, capsys, monkeypatch):
    import importlib.util
    import sys

    from dcd.score_matrices import cached_score_matrix

    spec = importlib.util.spec_from_file_location("teacher_targets", Path(__file__).parents[1] / "benchmarks" /
                                                  "teacher_targets.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    flat = bench.list_statistics(np.zeros((3, 4)))
    assert flat == pytest.approx({"p_positive": 0.25, "entropy": float(np.log(4)), "positive_first": 1.0})
    sharp = bench.list_statistics(np.array([[10.0, 0.0], [0.0, 10.0]]))
    assert sharp["positive_first"] == 0.5 and sharp["entropy"] < 0.01
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    train = load_karpathy(tiny_data_json, split="train")
    cache = TeacherScoreCache.build(teacher, train, tmp_path / "cache", pool_size=6, near=2, progress=False)
    cached_score_matrix(teacher, load_karpathy(tiny_data_json, split="test"), tmp_path / "scores", progress=False)
    lists, header = bench.training_lists(tmp_path / "cache")
    assert lists.shape == (train.num_captions, 7) and np.allclose(lists[:, 0], cache.positive)
    [matrix] = (tmp_path / "scores").glob("*.npy")
    monkeypatch.setattr(sys, "argv", ["teacher_targets.py", "--pair", str(tmp_path / "cache"), str(matrix)])
    bench.main()
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in printed[1:]] == ["train", "test"]
    assert float(printed[1].split()[2]) == pytest.approx(bench.list_statistics(lists)["p_positive"], abs=1e-3)
