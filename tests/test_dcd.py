"""The DCD method: losses, weights, hard-negative alignment, candidates, score cache and the Distiller."""
import math

import pytest
import numpy as np
import torch

import dcd
import students
from dcd import candidates as cands
from dcd.data import build_synthetic, load_karpathy
from dcd.hard_negatives import gather, select_hard
from dcd.losses import contrastive_loss, distill_loss, self_loss
from dcd.score_cache import StaleCacheError, TeacherScoreCache
from dcd.trainer import TrainConfig
from dcd.weighting import AlphaSchedule, distill_weights, dynamic_weights, entropy_share
from teachers.meter import meter_preset


# ------------------------------------------------------------------------------------------ losses
def test_losses_match_hand_computation():
    s = torch.tensor([[2.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 1.0, 0.0]])
    ps = [math.exp(x) for x in (2.0, 0.0, -1.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [math.exp(x) for x in (1.0, 1.0, 0.0)]
    pt = [p / sum(pt) for p in pt]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert distill_loss(s, t, "kl").item() == pytest.approx(kl, rel=1e-5)
    assert distill_loss(s, t, "mse").item() == pytest.approx((1 + 1 + 1) / 3, rel=1e-6)
    # temperature: T^2 * KL of the softened distributions
    t2 = [math.exp(x / 2) for x in (1.0, 1.0, 0.0)]
    t2 = [p / sum(t2) for p in t2]
    s2 = [math.exp(x / 2) for x in (2.0, 0.0, -1.0)]
    s2 = [p / sum(s2) for p in s2]
    assert distill_loss(s, t, "kl", 2.0).item() == pytest.approx(4 * sum(a * math.log(a / b) for a, b in zip(t2, s2)), rel=1e-5)
    assert self_loss(s, "ce").item() == pytest.approx(-math.log(ps[0]), rel=1e-6)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    bce = (-math.log(sig(2.0)) - math.log(1 - sig(0.0)) - math.log(1 - sig(-1.0))) / 3
    assert self_loss(s, "bce").item() == pytest.approx(bce, rel=1e-6)
    with pytest.raises(ValueError, match="distill_loss"):
        distill_loss(s, t, "l1")


def test_contrastive_loss_treats_same_image_rows_as_positives():
    emb = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    ids = torch.tensor([0, 0, 1])
    loss = contrastive_loss(emb, emb, torch.tensor(10.0), ids)
    logits = 10.0 * emb @ emb.t()
    target = torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]])
    expected = -(target * torch.log_softmax(logits, -1)).sum(-1)
    assert torch.allclose(loss, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ weights
def test_dynamic_weights_formulas():
    logits = torch.tensor([[5.0, 0.0, 0.0], [1.0, 1.0, 1.0], [2.0, 1.0, 0.0]])
    p = torch.softmax(logits, -1)
    h = -(p * p.log()).sum(-1)
    w = entropy_share(logits)
    assert torch.allclose(w, h / h.sum())
    assert w.sum().item() == pytest.approx(1.0)
    _, r = dynamic_weights(logits)
    u = h / math.log(3)  # entropy over its maximum: a scale that does not shrink with the batch size
    assert torch.allclose(r, distill_weights(u)) and torch.allclose(r, torch.softmax((1 - u) ** 2, 0))
    assert w.argmax() == 1 and r.argmax() == 0  # unsure teacher -> self-learning; confident -> distillation
    w2, r2 = dynamic_weights(logits / 0.5, 1.0)
    assert torch.allclose(w2, entropy_share(logits, 0.5))


def test_alpha_schedule():
    assert AlphaSchedule(0.2).__call__(0.7) == 0.2
    lin = AlphaSchedule(0.5, 0.1, "linear")
    assert lin(0.0) == pytest.approx(0.5) and lin(0.5) == pytest.approx(0.3) and lin(1.0) == pytest.approx(0.1)
    cos = AlphaSchedule(0.5, 0.1, "cosine")
    assert cos(0.0) == pytest.approx(0.5) and cos(0.5) == pytest.approx(0.3) and cos(1.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="alpha_schedule"):
        AlphaSchedule(0.2, 0.2, "step")


def test_per_sample_distill_weights_change_the_gradient():
    """r_i must act on the per-sample distillation loss (in the reference it averages away)."""
    teacher = torch.tensor([[6.0, 0.0, 0.0], [0.5, 0.4, 0.3]])  # confident / unsure
    student = torch.zeros(2, 3, requires_grad=True)
    per_sample = distill_loss(student, teacher, "mse")
    _, r = dynamic_weights(teacher)
    (grad_dynamic,) = torch.autograd.grad((r * per_sample).sum(), student, retain_graph=True)
    (grad_uniform,) = torch.autograd.grad(per_sample.mean(), student)
    assert not torch.allclose(grad_dynamic, grad_uniform)
    # each sample's gradient is its uniform gradient scaled by B * r_i
    assert torch.allclose(grad_dynamic, grad_uniform * (2 * r)[:, None], atol=1e-6)
    assert r[0] > r[1]


# ------------------------------------------------------------------------------------------ alignment
def test_hard_negatives_aligned_when_teacher_ranks_a_negative_first():
    teacher = torch.tensor([[0.1, 5.0, 3.0, -1.0, 4.0]])  # the positive (column 0) ranked 4th
    ids = torch.tensor([[10, 11, 12, 13, 14]])  # caption ids of the candidates
    keep = select_hard(teacher, 2)
    assert keep.tolist() == [[0, 1, 4]]  # positive first, then the two hardest, teacher order
    assert gather(ids, keep).tolist() == [[10, 11, 14]]
    assert torch.equal(gather(teacher, keep), torch.tensor([[0.1, 5.0, 4.0]]))  # teacher column j <-> candidate j
    with pytest.raises(ValueError, match="num_hard"):
        select_hard(teacher, 5)


def test_random_captions_never_draw_the_images_own():
    caption_image = torch.arange(20).repeat_interleave(5)  # 20 images x 5 captions
    image_index = torch.arange(20).repeat(50)
    draws = cands.random_captions(image_index, caption_image, 15)
    assert draws.shape == (1000, 15)
    assert not (caption_image[draws] == image_index[:, None]).any()
    assert len(draws.unique()) > 90  # spread over the corpus


def test_in_batch_candidates_exclude_same_image_rows():
    image_index = torch.tensor([0, 0, 1, 2, 3])
    neg = cands.in_batch(image_index, 10)
    assert neg.shape == (5, 3)  # rows 0 and 1 have only 3 other-image rows
    assert not (image_index[neg] == image_index[:, None]).any()


# ------------------------------------------------------------------------------------------ distiller
@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    path = build_synthetic(root, sizes=(16, 2, 4), image_size=32)
    return load_karpathy(path, split="train")


def _setup(split, student="dual", **config):
    meter = meter_preset("roberta32x1-vit32x2")
    if student == "dual":
        model = students.dual_test(pretrained=False)
    else:
        model = students.create_student("fusion", teacher=meter, layers=(0, 2))
    config.setdefault("num_negatives", 5)
    config.setdefault("num_hard", 2)
    distiller = dcd.wrap(meter, model, captions=split.captions, caption_image=split.caption_image_tensor(), **config)
    return meter, model, distiller


def _batch(distiller, split, n=6):
    from dcd.data import TrainPairs

    pairs = TrainPairs(split, distiller.transforms())
    return distiller.collate()([pairs[i * 5] for i in range(n)])  # one caption of each of n images


@pytest.mark.parametrize("student", ["dual", "fusion"])
def test_teacher_bit_identical_and_only_student_trains(tiny_split, student):
    meter, model, distiller = _setup(tiny_split, student)
    before = {k: v.clone() for k, v in meter.state_dict().items()}
    assert all(not p.requires_grad for p in distiller.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in distiller.state_dict())
    trainable = [p for p in distiller.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} <= {id(p) for p in model.parameters()}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    distiller.train()
    assert not distiller.teacher.training
    for _ in range(3):
        out = distiller(_batch(distiller, tiny_split))
        assert torch.isfinite(out["loss"]) and out["distill"] > -1e-6  # a KL: never negative
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    for k, v in meter.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(distiller.step) == 3
    assert set(out["weights"]) == {"i2t", "t2i"} and out["weights"]["i2t"].shape == (2, 6)


@pytest.mark.parametrize("student", ["dual", "fusion"])
def test_batch_captions_are_encoded_once_among_the_candidates(tiny_split, student):
    """A positive is also a candidate of its own image: its features are reused, and the scores are the same."""
    _, model, distiller = _setup(tiny_split, student)
    distiller.eval()
    batch = _batch(distiller, tiny_split)
    encoded = []
    encode = model.encode_texts
    model.encode_texts = lambda texts: encoded.append(len(texts["input_ids"])) or encode(texts)
    with torch.no_grad():
        images = model.encode_images(batch["images"]["student"])
        known = model.encode_texts(batch["texts"]["student"])
        candidates = torch.cat([batch["caption_index"][:, None], torch.tensor([[1, 2]] * 6)], dim=1)
        encoded.clear()
        reused = distiller._score_captions(model, images, candidates, batch["caption_index"], known)
        assert encoded == [2]  # only the two captions the batch does not hold
        fresh = distiller._score_captions(model, images, candidates)
    assert encoded == [2, len(candidates.unique())]
    assert torch.allclose(reused, fresh, atol=1e-5)


def test_distiller_directions_and_baseline(tiny_split):
    _, _, distiller = _setup(tiny_split, directions=("t2i",))
    out = distiller(_batch(distiller, tiny_split))
    assert set(out["weights"]) == {"t2i"}
    baseline = dcd.wrap(None, students.dual_test(pretrained=False), captions=tiny_split.captions,
                        caption_image=tiny_split.caption_image_tensor(), num_hard=3)
    assert set(baseline.roles()) == {"student"}
    out = baseline(_batch(baseline, tiny_split))
    assert "distill" not in out and torch.isfinite(out["loss"])
    with pytest.raises(TypeError, match="unknown DCD option"):
        dcd.wrap(None, students.dual_test(pretrained=False), hard_negatives=3)


def test_in_batch_mode_without_corpus_and_nearest_negatives(tiny_split):
    meter = meter_preset("roberta32x1-vit32x2")
    distiller = dcd.wrap(meter, students.dual_test(pretrained=False), num_negatives=4, num_hard=2)
    out = distiller(_batch(distiller, tiny_split))
    assert torch.isfinite(out["loss"])
    _, _, nearest = _setup(tiny_split, negatives="nearest", refresh_every=2)
    out = nearest(_batch(nearest, tiny_split))
    assert nearest._caption_bank.shape[0] == tiny_split.num_captions and torch.isfinite(out["loss"])


def test_shared_storage_with_teacher_is_refused(tiny_split):
    meter = meter_preset("roberta32x1-vit32x2")
    with pytest.raises(ValueError, match="share storage"):
        dcd.wrap(meter, meter)


# ------------------------------------------------------------------------------------------ score cache
def test_score_cache_matches_live_teacher_and_rejects_stale(tiny_split, tmp_path):
    from teachers import as_teacher

    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    cache = TeacherScoreCache.build(teacher, tiny_split, tmp_path / "cache", pool_size=6, batch_size=5, progress=False)
    assert cache.pool.shape == (16, 6) and not (tiny_split.caption_image_tensor()[torch.from_numpy(cache.pool.copy())]
                                               == torch.arange(16)[:, None]).any()
    image_index, caption_index = torch.tensor([3, 7]), torch.tensor([15, 36])
    ids, logits = cache.lookup(image_index, caption_index, 4)
    assert ids.shape == logits.shape == (2, 5) and ids[:, 0].tolist() == [15, 36]
    from dcd.data import EvalImages

    images = EvalImages(tiny_split, teacher.image_transform(False))
    pixels = teacher.collate_images([images[3], images[3], images[7]])
    texts = teacher.tokenize([tiny_split.captions[int(c)] for c in (ids[0, 0], ids[0, 1], ids[1, 2])])
    live = teacher.score_pairs(pixels, texts)
    assert torch.allclose(live, torch.stack([logits[0, 0], logits[0, 1], logits[1, 2]]), atol=1e-4)
    # with no memory for caption features (every caption re-encoded per batch) the scores are the same
    reencoded = TeacherScoreCache.build(teacher, tiny_split, tmp_path / "reencoded", pool_size=6, batch_size=5,
                                        progress=False, text_memory_bytes=0)
    assert np.allclose(reencoded.scores, cache.scores, atol=1e-5)
    assert np.allclose(reencoded.positive, cache.positive, atol=1e-5)
    # reused when it matches, refused when stale
    again = TeacherScoreCache.build(teacher, tiny_split, tmp_path / "cache", pool_size=6, progress=False)
    assert again.header == cache.header
    with pytest.raises(StaleCacheError, match="pool_size"):
        TeacherScoreCache.open(tmp_path / "cache", expect={"pool_size": 8})
    # a distiller reads its teacher scores from the cache
    distiller = dcd.wrap(teacher, students.dual_test(pretrained=False), captions=tiny_split.captions,
                         caption_image=tiny_split.caption_image_tensor(), score_cache=cache, num_negatives=4,
                         num_hard=2, directions=("i2t",))
    out = distiller(_batch(distiller, tiny_split))
    assert torch.isfinite(out["loss"])


# ------------------------------------------------------------------------------------------ resume
def test_distiller_resume_after_kill_matches_uninterrupted(tiny_split, tmp_path):
    def run(out, kill_at=None, resume=False):
        torch.manual_seed(0)
        _, model, distiller = _setup(tiny_split, directions=("i2t", "t2i"))
        config = TrainConfig(epochs=2, batch_size=4, lr=1e-3, save_every=1, progress=False, log_every=1)
        from dcd.data import TrainPairs
        from dcd.trainer import Trainer

        def kill(step, _):
            if step == kill_at:
                raise KeyboardInterrupt

        trainer = Trainer(distiller, TrainPairs(tiny_split, distiller.transforms()), distiller.collate(), config,
                          out, on_step=kill)
        try:
            trainer.fit(resume=resume)
        except KeyboardInterrupt:
            pass
        return model, trainer

    full, _ = run(tmp_path / "full")
    run(tmp_path / "killed", kill_at=5)
    resumed, trainer = run(tmp_path / "killed", resume=True)
    assert trainer.global_step == 40
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_gap_weights_and_alpha_follow_what_the_student_has_yet_to_learn():
    from dcd.weighting import gap_alpha, gap_weights

    w, r = gap_weights(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.5, 0.5, 1.0]))
    assert torch.allclose(w, torch.tensor([0.25, 0.75, 0.0])) and torch.allclose(r, torch.tensor([0.25, 0.25, 0.5]))
    w, _ = gap_weights(torch.zeros(4), torch.ones(4))
    assert torch.allclose(w, torch.full((4,), 0.25))  # nothing left to learn anywhere: uniform
    assert gap_alpha(torch.tensor(1.0), torch.tensor(3.0), 0.5, 0.2) == 0.25  # a quarter of the loss is the gap
    assert gap_alpha(torch.tensor(9.0), torch.tensor(1.0), 0.5, 0.2) == 0.5  # kept within [alpha_end, alpha]
    assert gap_alpha(torch.tensor(0.0), torch.tensor(1.0), 0.5, 0.2) == 0.2
    assert "weighting" not in dcd.DCDConfig().to_dict()  # earlier students keep their identity
    with pytest.raises(ValueError, match="weighting"):
        dcd.DCDConfig(weighting="loss")


def test_the_distiller_weighs_by_the_student_losses_when_asked(tiny_split):
    torch.manual_seed(0)
    _, _, distiller = _setup(tiny_split, directions=("i2t",), weighting="gap", alpha=0.5, alpha_end=0.1,
                             alpha_schedule="gap")
    out = distiller(_batch(distiller, tiny_split))
    w, r = out["weights"]["i2t"]
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and torch.isclose(r.sum(), torch.tensor(1.0))
    assert r.std() > 0 and w.std() > 0  # per sample, not uniform
    share = float(out["distill"]) / (float(out["distill"]) + float(out["self"]))
    assert float(out["alpha"]) == pytest.approx(min(max(share, 0.1), 0.5), abs=1e-5)
    torch.manual_seed(0)
    _, _, paper = _setup(tiny_split, directions=("i2t",), alpha=0.5)  # the entropy weights stay the default
    assert paper.config.weighting == "entropy" and float(paper(_batch(paper, tiny_split))["alpha"]) == 0.5


def test_an_integer_alpha_is_the_same_identity_as_a_float_one():
    assert dcd.DCDConfig(alpha=1, temperature=2).to_dict() == dcd.DCDConfig(alpha=1.0, temperature=2.0).to_dict()
