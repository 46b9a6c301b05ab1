"""Precision per stage: what ``auto`` chooses, that the choice is recorded and part of every identity,
and that a bf16 teacher ranks like the fp32 one (on a tiny model; timings live in benchmarks/throughput.py)."""
import json

import pytest
import torch

import teachers
from dcd import pipeline
from dcd.data.synthetic import build_synthetic
from dcd.data import load_image, load_karpathy
from dcd.score_cache import StaleCacheError, TeacherScoreCache
from dcd.score_matrices import cached_score_matrix
from teachers.precision import autocast, bf16_is_fast, choose, plan


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.setenv("DCD_CPU_BF16", "1")
    assert bf16_is_fast("cpu") and plan("auto", "cpu").to_dict() == \
        {"requested": "auto", "scoring": "bf16", "dual": "bf16", "cross": "bf16"}
    monkeypatch.setenv("DCD_CPU_BF16", "0")
    assert plan("auto", "cpu").to_dict() == {"requested": "auto", "scoring": "fp32", "dual": "fp32", "cross": "fp32"}
    # a precision asked for by name is used as it is, on any hardware; fp16 needs CUDA
    assert plan("bf16", "cpu").scoring == "bf16" and choose("fp32", "cpu", "scoring") == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        choose("fp16", "cpu", "dual")
    with pytest.raises(ValueError, match="precision must be one of"):
        choose("half", "cpu", "dual")


def test_teacher_scores_in_its_precision_and_returns_fp32():
    torch.manual_seed(0)
    model = teachers.create_model("meter", preset="roberta32x1-vit32x2")
    fp32, bf16 = teachers.as_teacher(model, "fp32"), teachers.as_teacher(model, "bf16")
    assert fp32.model is bf16.model and (fp32.scoring_precision, bf16.scoring_precision) == ("fp32", "bf16")
    assert teachers.as_teacher(bf16) is bf16  # no precision asked: the view as it is
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(torch.is_autocast_enabled("cpu")))
    images = model.collate_images([torch.randn(3, 32, 32) for _ in range(2)])
    texts = model.tokenize(["a red circle", "a blue square left of a green cross"])
    assert bf16.score(images, texts).dtype == torch.float32
    hook.remove()


def test_bf16_ranking_agrees_with_fp32_on_a_tiny_model(tmp_path):
    """The claim behind ``auto``: bf16 teacher passes rank the candidates as fp32 ones do."""
    torch.manual_seed(0)
    model = teachers.create_model("meter", preset="roberta32x1-vit32x2", initializer_range=0.1)
    split = load_karpathy(build_synthetic(tmp_path / "data", sizes=(8, 8, 24), image_size=32), split="test")
    scores = {p: cached_score_matrix(teachers.as_teacher(model, p), split, tmp_path / "scores", progress=False)
              for p in ("fp32", "bf16")}
    a, b = scores["fp32"][0], scores["bf16"][0]
    assert not torch.equal(a, b)  # bf16 really ran
    # an untrained model's scores lie close together (its top-1 margins are within bf16's rounding), so the
    # check is on the whole ranking: the two matrices order the pairs alike, and where fp32's top-1 leads by
    # more than twice bf16's largest error, bf16 picks the same one. The trained teacher's top-1 agreement on
    # the validation split is measured by benchmarks/throughput.py.
    error = (a - b).abs().max()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.995
    assert (a - b).abs().mean() < 0.1 * a.std()
    for fp32, bf16 in ((a, b), (a.t(), b.t())):
        top2 = fp32.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 2 * error
        assert torch.equal(fp32.argmax(1)[clear], bf16.argmax(1)[clear])
    # the refine: every list's head holds exact fp32 scores, so the fp32 top-1 is kept everywhere
    from dcd.score_matrices import refine_top

    assert scores["bf16"][1]["header"]["fp32_refined_top"] == 16
    pixels = model.collate_images([model.image_transform()(load_image(p)) for p in split.image_paths])
    bf16_view = teachers.as_teacher(model, "bf16")
    plain = bf16_view.score(pixels, model.tokenize(split.captions))
    refined = refine_top(bf16_view, plain, pixels, split.captions, top=3)
    head = plain.topk(3, dim=1).indices
    assert torch.allclose(refined.gather(1, head), a.gather(1, head), atol=1e-5)
    assert not torch.allclose(plain.gather(1, head), a.gather(1, head), atol=1e-5)
    # both matrices are kept, each under a header that names its precision
    assert sorted(p.name for p in (tmp_path / "scores").glob("*.npy")) == ["synthetic-test-bf16.npy", "synthetic-test.npy"]
    assert json.loads((tmp_path / "scores" / "synthetic-test-bf16.json").read_text())["header"]["precision"] == "bf16"
    assert "precision" not in scores["fp32"][1]["header"]  # fp32 caches keep the header they always had


def test_a_score_cache_of_one_precision_is_never_served_as_the_other(tmp_path):
    torch.manual_seed(0)
    model = teachers.create_model("meter", preset="roberta32x1-vit32x2")
    split = load_karpathy(build_synthetic(tmp_path / "data", sizes=(8, 2, 2), image_size=32), split="train")
    bf16 = TeacherScoreCache.build(teachers.as_teacher(model, "bf16"), split, tmp_path / "cache", pool_size=4,
                                   progress=False)
    assert bf16.header["precision"] == "bf16"
    with pytest.raises(StaleCacheError, match="'precision'"):  # refused, and left where it is
        TeacherScoreCache.build(teachers.as_teacher(model, "fp32"), split, tmp_path / "cache", pool_size=4,
                                progress=False)
    assert (tmp_path / "cache" / "scores.npy").is_file()
    fp32 = TeacherScoreCache.build(teachers.as_teacher(model, "fp32"), split, tmp_path / "cache-fp32", pool_size=4,
                                   progress=False)
    assert "precision" not in fp32.header and not torch.equal(torch.from_numpy(bf16.scores[:].copy()),
                                                              torch.from_numpy(fp32.scores[:].copy()))


def test_the_run_records_what_auto_chose(monkeypatch, tmp_path):
    monkeypatch.setenv("DCD_CPU_BF16", "1")
    settings = pipeline.DistillSettings(out=str(tmp_path))
    recipe = settings.recipe()
    assert recipe.precision == {"requested": "auto", "scoring": "bf16", "dual": "bf16", "cross": "bf16"}
    assert recipe.identity("score_cache")["precision"] == "bf16" and recipe.identity("teacher")["precision"] == "bf16"
    monkeypatch.setenv("DCD_CPU_BF16", "0")
    assert pipeline.DistillSettings(out=str(tmp_path)).recipe().identity("student") != recipe.identity("student")


def test_training_runs_under_the_chosen_autocast():
    from dcd.trainer import TrainConfig, Trainer

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(4, 1)

        def forward(self, batch):
            out = self.w(batch)
            seen.append(out.dtype)
            return {"loss": out.float().pow(2).mean()}

    data = torch.randn(8, 4)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        trainer = Trainer(Probe(), data, torch.stack, TrainConfig(batch_size=4, precision=precision, progress=False,
                                                                  save_every=0), out_dir="/tmp/unused-probe")
        assert trainer.precision == precision
        seen.clear()
        trainer.fit()
        assert seen and set(seen) == {dtype}


def test_autocast_refuses_an_unresolved_precision():
    with pytest.raises(ValueError, match="resolve 'auto'"):
        autocast("cpu", "auto")


def test_a_bf16_teacher_has_its_own_folder_and_is_found(unit_teacher_recipe, monkeypatch, tmp_path):
    from dcd import teacher_training

    unit_teacher_recipe(max_steps=1)
    train = load_karpathy(build_synthetic(tmp_path / "data", sizes=(8, 2, 2), image_size=32), split="train")
    _, info = teacher_training.embedded_teacher("meter", train, progress=False, precision="bf16")
    directory = teacher_training.teacher_dir("meter", train, precision="bf16")
    assert info["precision"] == "bf16" and (directory / "model").is_dir()
    assert json.loads((directory / "stage.json").read_text())["identity"]["precision"] == "bf16"
    monkeypatch.setenv("DCD_CPU_BF16", "1")  # what make distill trains here: found, never trained by a search
    assert teacher_training.find_embedded_teacher("meter", train) == directory
    monkeypatch.setenv("DCD_CPU_BF16", "0")  # an fp32 machine looks for the fp32 one, which was never trained
    assert teacher_training.find_embedded_teacher("meter", train) is None
    assert not teacher_training.teacher_dir("meter", train).exists()  # and the bf16 one cleared nothing


@pytest.mark.slow
def test_throughput_benchmark_writes_its_figures(monkeypatch, tmp_path):
    """benchmarks/throughput.py end to end at the smallest size (timings are its output, never asserted)."""
    from dcd.bench import throughput

    monkeypatch.setenv("DCD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DCD_CPU_BF16", "1")
    results = throughput.main(["--images", "3", "--steps", "10", "--stages", "dual-baseline", "--compare-fp32",
                               "--out", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert written["precision_plan"]["scoring"] == "bf16" and "random weights" in written["scoring"]["teacher"]
    assert written["scoring_pairs_per_s"]["fp32"] > 0 and written["scoring_pairs_per_s"]["bf16"] > 0
    assert 0 <= written["ranking_top1_agreement"] <= 1
    for key, precision in (("training_steps", "bf16"), ("training_steps_fp32", "fp32")):
        row = written[key]["dual-baseline"]
        assert row["precision"] == precision and row["student_step_ms"] > 0 and row["student_model_ms"] > 0
        assert set(row["parts_ms"]) == {"data", "teacher", "student_forward", "backward", "optimizer"}
    assert results["command"].endswith("--out " + str(tmp_path / "out"))
