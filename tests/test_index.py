"""dcd index / dcd search: resumable sharded encoding, corrupt images, student identity, exact flat search,
retrieval with a (tiny, quickly trained) student, re-ranking, the CLI and its errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dcd
from dcd import cli
from dcd.index import AnnParams, Index, StudentMismatch, image_folder
from dcd.index.encode import chunk_path, encode_chunks, merge_chunks
from students.dual import dual_test
from index_world import COLOURS, caption as _caption, make_world
from teachers.meter import meter_preset

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("index"))


def _build(world, out, **kwargs):
    return Index.build(world["student"], world["images"], out, progress=False, **kwargs)


def _files(path: Path) -> dict:
    return {name: (path / "images" / name).read_bytes() for name in ("vectors.npy", "items.jsonl", "skipped.txt")}


# ================================================================================ encoding: resume, shards, skips
def test_resume_after_a_kill_mid_encoding_gives_the_same_index(world, tmp_path):
    reference = _build(world, tmp_path / "whole", chunk_size=3)
    student = dcd.Index.load(tmp_path / "whole").student
    calls = {"n": 0}
    encode = student.encode_images

    def dies_on_the_third_batch(batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return encode(batch)

    student.encode_images = dies_on_the_third_batch
    with pytest.raises(KeyboardInterrupt):
        Index.build(student, world["images"], tmp_path / "killed", chunk_size=3, batch_size=3, progress=False)
    chunks = tmp_path / "killed" / "images" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["chunk-000000.npz", "chunk-000001.npz"]  # whole chunks only
    assert not (tmp_path / "killed" / "index.json").exists()
    calls["n"] = -100  # no more kills; count what the resumed run encodes
    resumed = Index.build(student, world["images"], tmp_path / "killed", chunk_size=3, batch_size=3, progress=False)
    assert calls["n"] == -100 + 2  # 10 files in chunks of 3: only chunks 2 and 3 were encoded again
    assert _files(tmp_path / "killed") == _files(tmp_path / "whole")
    assert not chunks.exists()  # merged and cleared
    query = reference.search(["a red picture", "a blue picture"], k=10)
    assert [h.ids for h in resumed.search(["a red picture", "a blue picture"], k=10)] == [h.ids for h in query]
    # a rerun of a finished index reuses its vectors: nothing is encoded
    calls["n"] = 0
    Index.build(student, world["images"], tmp_path / "killed", chunk_size=3, progress=False)
    assert calls["n"] == 0


def test_ranks_encode_their_shards_and_rank_zero_merges_the_same_vectors(world, tmp_path):
    single = _build(world, tmp_path / "single", chunk_size=3)
    expected = np.load(tmp_path / "single" / "images" / "vectors.npy")
    student = single.student
    corpus = image_folder(world["images"])
    work = tmp_path / "sharded"
    work.mkdir()
    assert encode_chunks(student, corpus, work, chunk_size=3, rank=1, world_size=2, progress=False) == 2
    assert sorted(p.name for p in work.glob("chunk-*")) == ["chunk-000001.npz", "chunk-000003.npz"]
    with pytest.raises(dcd.index.search.DataError, match="chunk 0 of 4 was not encoded"):
        merge_chunks(work, corpus, chunk_size=3)
    assert encode_chunks(student, corpus, work, chunk_size=3, rank=0, world_size=2, progress=False) == 2
    merged = merge_chunks(work, corpus, chunk_size=3)
    np.testing.assert_array_equal(merged.vectors, expected)
    assert chunk_path(work, 3).is_file() and len(merged.skipped) == 2


def test_corrupt_images_are_skipped_listed_and_counted(world, tmp_path, capsys):
    cli.main(["index", str(tmp_path / "idx"), "--student", str(world["student"]), "--images", str(world["images"]),
              "--no-progress"])
    printed = capsys.readouterr().out
    assert "8 indexed, 2 skipped" in printed
    skipped = (tmp_path / "idx" / "images" / "skipped.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in skipped) == ["broken.jpg", "truncated.jpg"]
    assert all("cannot decode image" in line.split("\t")[1] for line in skipped)
    items = [json.loads(line) for line in (tmp_path / "idx" / "images" / "items.jsonl").read_text().splitlines()]
    assert sorted(Path(i["path"]).stem for i in items) == sorted(COLOURS)  # nothing else lost
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["modalities"]["images"]["skipped"] == 2 and meta["modalities"]["images"]["index"] == {"type": "flat"}


# ================================================================================ identity
def test_a_query_through_an_index_built_by_another_student_is_refused(world, tmp_path, capsys):
    _build(world, tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["student"]["path"] == str(world["student"].resolve()) and meta["normalization"] == "l2"
    with pytest.raises(StudentMismatch, match="built by another student"):
        Index.load(tmp_path / "idx", student=world["other"])
    with pytest.raises(SystemExit, match=r"^dcd: error: index .* was built by another student"):
        cli.main(["search", str(tmp_path / "idx"), "a red picture", "--student", str(world["other"])])
    # the recorded student's weights changed since: refused too
    moved = tmp_path / "retrained"
    torch.manual_seed(5)
    dual_test().save_pretrained(moved)
    meta["student"]["path"] = str(moved)
    (tmp_path / "idx" / "index.json").write_text(json.dumps(meta))
    with pytest.raises(StudentMismatch):
        Index.load(tmp_path / "idx")


# ================================================================================ search
def test_flat_search_equals_a_brute_force_matrix_product(world, tmp_path):
    index = _build(world, tmp_path / "idx", ann_params=AnnParams(index_type="flat"))
    student = index.student
    paths = [item["path"] for item in index._part("images").items]
    with torch.no_grad():
        pixels = student.collate_images([student.image_transform()(Image.open(p)) for p in paths])
        gallery = student.encode_images(pixels)["embedding"].numpy()
        queries = [_caption(n) for n in COLOURS] + ["something else entirely"]
        embedded = student.encode_texts(student.tokenize(queries))["embedding"].numpy()
    brute = embedded @ gallery.T
    hits = index.search(queries, k=len(paths))
    for row, h in zip(brute, hits):
        assert h.ids == np.argsort(-row, kind="stable").tolist()
        np.testing.assert_allclose(h.scores, np.sort(row)[::-1], rtol=0, atol=1e-6)


def test_a_caption_finds_its_own_image_and_an_image_its_own_caption(world, tmp_path):
    index = Index.build(world["student"], [image_folder(world["images"]), dcd.index.caption_file(world["captions"])],
                        tmp_path / "idx", progress=False)
    for name in COLOURS:
        hits = index.search(_caption(name), k=10)
        assert hits.target == "images" and Path(hits.items[0]["path"]).stem == name  # learnt: top 1 of 8
        back = index.search(Path(hits.items[0]["path"]), k=3)
        assert back.target == "texts" and back.items[0]["colour"] == name
        same = index.search(_caption(name), k=1, target="texts")
        assert same.items[0]["caption"] == _caption(name) and same.scores[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_approximate_indexes_build_and_find_exact_neighbours_on_a_small_set(tmp_path, kind):
    from dcd.index import ann

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = AnnParams(index_type=kind, nlist=8, nprobe=8, pq_bytes=4).resolve(*vectors.shape)
    index = ann.build(vectors, spec, progress=False)
    scores, ids = ann.search(index, spec, vectors[:20], 5, vectors)
    assert ids[:, 0].tolist() == list(range(20))  # each vector is its own nearest neighbour
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="--pq-bytes 5 must divide"):
        AnnParams(index_type="ivfpq", pq_bytes=5).resolve(600, 16)
    with pytest.raises(ValueError, match="at least 256 vectors"):
        AnnParams(index_type="ivfpq").resolve(100, 16)
    assert AnnParams().resolve(100_001, 16)["type"] == "hnsw" and AnnParams().resolve(10, 16) == {"type": "flat"}


def test_rerank_with_a_teacher_checkpoint_and_a_fusion_student(world, tmp_path, capsys):
    import students

    cli.main(["index", str(tmp_path / "idx"), "--student", str(world["student"]), "--images", str(world["images"]),
              "--no-progress"])
    teacher = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher)
    capsys.readouterr()
    cli.main(["search", str(tmp_path / "idx"), "a red picture", "--rerank", "teacher", "--teacher-checkpoint",
              str(teacher), "--rerank-k", "5", "-k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["reranked_by"] == "meter teacher" and [h["rank"] for h in out["hits"]] == [1, 2, 3]
    scores = [h["score"] for h in out["hits"]]
    assert scores == sorted(scores, reverse=True) and all("retrieval_score" in h for h in out["hits"])
    fusion = tmp_path / "fusion"
    students.create_student("fusion", teacher=meter_preset("roberta32x1-vit32x2"), layers=(0,)).save_pretrained(fusion)
    cli.main(["search", str(tmp_path / "idx"), "a blue picture", "--rerank", "fusion", "--reranker", str(fusion),
              "--rerank-k", "4", "-k", "6"])
    lines = capsys.readouterr().out.splitlines()
    assert "re-ranked by fusion student" in lines[0] and len(lines) == 7
    assert lines[-1].split()[1] == "-"  # beyond --rerank-k: first-stage order, no re-ranker score


# ================================================================================ CLI
def test_search_cli_prints_ranked_results_and_json(world, tmp_path, capsys):
    cli.main(["index", str(tmp_path / "idx"), "--student", str(world["student"]), "--images", str(world["images"]),
              "--captions", str(world["captions"]), "--no-progress"])
    capsys.readouterr()
    assert cli.main(["search", str(tmp_path / "idx"), "a green picture", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("text -> images (flat index of 8)") and len(lines) == 4
    assert lines[1].split()[0] == "1" and Path(lines[1].split()[2]).stem == "green"
    image = next(world["images"].rglob("cyan.jpg"))
    cli.main(["search", str(tmp_path / "idx"), "--image", str(image), "-k", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "texts" and out["hits"][0]["item"] == {"caption": _caption("cyan"), "colour": "cyan"}


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    index = tmp_path / "idx"
    cli.main(["index", str(index), "--student", str(world["student"]), "--captions", str(world["captions"]),
              "--no-progress"])
    cases = [
        (["search", str(index), "   "], "empty query"),
        (["search", str(index)], "empty query"),
        (["search", str(tmp_path / "missing"), "a cat"], "no index at"),
        (["search", str(index), "a cat", "--target", "images"], "has no images"),
        (["search", str(index), "a cat", "--rerank", "fusion"], "--rerank fusion needs --reranker"),
        (["index", str(tmp_path / "x"), "--student", str(world["student"])], "nothing to index"),
        (["index", str(tmp_path / "x"), "--student", str(world["student"]), "--images", str(tmp_path / "nope")],
         "not a folder"),
        (["index", str(tmp_path / "x"), "--student", str(tmp_path / "nope"), "--images", str(world["images"])],
         "does not exist"),
        (["index", str(world["root"]), "--student", str(world["student"]), "--images", str(world["images"])],
         "is not a dcd index folder"),
        (["index", str(tmp_path / "x"), "--student", str(world["student"]), "--images", str(world["images"]),
          "--index-type", "ivfpq"], "at least 256 vectors"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        text = str(exc.value.code)
        assert text.startswith("dcd: error: ") and message in text and "\n" not in text, (argv, text)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "fine"}\n{"text": ""}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl, line 2: no non-empty 'caption'"):
        cli.main(["index", str(tmp_path / "y"), "--student", str(world["student"]), "--captions", str(bad)])
    with pytest.raises(SystemExit):
        cli.main(["search", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--image", "--rerank", "--rerank-k", "--teacher-checkpoint", "--reranker", "--json", "--ef-search"):
        assert option in help_text


@pytest.mark.slow
def test_torchrun_ranks_encode_shards_that_merge_into_the_single_process_index(world, tmp_path):
    _build(world, tmp_path / "single", chunk_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "dcd.cli",
           "index", str(tmp_path / "two"), "--student", str(world["student"]), "--images", str(world["images"]),
           "--chunk-size", "2", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("8 indexed, 2 skipped") == 1  # rank 0 reports
    assert _files(tmp_path / "two") == _files(tmp_path / "single")


def test_benchmark_quick_run_writes_table_json_and_plot(world, tmp_path, capsys):
    import importlib.util

    from dcd.data import build_synthetic

    spec = importlib.util.spec_from_file_location("index_bench", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "index.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = build_synthetic(tmp_path / "data", sizes=(4, 2, 4), image_size=32)
    teacher = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher)
    out = tmp_path / "results"
    assert bench.main(["--quick", "--sizes", "300,600", "--out", str(out), "--student", str(world["student"]),
                       "--teacher-checkpoint", str(teacher), "--e2e-data", str(data)]) == 0
    report = json.loads((out / "index.json").read_text())
    assert report["dim"] == 16 and [s["items"] for s in report["sizes"]] == [300, 600]
    rows = report["sizes"][-1]["rows"]
    assert {r["index"] for r in rows} == {"flat", "hnsw", "ivfpq"}
    assert all(0 <= r["recall_at_10"] <= 1 and r["p99_ms"] >= r["p50_ms"] > 0 for r in rows)
    assert next(r for r in rows if r["index"] == "flat")["recall_at_10"] == 1.0
    assert [r["items"] for r in report["projection"]] == [6000] * 3
    assert report["end_to_end"]["trained"] and report["end_to_end"]["dual + teacher rerank"]["p50_ms"] > 0
    assert (out / "index_recall_latency.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "recall@10" in printed and "HNSW at 600" in printed


@pytest.mark.slow
def test_distill_then_index_the_test_images_and_search_a_caption_with_teacher_rerank(tmp_path, capsys):
    """The issue's acceptance path on tiny settings: dcd distill -> dcd index (test split) -> dcd search, with and
    without teacher re-ranking. Two training steps learn nothing, so this checks the path and the plumbing; that a
    trained student finds a caption's image is test_a_caption_finds_its_own_image_and_an_image_its_own_caption."""
    from dcd.data import build_synthetic, load_karpathy

    data = build_synthetic(tmp_path / "data", sizes=(24, 4, 12), image_size=32)
    teacher = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher)
    run = tmp_path / "run"
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher), "--data", str(data), "--out",
              str(run), "--max-steps", "2", "--batch-size", "8", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--no-baseline", "--no-fusion"])
    student = run  # a run folder: the DCD dual student of its last run (latest.json)
    cli.main(["index", str(tmp_path / "idx"), "--student", str(student), "--data", str(data), "--split", "test",
              "--no-progress"])
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["student"]["recipe"] is not None  # the stage's training recipe travels with the index
    latest = json.loads((run / "latest.json").read_text())["stages"]["dcd"]
    assert meta["student"]["stage"] == json.loads((run / latest / "stage.json").read_text())["fingerprint"]
    assert meta["student"]["path"] == str((run / latest / "student").resolve())
    assert meta["modalities"]["images"]["count"] == 12 and meta["modalities"]["texts"]["count"] == 60
    test = load_karpathy(data, split="test")
    capsys.readouterr()
    cli.main(["search", str(tmp_path / "idx"), test.captions[7], "-k", "12", "--json"])
    first = json.loads(capsys.readouterr().out)["hits"]
    assert sorted(h["item"]["path"] for h in first) == sorted(map(str, test.image_paths))
    cli.main(["search", str(tmp_path / "idx"), test.captions[7], "-k", "10", "--json", "--rerank", "teacher",
              "--teacher-checkpoint", str(teacher), "--rerank-k", "12"])
    reranked = json.loads(capsys.readouterr().out)["hits"]
    assert len(reranked) == 10 and [h["score"] for h in reranked] == sorted((h["score"] for h in reranked), reverse=True)
    by_id = {h["id"]: h["score"] for h in first}
    assert all(h["retrieval_score"] == pytest.approx(by_id[h["id"]]) for h in reranked)
