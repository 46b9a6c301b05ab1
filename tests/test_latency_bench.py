"""benchmarks/latency.py: timing helpers, extrapolation, the chunked top-k, errors, and a --quick end-to-end run."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str, filename: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH_DIR / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timing():
    from dcd.bench import timing

    return timing


@pytest.fixture(scope="module")
def latency():
    return _load("latency_bench", "latency.py")


class FakeTimer:
    """perf_counter stand-in: each call to the timed function advances the clock by the next duration."""

    def __init__(self, durations):
        self.now = 0.0
        self.durations = list(durations)
        self.calls = 0

    def __call__(self):
        return self.now

    def step(self):
        self.calls += 1
        self.now += self.durations.pop(0)


# ============================================================================================ timing helper
def test_time_call_warmup_is_untimed_and_stats_are_over_repeats(timing):
    clock = FakeTimer([100.0, 3.0, 1.0, 2.0, 10.0, 4.0])  # the first is the warm-up call
    syncs = []
    t = timing.time_call(clock.step, repeats=5, warmup=1, sync=lambda: syncs.append(1), timer=clock)
    assert clock.calls == 6
    assert t.times == (3.0, 1.0, 2.0, 10.0, 4.0)
    assert (t.median, t.min, t.max) == (3.0, 1.0, 10.0)
    assert (t.q1, t.q3) == (2.0, 4.0)
    assert len(syncs) == 6  # once after the warm-up, once after every timed call


def test_time_call_even_repeats_median_and_errors(timing):
    clock = FakeTimer([1.0, 2.0, 4.0, 8.0])
    t = timing.time_call(clock.step, repeats=4, warmup=0, timer=clock)
    assert t.median == 3.0 and t.q1 == pytest.approx(1.75) and t.q3 == pytest.approx(5.0)
    with pytest.raises(ValueError):
        timing.time_call(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        timing.Timing(())


def test_extrapolation_and_sums(timing):
    per_batch = timing.Timing((0.8, 1.0, 1.6))  # seconds to score a batch of 8 pairs
    per_pair = per_batch.scaled(1 / 8)
    coco = timing.extrapolate(per_pair, 1, 5_000 * 25_000)
    assert coco.median == pytest.approx(1.0 / 8 * 125_000_000)
    assert (coco.min, coco.max) == (pytest.approx(0.1 * 125e6), pytest.approx(0.2 * 125e6))
    assert timing.extrapolate(per_batch, 8, 16).summary() == per_batch.scaled(2).summary()
    # stages in sequence: min + min, median + median, max + max
    total = timing.Timing((1.0, 3.0, 2.0)) + timing.Timing((10.0, 30.0, 20.0))
    assert (total.min, total.median, total.max) == (11.0, 22.0, 33.0)
    assert sum([timing.Timing((1.0,)), timing.Timing((2.0,))]).median == 3.0
    with pytest.raises(ValueError):
        timing.extrapolate(per_batch, 0, 10)


def test_peak_memory_cpu_sees_a_large_allocation(timing):
    with timing.PeakMemory("cpu") as small:
        torch.ones(10)
    with timing.PeakMemory("cpu") as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB
        x += 1
    assert big.peak_mb > 0 and "RSS" in big.kind
    if "lifetime" not in big.kind:  # reset worked: the big block shows up in the second peak only
        assert big.peak_mb >= small.peak_mb + 32


# ============================================================================================ cost model
def test_unit_counts_and_model_arithmetic(latency):
    c = latency.unit_counts(1_000, 5_000, 16)
    assert c == {"images": 1_000, "texts": 5_000, "pairs": 5_000_000, "candidates": 96_000}
    assert latency.query_counts("i2t", 1_000, 5_000, 16) == {"images": 1, "texts": 0, "pairs": 5_000, "candidates": 16}
    assert latency.query_counts("t2i", 1_000, 5_000, 16) == {"images": 0, "texts": 1, "pairs": 1_000, "candidates": 16}

    T = latency.Timing

    def cost(seconds):
        return latency.Cost(T((seconds,)), "pair", 8, 1, 1.0, "test")

    costs = {name: cost(s) for name, s in {
        "naive_pair": 1e-1, "teacher_image": 1e-2, "teacher_text": 1e-3, "teacher_pair": 5e-2,
        "fusion_image": 1e-2, "fusion_text": 1e-3, "fusion_pair": 2e-2, "teacher_rerank_pair": 6e-2,
        "fusion_rerank_pair": 3e-2,
        "dual_image": 4e-3, "dual_text": 5e-4, "similarity": 1e-9,
    }.items()}
    wl = latency.Workload("toy", 100, 500)
    rows = [latency.strategy_row(s, costs, {}, wl, 4) for s in latency.STRATEGIES]
    latency.add_speedups(rows)
    by = {r["strategy"]: r for r in rows}
    assert by["1_teacher_naive"]["total_seconds"]["median"] == pytest.approx(100 * 500 * 0.1)
    assert by["1_teacher_naive"]["speedup"] == 1.0
    assert by["2_teacher_cached"]["total_seconds"]["median"] == pytest.approx(100 * 1e-2 + 500 * 1e-3 + 50_000 * 5e-2)
    dual = 100 * 4e-3 + 500 * 5e-4 + 50_000 * 1e-9
    assert by["4_dual"]["total_seconds"]["median"] == pytest.approx(dual)
    assert by["5b_rerank_teacher"]["total_seconds"]["median"] == pytest.approx(dual + 1.0 + 0.5 + 600 * 4 * 6e-2)
    assert by["5a_rerank_fusion"]["total_seconds"]["median"] == pytest.approx(dual + 1.0 + 0.5 + 600 * 4 * 3e-2)
    assert by["5b_rerank_teacher"]["per_query_seconds"]["i2t"]["median"] == pytest.approx(
        4e-3 + 500 * 1e-9 + 1e-2 + 4 * 6e-2)
    assert by["1_teacher_naive"]["per_query_seconds"]["t2i"]["median"] == pytest.approx(100 * 0.1)
    assert by["4_dual"]["speedup"] == pytest.approx(5000 / dual)
    assert "extrapolated" in by["1_teacher_naive"]["measured_on"] and "sample of 8" in by["1_teacher_naive"]["measured_on"]
    assert latency.modelled_seconds("4_dual", costs, 100, 500, 4) == pytest.approx(dual)
    # a stage run in full replaces its extrapolation and is reported as such
    full = {("similarity", "pairs"): latency.Measured(T((2.0,)), 5.0, "test")}
    row = latency.strategy_row("4_dual", costs, full, wl, 4)
    assert row["total_seconds"]["median"] == pytest.approx(dual - 50_000 * 1e-9 + 2.0)
    assert row["measured_on"].startswith("full: similarity+top-k; sample of 8")
    assert row["measured_on"].endswith("extrapolated: dual img, dual cap")


def test_similarity_topk_matches_the_full_matrix(latency):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(37, 8, generator=g), torch.randn(91, 8, generator=g)
    i2t, t2i = latency.similarity_topk(img, txt, k=5, chunk=10)
    sim = img @ txt.T
    assert torch.equal(i2t, sim.topk(5, dim=1).indices)
    assert torch.equal(t2i, sim.T.topk(5, dim=1).indices)
    i2t, t2i = latency.similarity_topk(img[:3], txt, k=5, chunk=2)  # k larger than the image count
    assert t2i.shape == (91, 3) and torch.equal(t2i, (img[:3] @ txt.T).T.topk(3, dim=1).indices)


# ============================================================================================ errors and end to end
def test_cuda_without_cuda_is_a_clear_error(latency, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        latency.main(["--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert exc.value.code != 0
    assert "CUDA" in str(exc.value.code) and "--device cpu" in str(exc.value.code)


def test_teacher_checkpoint_needs_one_family(latency, tmp_path):
    with pytest.raises(SystemExit) as exc:
        latency.main(["--device", "cpu", "--teacher-checkpoint", str(tmp_path / "x.ckpt"), "--out", str(tmp_path)])
    assert "--teacher meter" in str(exc.value.code)


def test_checkpoint_of_the_wrong_family_is_named(latency, tmp_path):
    from students import FusionStudent
    from teachers.meter import meter_preset

    meter_dir = meter_preset("roberta32x1-vit32x2").save_pretrained(tmp_path / "meter_teacher")
    with pytest.raises(SystemExit) as exc:
        latency.main(["--device", "cpu", "--quick", "--teacher", "vilt", "--teacher-checkpoint", str(meter_dir),
                      "--out", str(tmp_path / "out")])
    assert str(meter_dir) in str(exc.value.code) and "meter" in str(exc.value.code)

    fusion_dir = FusionStudent.from_teacher(meter_preset("roberta32x1-vit32x2")).save_pretrained(tmp_path / "fusion")
    with pytest.raises(SystemExit) as exc:
        latency.main(["--device", "cpu", "--quick", "--teacher", "vilt", "--student-checkpoint", str(fusion_dir),
                      "--out", str(tmp_path / "out")])
    message = str(exc.value.code)
    assert str(fusion_dir) in message and "'meter'" in message and "teacher_family" in message

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"family": "meter"}))
    with pytest.raises(SystemExit) as exc:
        latency.main(["--device", "cpu", "--quick", "--teacher", "meter", "--student-checkpoint", str(tmp_path / "other"),
                      "--out", str(tmp_path / "out")])
    assert str(tmp_path / "other") in str(exc.value.code) and "'dual' or 'fusion'" in str(exc.value.code)


@pytest.mark.slow
def test_quick_run_end_to_end(latency, tmp_path):
    latency.main(["--device", "cpu", "--quick", "--teacher", "meter", "--dataset", "flickr30k", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "latency.json").read_text())
    (result,) = report["results"]
    assert (result["teacher"], result["n_images"], result["n_texts"]) == ("meter", 1_000, 5_000)
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"1_teacher_naive", "2_teacher_cached", "3_fusion_exhaustive", "4_dual",
                         "5a_rerank_fusion", "5b_rerank_teacher"}
    for r in rows.values():
        assert r["total_seconds"]["median"] > 0 and r["total_seconds"]["min"] > 0
        assert r["per_query_seconds"]["i2t"]["median"] > 0 and r["per_query_seconds"]["t2i"]["median"] > 0
        assert r["peak_memory_mb"] > 0 and r["measured_on"]
    assert rows["1_teacher_naive"]["speedup"] == 1.0
    assert "extrapolated" in rows["1_teacher_naive"]["measured_on"]
    assert rows["4_dual"]["total_seconds"]["median"] < rows["1_teacher_naive"]["total_seconds"]["median"]
    assert rows["4_dual"]["speedup"] > 1.0
    png = (tmp_path / "latency_vs_corpus.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_quick_run_times_every_strategy_in_each_precision(latency, tmp_path):
    latency.main(["--device", "cpu", "--quick", "--teacher", "meter", "--dataset", "flickr30k", "--precision",
                  "fp32,bf16", "--repeats", "1", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "latency.json").read_text())
    assert report["settings"]["precision"] == ["fp32", "bf16"]
    assert [(r["teacher"], r["precision"]) for r in report["results"]] == [("meter", "fp32"), ("meter", "bf16")]
    assert all(len(r["rows"]) == 6 for r in report["results"])
    assert set(report["teachers"]) == {"meter fp32", "meter bf16"} and set(report["curves"]) == set(report["teachers"])
    with pytest.raises(SystemExit, match="fp16 needs --device cuda"):
        latency.main(["--device", "cpu", "--quick", "--precision", "fp16", "--out", str(tmp_path)])


def test_vilt_teacher_cost_sizes_bracket_the_dual_student(capsys, monkeypatch):
    """The two ViLT sizes the issue-12 note cites: the embedded one below the 14.3 M dual student, the
    MiniLM-size one above it; the script prints a finite rate for each."""
    cost = _load("vilt_teacher_cost", "vilt_teacher_cost.py")
    from teachers.vilt import vilt_preset

    params = {name: sum(p.numel() for p in vilt_preset("vit128x4", **o).parameters()) for name, o in cost.SIZES.items()}
    small, large = params.values()
    assert small < 14.3e6 < large
    monkeypatch.setattr(sys, "argv", ["vilt_teacher_cost.py", "--side", "2", "--repeats", "1"])
    cost.main()
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 2 and all(float(row.split()[-2]) > 0 for row in rows)
