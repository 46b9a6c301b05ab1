"""Retrieval metrics against a slow pure-Python reference; block accumulation; re-ranking; score matrices."""
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dcd.data import CaptionSplit
from dcd.retrieval import (
    RecallAccumulator, encode_images, encode_texts, evaluate, evaluate_rerank, recall_at_k, rerank, rerank_with_scorer,
    score_matrix,
)
from teachers.base import Scorer

KS = (1, 5, 10)


# ----------------------------------------------------------------------------- slow reference
def ref_ranks(scores, caption_image):
    """Pessimistic rank = number of negatives scoring >= the best positive. Plain lists, no tensors."""
    s = scores.tolist()
    n_img, n_txt = len(s), len(caption_image)
    i2t = []
    for i in range(n_img):
        pos = [t for t in range(n_txt) if caption_image[t] == i]
        if not pos:
            continue
        best = max(s[i][t] for t in pos)
        i2t.append(sum(1 for t in range(n_txt) if caption_image[t] != i and s[i][t] >= best))
    t2i = []
    for t in range(n_txt):
        best = s[caption_image[t]][t]
        t2i.append(sum(1 for i in range(n_img) if i != caption_image[t] and s[i][t] >= best))
    return i2t, t2i


def ref_recall(i2t, t2i, ks=KS):
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = 100.0 * sum(r < k for r in i2t) / len(i2t)
    for k in ks:
        out[f"t2i_r{k}"] = 100.0 * sum(r < k for r in t2i) / len(t2i)
    out["rsum"] = sum(out.values())
    return out


def ref_rerank(first, second, caption_image, k, add_first=False, ks=KS):
    """Candidates by stable descending first-stage order; key (1, new score) for candidates, (0, first) otherwise."""
    s1 = first.tolist()
    n_img, n_txt = len(s1), len(caption_image)

    def rank_of(query_scores, new_scores, positives):
        order = sorted(range(len(query_scores)), key=lambda c: (-query_scores[c], c))
        cands = set(order[:k])
        key = {c: ((1, new_scores(c) + (query_scores[c] if add_first else 0)) if c in cands else (0, query_scores[c]))
               for c in range(len(query_scores))}
        best = max(key[c] for c in positives)
        return sum(1 for c in key if c not in positives and key[c] >= best)

    i2t = []
    for i in range(n_img):
        pos = {t for t in range(n_txt) if caption_image[t] == i}
        if pos:
            i2t.append(rank_of(s1[i], lambda t: second(i, t), pos))
    t2i = []
    for t in range(n_txt):
        col = [s1[i][t] for i in range(n_img)]
        t2i.append(rank_of(col, lambda i: second(i, t), {caption_image[t]}))
    return ref_recall(i2t, t2i, ks)


def random_case(rng, integer=True, min_img=1, max_img=12):
    n_img = rng.randint(min_img, max_img)
    caption_image = []
    for i in range(n_img):
        caption_image += [i] * rng.choice([0, 1, 2, 4, 5, 5, 6, 7])
    if not caption_image:
        caption_image = [0]
    rng.shuffle(caption_image)
    g = torch.Generator().manual_seed(rng.randrange(10**6))
    n_txt = len(caption_image)
    scores = torch.randint(0, 4, (n_img, n_txt), generator=g).float() if integer else torch.randn(n_img, n_txt,
                                                                                                  generator=g)
    return scores, caption_image


def assert_close(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-9), (key, a, b)


# ----------------------------------------------------------------------------- recall_at_k
def test_hand_example():
    # 3 images; image 0 has captions 0, 1; image 1 has caption 2; image 2 has captions 3, 4, 5
    caption_image = [0, 0, 1, 2, 2, 2]
    scores = torch.tensor([
        [0.1, 0.9, 0.5, 0.2, 0.0, 0.3],  # best positive 0.9 first -> rank 0
        [0.7, 0.1, 0.6, 0.0, 0.0, 0.0],  # positive 0.6 below 0.7 -> rank 1
        [0.4, 0.4, 0.4, 0.0, 0.4, 0.1],  # best positive 0.4 ties three negatives -> rank 3 (pessimistic)
    ])
    m = recall_at_k(scores, torch.tensor(caption_image), ks=(1, 2, 5))
    assert m["i2t_r1"] == pytest.approx(100 / 3) and m["i2t_r2"] == pytest.approx(200 / 3) and m["i2t_r5"] == 100
    # t2i ranks: cap0: 0.1 vs .7,.4 -> 2; cap1: .9 -> 0; cap2: .6 vs .5,.4 -> 0; cap3: 0 vs .2,0 -> 2;
    # cap4: .4 vs 0,0 -> 0; cap5: .1 vs .3,0 -> 1
    assert m["t2i_r1"] == pytest.approx(300 / 6) and m["t2i_r2"] == pytest.approx(400 / 6) and m["t2i_r5"] == 100
    assert list(m) == ["i2t_r1", "i2t_r2", "i2t_r5", "t2i_r1", "t2i_r2", "t2i_r5", "rsum"]


@pytest.mark.parametrize("integer", [True, False])
def test_matches_reference_on_random_cases(integer):
    rng = random.Random(1 if integer else 2)
    for _ in range(60):
        scores, caption_image = random_case(rng, integer)
        expected = ref_recall(*ref_ranks(scores, caption_image))
        for chunk in (1, 3, 1000):
            assert_close(recall_at_k(scores, torch.tensor(caption_image), chunk_size=chunk), expected)


def test_constant_scores_are_never_right_and_order_does_not_matter():
    caption_image = torch.arange(20).repeat_interleave(5)
    m = recall_at_k(torch.zeros(20, 100), caption_image)
    assert m["i2t_r1"] == m["t2i_r10"] == m["rsum"] == 0.0
    # permuting candidates does not change anything (no index-based tie breaking)
    scores = torch.randint(0, 3, (20, 100)).float()
    perm = torch.randperm(100)
    assert_close(recall_at_k(scores[:, perm], caption_image[perm]), recall_at_k(scores, caption_image))


def test_half_precision_and_device_independent_inputs():
    scores, caption_image = random_case(random.Random(5), integer=True, min_img=6)
    assert_close(recall_at_k(scores.half(), caption_image), recall_at_k(scores.double(), caption_image))
    assert_close(recall_at_k(scores.long(), caption_image), recall_at_k(scores, caption_image))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="finite"):
        recall_at_k(torch.tensor([[float("nan"), 1.0]]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="text columns"):
        recall_at_k(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([0, 1]), ks=(0,))


def test_block_accumulation_equals_full_matrix():
    rng = random.Random(3)
    for _ in range(25):
        scores, caption_image = random_case(rng, integer=True, min_img=2)
        n_img, n_txt = scores.shape
        expected = recall_at_k(scores, torch.tensor(caption_image))
        # random partition of (permuted) rows and columns into blocks, fed in random order
        rows, cols = list(range(n_img)), list(range(n_txt))
        rng.shuffle(rows), rng.shuffle(cols)
        row_cuts = sorted(rng.sample(range(1, n_img), rng.randint(0, min(3, n_img - 1)))) if n_img > 1 else []
        col_cuts = sorted(rng.sample(range(1, n_txt), rng.randint(0, min(3, n_txt - 1)))) if n_txt > 1 else []
        row_blocks = [rows[a:b] for a, b in zip([0] + row_cuts, row_cuts + [n_img])]
        col_blocks = [cols[a:b] for a, b in zip([0] + col_cuts, col_cuts + [n_txt])]
        blocks = [(r, c) for r in row_blocks for c in col_blocks]
        rng.shuffle(blocks)
        acc = RecallAccumulator(torch.tensor(caption_image), n_img)
        for r, c in blocks:
            acc.add_block(torch.tensor(r), c, scores[r][:, c])
        assert_close(acc.compute(), expected)
    # slices work too, and a missing block is detected
    scores = torch.randn(6, 12)
    caption_image = torch.arange(6).repeat_interleave(2)
    acc = RecallAccumulator(caption_image, 6)
    acc.add_block(slice(0, 4), slice(0, 12), scores[:4])
    with pytest.raises(ValueError, match="exactly once"):
        acc.compute()
    acc.add_block(slice(4, 6), slice(None), scores[4:])
    assert_close(acc.compute(), recall_at_k(scores, caption_image))


# ----------------------------------------------------------------------------- re-ranking
def test_rerank_matches_reference():
    rng = random.Random(4)
    for trial in range(30):
        first, caption_image = random_case(rng, integer=True, min_img=2, max_img=9)
        second_table = torch.randint(0, 3, first.shape, generator=torch.Generator().manual_seed(trial)).float()
        k = rng.randint(1, 6)
        add = trial % 2 == 1
        got = rerank(first, lambda i, t: second_table[i, t], torch.tensor(caption_image), k=k, add_first_stage=add,
                     pair_batch_size=7)
        expected = ref_rerank(first, lambda i, t: second_table[i][t].item(), caption_image, k, add)
        assert_close(got, expected)


def test_rerank_with_itself_on_all_candidates_is_the_first_stage():
    rng = random.Random(6)
    for _ in range(10):
        scores, caption_image = random_case(rng, integer=True, min_img=2)
        caption_image = torch.tensor(caption_image)
        full = recall_at_k(scores, caption_image)
        n = max(scores.shape)
        assert_close(rerank(scores, lambda i, t: scores[i, t], caption_image, k=n), full)
        assert_close(rerank(scores, lambda i, t: scores[i, t], caption_image, k=n, add_first_stage=True), full)
        # continuous scores (no ties): any k gives back the first stage, R@K > k included
        cont = torch.randn(scores.shape)
        assert_close(rerank(cont, lambda i, t: cont[i, t], caption_image, k=3), recall_at_k(cont, caption_image))


def test_perfect_second_stage_gives_r1_100_when_positive_in_top_k():
    g = torch.Generator().manual_seed(0)
    n_img, per = 30, 5
    caption_image = torch.arange(n_img).repeat_interleave(per)
    scores = torch.rand(n_img, n_img * per, generator=g)  # a poor first stage, no ties
    first = recall_at_k(scores, caption_image)
    assert first["i2t_r1"] < 50
    oracle = lambda i, t: (caption_image[t] == i).float()  # noqa: E731
    k = max(n_img, n_img * per)
    perfect = rerank(scores, oracle, caption_image, k=k)
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 100.0
    # with a smaller k, R@1 = share of queries whose positive is among the k candidates = first-stage R@k
    perfect10 = rerank(scores, oracle, caption_image, k=10)
    assert perfect10["i2t_r1"] == pytest.approx(first["i2t_r10"])
    assert perfect10["t2i_r1"] == pytest.approx(first["t2i_r10"])
    assert perfect10["t2i_r10"] == pytest.approx(first["t2i_r10"])


# ----------------------------------------------------------------------------- score matrix with a fake Scorer
class FakeScorer(Scorer):
    """Tiny cross-encoder-like scorer: text features are token sequences of the batch's own length."""

    family = "fake"
    pair_chunk = 7  # exercise the chunked default score_features

    def __init__(self, dim=8):
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.proj = nn.Linear(3, dim)

    def image_transform(self, train=False):
        def transform(image):
            return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 255.0
        return transform

    def tokenize(self, texts):
        ids = [[1 + (sum(map(ord, w)) % 49) for w in t.split()] for t in texts]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}

    def encode_images(self, images):
        mask = images["pixel_mask"].unsqueeze(1).float()
        mean = (images["pixel_values"] * mask).sum((2, 3)) / mask.sum((2, 3))
        return {"embedding": torch.tanh(self.proj(mean))}

    def encode_texts(self, texts):
        return {"tokens": self.embed(texts["input_ids"]), "mask": texts["attention_mask"]}

    def score_feature_pairs(self, image_features, text_features):
        mask = text_features["mask"].unsqueeze(-1).float()
        pooled = (text_features["tokens"] * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (image_features["embedding"] * torch.tanh(pooled)).sum(-1) * 3


CAPTIONS = ["a red circle", "a blue square left of a green triangle", "two", "a purple cross above a small white disk",
            "big", "a yellow diamond", "the tiny red box is under the large blue circle", "green"]


def _tiny_split(tmp_path, n_img=4):
    paths = []
    for i in range(n_img):
        p = tmp_path / f"im{i}.jpg"
        Image.new("RGB", (6 + i, 5), (40 * i, 200 - 30 * i, 90)).save(p, quality=95)
        paths.append(p)
    caption_image = [i % n_img for i in range(len(CAPTIONS))]
    return CaptionSplit(paths, list(range(n_img)), list(CAPTIONS), caption_image, list(range(len(CAPTIONS))), "tiny")


def test_score_matrix_equals_direct_score(tmp_path):
    torch.manual_seed(0)
    model = FakeScorer().eval()
    split = _tiny_split(tmp_path)
    from dcd.data import EvalImages, load_image

    t = model.image_transform()
    images = model.collate_images([t(load_image(p)) for p in split.image_paths])
    texts = model.tokenize(split.captions)
    with torch.no_grad():
        direct = model.score(images, texts)
    # inputs dict, dataset and text batches of different token lengths
    m1 = score_matrix(model, images, split.captions, image_batch_size=3, text_batch_size=3, progress=False)
    m2 = score_matrix(model, EvalImages(split, t), split.captions, image_batch_size=2, text_batch_size=5,
                      progress=False)
    torch.testing.assert_close(m1, direct)
    torch.testing.assert_close(m2, direct)
    # streaming into an accumulator == recall of the matrix
    acc = RecallAccumulator(split.caption_image_tensor(), split.num_images)
    assert score_matrix(model, images, texts, 3, 3, progress=False, on_block=acc.add_block, return_matrix=False) is None
    assert_close(acc.compute(), recall_at_k(direct, split.caption_image_tensor()))
    # evaluate: the model's own transform / collate / tokenize, metrics + elapsed seconds, mode restored
    model.train()
    metrics = evaluate(model, split, batch_size=3, text_batch_size=3, progress=False)
    assert model.training
    elapsed = metrics.pop("elapsed_s")
    assert elapsed >= 0
    assert_close(metrics, recall_at_k(direct, split.caption_image_tensor()))
    # re-rank with the scorer's own features on all candidates == exhaustive
    img_f = encode_images(model, images, batch_size=3)
    txt_f = encode_texts(model, split.captions, batch_size=3)  # different token lengths -> concat pads
    reranked = rerank_with_scorer(direct, model, img_f, txt_f, split.caption_image_tensor(), k=len(CAPTIONS))
    assert_close(reranked, recall_at_k(direct, split.caption_image_tensor()))
    both = evaluate_rerank(model, model, split, k=len(CAPTIONS), batch_size=3, progress=False)
    assert both.pop("elapsed_s") >= 0
    assert_close({k: v for k, v in both.items() if not k.startswith("first_")}, metrics)
