"""Binding accuracy: twin comparisons read from the embedded set's JSON, scored from streamed blocks."""
import json
from collections import Counter

import pytest
import torch

import students
from dcd.binding import BindingAccumulator, binding_accumulator, twin_comparisons
from dcd.data import CaptionSplit, build_synthetic, load_karpathy
from dcd.retrieval import evaluate


@pytest.fixture(scope="module")
def twins_split(tmp_path_factory):
    path = build_synthetic(tmp_path_factory.mktemp("twins"), sizes=(4, 0, 12), image_size=32)
    return load_karpathy(path, split="test")


def _truth(split):
    return (torch.arange(split.num_images)[:, None] == torch.tensor(split.caption_image)[None]).double()


def test_comparisons_pair_each_caption_with_every_twin_of_its_image(twins_split):
    images = [e for e in json.loads(twins_split.source.read_text())["images"] if e["split"] == "test"]
    group = [e["group"] for e in images]
    sizes = Counter(group)
    comparisons = twin_comparisons(twins_split)
    assert comparisons is not None
    for caption, image, twin in comparisons.tolist():
        assert twins_split.caption_image[caption] == image != twin and group[image] == group[twin]
    assert len(comparisons) == sum(sizes[group[i]] - 1 for i in twins_split.caption_image)
    no_source = CaptionSplit(twins_split.image_paths, twins_split.image_ids, twins_split.captions,
                             twins_split.caption_image, twins_split.caption_ids, "hand-made")
    assert twin_comparisons(no_source) is None and binding_accumulator(no_source) is None


def test_accuracy_is_100_for_the_truth_50_for_ties_0_for_the_opposite(twins_split):
    truth = _truth(twins_split)
    n_img, n_txt = truth.shape
    for scores, expected in ((truth, 100.0), (torch.zeros_like(truth), 50.0), (-truth, 0.0)):
        acc = binding_accumulator(twins_split)
        acc.add_block(None, None, scores)
        assert acc.compute() == {"binding": expected}
    # blocks in any order, indexed by slices or lists, give the same as the whole matrix
    acc = binding_accumulator(twins_split)
    rows, cols = torch.randperm(n_img), torch.randperm(n_txt)
    for r in (rows[: n_img // 2], rows[n_img // 2:]):
        acc.add_block(r.tolist(), slice(0, 20), truth[r][:, :20])
        acc.add_block(r, range(20, n_txt), truth[r][:, 20:])
    assert acc.compute() == {"binding": 100.0}
    partial = BindingAccumulator(twin_comparisons(twins_split), n_img, n_txt)
    partial.add_block(slice(0, n_img), slice(0, 10), truth[:, :10])
    with pytest.raises(ValueError, match="not scored"):
        partial.compute()


def test_evaluate_reports_binding_only_where_the_split_has_twins(twins_split):
    torch.manual_seed(0)
    model = students.dual_test()
    metrics = evaluate(model, twins_split, batch_size=5, text_batch_size=7, progress=False)
    assert 0.0 <= metrics["binding"] <= 100.0
    plain = CaptionSplit(twins_split.image_paths, twins_split.image_ids, twins_split.captions,
                         twins_split.caption_image, twins_split.caption_ids, "hand-made")
    assert "binding" not in evaluate(model, plain, progress=False)


def test_results_table_shows_binding_where_measured():
    from dcd.report import results_table

    base = {"i2t_r1": 1.0, "i2t_r5": 2.0, "i2t_r10": 3.0, "t2i_r1": 4.0, "t2i_r5": 5.0, "t2i_r10": 6.0, "rsum": 21.0,
            "seconds": 1.5, "speedup": 2.0}
    plain = results_table([{"model": "teacher", **base}])
    assert "binding" not in plain
    table = results_table([{"model": "teacher", **base, "binding": 75.25}, {"model": "dual -> teacher", **base}])
    head, _, first, second = table.splitlines()
    assert "binding" in head and "75.2" in first and "75.2" not in second
    assert len(first) == len(second) == len(head)  # the blank cell keeps the columns aligned
