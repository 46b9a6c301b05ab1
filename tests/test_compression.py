"""The compression experiment's pieces: the loss mix, teacher temperature, candidate selection, weights that
act, alpha schedules end to end, stage identities, cached evaluation matrices and the ablation runner."""
import json
import math
from pathlib import Path
from dataclasses import replace

import pytest
import torch

import dcd
import students
from dcd import ablations, pipeline, score_matrices
from dcd.data import load_karpathy
from dcd.losses import distill_loss
from dcd.pipeline import DistillSettings, build_student, train_student
from dcd.recipes import resolve
from dcd.stages import weights_sha256
from dcd.weighting import dynamic_weights
from teachers import as_teacher
from teachers.meter import meter_preset


@pytest.fixture(scope="module")
def data_json(tiny_data_json):
    return tiny_data_json


@pytest.fixture(scope="module")
def splits(tiny_splits):
    return tiny_splits


def _settings(data_json, tmp_path, **overrides):
    base = dict(data=str(data_json), student="dual-bert32x1-vit32x1", progress=False, max_steps=2, epochs=1, batch_size=4,
                num_negatives=4, num_hard=2, out=str(tmp_path / "run"))
    return DistillSettings(**{**base, **overrides})


# ------------------------------------------------------------------------------------------ losses and weights
def test_teacher_temperature_softens_only_the_target():
    teacher = torch.tensor([[8.0, -4.0, -4.0, -4.0]])
    student = torch.tensor([[1.0, 0.5, 0.0, 0.0]])
    sharp = distill_loss(student, teacher, "kl")
    soft = distill_loss(student, teacher, "kl", teacher_temperature=6.0)
    target = torch.softmax(teacher / 6.0, -1)
    expected = (target * (target.log() - torch.log_softmax(student, -1))).sum()
    assert torch.allclose(soft, expected[None]) and not torch.allclose(sharp, soft)


def test_margin_mse_ignores_offsets():
    teacher = torch.tensor([[5.0, 1.0, 2.0]])
    assert distill_loss(teacher - 3.0, teacher, "margin_mse").item() == pytest.approx(0.0)
    assert distill_loss(teacher * 2, teacher, "margin_mse").item() > 0


def test_temperature_with_mse_is_an_error():
    with pytest.raises(ValueError, match="KL loss only"):
        dcd.DCDConfig(distill_loss="mse", teacher_temperature=4.0)


def test_distillation_weights_spread_at_a_real_batch_size():
    """The reference's r is uniform at B=32 (finding 4 of the review); ours must vary with the teacher's certainty."""
    confident = torch.tensor([10.0, 0.0, 0.0, 0.0]).repeat(16, 1)
    unsure = torch.zeros(16, 4)
    w, r = dynamic_weights(torch.cat([confident, unsure]))
    assert r.sum().item() == pytest.approx(1.0) and w.sum().item() == pytest.approx(1.0)
    assert r[:16].min() / r[16:].max() > 2.5  # close to e: confident samples lean on the teacher
    assert w[16:].min() > w[:16].max()  # unsure samples lean on the label


def test_contrastive_loss_is_outside_the_alpha_mix(data_json, splits):
    train = splits["train"]
    meter = meter_preset("roberta32x1-vit32x2")

    def loss_parts(**config):
        torch.manual_seed(0)
        distiller = dcd.wrap(meter, students.dual_test(pretrained=False), captions=train.captions,
                             caption_image=train.caption_image_tensor(), num_negatives=4, num_hard=2, **config)
        from dcd.data import TrainPairs

        pairs = TrainPairs(train, distiller.transforms())
        batch = distiller.collate()([pairs[i * 5] for i in range(6)])
        torch.manual_seed(1)
        return distiller(batch)

    alpha = 0.3
    outside = loss_parts(alpha=alpha)
    assert torch.allclose(outside["loss"], outside["contrastive"] + alpha * outside["distill"]
                          + (1 - alpha) * outside["self"], atol=1e-5)
    inside = loss_parts(alpha=alpha, contrastive_in_mix=True)
    assert torch.allclose(inside["loss"], alpha * inside["distill"]
                          + (1 - alpha) * (inside["self"] + inside["contrastive"]), atol=1e-5)


def test_self_loss_leaves_out_false_negatives():
    from dcd.losses import self_loss

    student = torch.tensor([[1.0, 3.0, 0.0]])
    keep = torch.tensor([[True, False, True]])  # the teacher scored candidate 1 above the positive
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0]), -1)[0]
    assert self_loss(student, "ce", keep).item() == pytest.approx(expected.item())
    assert self_loss(student, "ce").item() > expected.item()
    bce = self_loss(student, "bce", keep).item()
    assert bce == pytest.approx((torch.nn.functional.softplus(torch.tensor(-1.0)) + torch.nn.functional.softplus(
        torch.tensor(0.0))).item() / 2)


def _one_batch_losses(splits, **config):
    train = splits["train"]
    torch.manual_seed(0)
    distiller = dcd.wrap(meter_preset("roberta32x1-vit32x2"), students.dual_test(pretrained=False), captions=train.captions,
                         caption_image=train.caption_image_tensor(), num_negatives=4, num_hard=2, **config)
    from dcd.data import TrainPairs

    pairs = TrainPairs(train, distiller.transforms())
    batch = distiller.collate()([pairs[i * 5] for i in range(6)])
    torch.manual_seed(1)
    return distiller(batch)


def test_false_negatives_are_counted_and_change_only_the_self_loss(splits):
    plain = _one_batch_losses(splits, alpha=0.3)
    denoised = _one_batch_losses(splits, alpha=0.3, drop_false_negatives=True)
    assert 0.0 <= float(denoised["false_negatives_i2t"]) <= 1.0
    assert torch.allclose(plain["distill"], denoised["distill"])
    assert float(denoised["self"]) <= float(plain["self"]) + 1e-6


def test_self_candidates_random_trains_the_self_loss_as_the_baseline_does(splits, monkeypatch):
    """With ``self_candidates="random"`` the self-learning loss draws fresh random candidates (as the
    baseline does) while the distillation term keeps the teacher's selection."""
    from dcd import candidates

    calls = []
    original = candidates.random_captions
    monkeypatch.setattr(candidates, "random_captions", lambda *a, **k: calls.append(a[-1]) or original(*a, **k))
    plain = _one_batch_losses(splits, alpha=0.3, directions=("i2t",))
    drawn = list(calls)
    calls.clear()
    separate = _one_batch_losses(splits, alpha=0.3, directions=("i2t",), self_candidates="random")
    assert drawn == [4] and calls == [4, 2]  # the teacher's K, then the baseline's k fresh ones
    assert torch.allclose(plain["distill"], separate["distill"])
    assert not torch.allclose(plain["self"], separate["self"])


def test_later_config_fields_keep_old_identities():
    """Students recorded before a DCDConfig field existed keep their identity while it is at its default."""
    assert "self_candidates" not in dcd.DCDConfig().to_dict()
    assert dcd.DCDConfig(drop_false_negatives=True).to_dict()["drop_false_negatives"] is True
    with pytest.raises(ValueError, match="self_candidates"):
        dcd.DCDConfig(self_candidates="nearest")


@pytest.mark.parametrize("selection", ["hardest", "random", "all"])
def test_candidate_selection(selection):
    from dcd.distiller import _select

    scores = torch.tensor([[0.0, 1.0, 5.0, 3.0, 2.0]]).repeat(50, 1)
    keep = _select(scores, 2, selection)
    assert (keep[:, 0] == 0).all()
    if selection == "hardest":
        assert keep[0].tolist() == [0, 2, 3]
    elif selection == "all":
        assert keep.shape == (50, 5)
    else:  # k distinct random negatives: sometimes not the teacher's hardest
        assert keep.shape == (50, 3) and (keep[:, 1] != keep[:, 2]).all()
        assert len({tuple(row) for row in keep[:, 1:].sort(1).values.tolist()}) > 1


# ------------------------------------------------------------------------------------------ alpha schedules
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alpha_schedule_trains_end_to_end(data_json, tmp_path, schedule):
    """`dcd distill --alpha-schedule linear|cosine` used to fail before training on a missing total_steps."""
    from dcd import cli

    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    cli.main(["distill", "--teacher", "meter", "--teacher-checkpoint", str(teacher_dir), "--data", str(data_json),
              "--student", "dual-bert32x1-vit32x1", "--out", str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4",
              "--epochs", "1", "--num-negatives", "4", "--num-hard", "2", "--no-fusion", "--no-baseline",
              "--alpha", "0.6", "--alpha-end", "0.0", "--alpha-schedule", schedule])
    stage = Path(json.loads((tmp_path / "run" / "results.json").read_text())["stages"]["dcd"])
    log = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    alphas = [r["alpha"] for r in log if "alpha" in r]
    # the log averages alpha over its steps: 0.6 for a constant alpha, lower as it moves towards 0
    assert alphas and 0.0 < alphas[-1] < 0.6 - 1e-3
    identity = json.loads((stage / "stage.json").read_text())["identity"]
    assert identity["dcd"]["alpha_schedule"] == schedule and identity["dcd"]["total_steps"] == 3


def test_alpha_schedule_spans_the_steps_the_trainer_runs(splits, tmp_path):
    """A schedule length given beforehand (the recipe's, from the data size) yields to the loop's own: under
    torchrun each rank runs 1/N of the steps, and alpha must still reach its end value."""
    train = splits["train"]
    distiller = dcd.wrap(meter_preset("roberta32x1-vit32x2"), students.dual_test(pretrained=False), captions=train.captions,
                         caption_image=train.caption_image_tensor(), num_negatives=4, num_hard=2, alpha=0.6,
                         alpha_end=0.0, alpha_schedule="linear", total_steps=1000)
    distiller.fit(train, tmp_path / "run", max_steps=3, batch_size=4, epochs=1, progress=False, log_every=1)
    assert distiller.config.total_steps == 3
    alphas = [json.loads(line)["alpha"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert alphas == pytest.approx([0.6, 0.4, 0.2])  # 1000 steps would have left it at 0.6, 0.5994, 0.5988
    # with gradient accumulation the schedule's clock (forward passes) runs grad_accum times per step
    distiller.fit(train, tmp_path / "accum", max_steps=2, batch_size=2, grad_accum=2, epochs=1, progress=False)
    assert distiller.config.total_steps == 4


# ------------------------------------------------------------------------------------------ stage identity
def test_stage_identity_retrains_on_every_setting_that_changes_the_student(data_json, splits, tmp_path):
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))

    def recipe(**overrides):
        return resolve(_settings(data_json, tmp_path, **overrides), splits["train"]).with_teacher_weights(
            weights_sha256(teacher))

    def train(**overrides):
        r = recipe(**overrides)
        _, summary = train_student("dcd", build_student("dual", r, teacher), teacher, r, splits, tmp_path / "run")
        return summary

    first = train()
    assert train(progress=False, num_workers=0) == first  # nothing that shapes the student changed: reused
    seeded = train(seed=1)
    assert seeded["stage"] != first["stage"] and Path(first["stage"]).is_dir()  # a new folder; the first one stays
    assert json.loads((Path(seeded["stage"]) / "stage.json").read_text())["identity"]["seed"] == 1
    # a student checkpoint is another start: retrained
    saved = tmp_path / "start"
    students.dual_test(pretrained=False).save_pretrained(saved)
    started = train(student_checkpoint=str(saved))
    identity = {s["stage"]: json.loads((Path(s["stage"]) / "stage.json").read_text())["identity"]
                for s in (first, started)}
    assert identity[started["stage"]]["student"]["start"] != identity[first["stage"]]["student"]["start"]
    # precision and another teacher are part of it too
    base = recipe()
    student = build_student("dual", base, teacher)
    start = weights_sha256(student)
    fp32, bf16 = (recipe(precision=p).identity("student", "dcd", start) for p in ("fp32", "bf16"))
    assert fp32 != bf16 and fp32["precision"]["training"] == "fp32" and bf16["precision"]["training"] == "bf16"
    assert bf16["precision"]["teacher_scoring"] == "bf16"  # a bf16 teacher pass is not an fp32 one
    assert base.with_teacher_weights("0" * 64).identity("student", "dcd", start) != base.identity("student", "dcd", start)
    assert recipe(progress=True).identity("student", "dcd", start) == base.identity("student", "dcd", start)
    # the baseline does not see the teacher: the teacher's weights and the method's knobs leave it as it is
    assert base.with_teacher_weights("0" * 64).identity("student", "baseline", start) == \
        base.identity("student", "baseline", start) == recipe(alpha=0.9).identity("student", "baseline", start)


def test_changing_the_seed_retrains(data_json, splits, tmp_path):
    markers = []
    for seed in (0, 0, 1):
        recipe = resolve(_settings(data_json, tmp_path, seed=seed), splits["train"])
        _, summary = train_student("baseline", build_student("dual", recipe, None), None, recipe, splits,
                                   tmp_path / "run")
        markers.append((Path(summary["stage"]) / "metrics.jsonl").stat().st_mtime_ns)
    assert markers[0] == markers[1] and markers[2] != markers[1]


# ------------------------------------------------------------------------------------------ evaluation cache
def test_cached_score_matrix_is_reused_and_rerank_matches(splits, tmp_path, caplog):
    import logging

    from dcd import retrieval

    split = splits["eval"]
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    scores, info = score_matrices.cached_score_matrix(teacher, split, tmp_path / "scores", progress=False)
    live = retrieval.evaluate(teacher, split, progress=False)
    assert info["metrics"]["rsum"] == pytest.approx(live["rsum"])
    again, info2 = score_matrices.cached_score_matrix(teacher, split, tmp_path / "scores", progress=False)
    assert torch.equal(scores, again) and info2 == info
    torch.manual_seed(3)
    with caplog.at_level(logging.INFO, logger="dcd"):
        _, other = score_matrices.cached_score_matrix(as_teacher(meter_preset("roberta32x1-vit32x2")), split,
                                                      tmp_path / "scores", progress=False)
    assert other["header"]["model"] != info["header"]["model"]  # another model: recomputed, not reused
    assert sum("recomputing" in r.getMessage() for r in caplog.records) == 1  # said once, not once per look
    # re-ranking all candidates with the model's own matrix gives the model's own recall
    first = torch.randn_like(scores)
    full = score_matrices.rerank_with_matrix(first, again, split, k=max(scores.shape))
    assert full["rsum"] == pytest.approx(info["metrics"]["rsum"])



def test_a_second_process_waits_for_the_exhaustive_pass_and_reads_it(splits, tmp_path, monkeypatch):
    import shutil
    import threading
    import time

    from dcd import retrieval
    from dcd.stages import stage_lock

    split = splits["eval"]
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    scores, info = score_matrices.cached_score_matrix(teacher, split, tmp_path / "first", progress=False)
    [matrix] = (tmp_path / "first").glob("*.npy")
    shared = tmp_path / "shared"
    shared.mkdir()
    held, released = threading.Event(), threading.Event()

    def other_sweep():  # holds the pass's lock, writes its result, then lets go
        with stage_lock(shared / matrix.stem):
            held.set()
            time.sleep(0.5)
            for path in (tmp_path / "first").iterdir():
                if not path.name.startswith("."):
                    shutil.copy(path, shared / path.name)
        released.set()

    thread = threading.Thread(target=other_sweep)
    thread.start()
    held.wait()
    monkeypatch.setattr(retrieval, "score_matrix", lambda *a, **k: pytest.fail("scored again while another pass ran"))
    again, info2 = score_matrices.cached_score_matrix(teacher, split, shared, progress=False)
    thread.join()
    assert released.is_set() and torch.equal(again, scores) and info2 == info


def test_rerank_curve_matches_each_depth_and_k_is_chosen_on_val(splits):
    from dcd import retrieval

    split = splits["eval"]
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    second = retrieval.score_matrix(teacher, retrieval.eval_images(teacher, split, 8, 0), split.captions,
                                    progress=False)
    first = torch.randn_like(second)
    calls = []

    def pairs(i, t):
        calls.append(len(i))
        return second[i, t]

    curve = score_matrices.rerank_curve(first, pairs, split, (1, 2, 3))
    for k in (1, 2, 3):  # one scoring pass serves every depth, each equal to re-ranking at that depth alone
        assert curve[k] == score_matrices.rerank_with_matrix(first, second, split, k)
    assert sum(calls) <= (split.num_images + split.num_captions) * 3
    assert score_matrices.plateau_k({1: {"i2t_r1": 10, "t2i_r1": 10}, 4: {"i2t_r1": 30, "t2i_r1": 20},
                                     8: {"i2t_r1": 30, "t2i_r1": 20.5}}) == 4
    student = students.dual_test(pretrained=False)
    k, val_curve = pipeline.choose_rerank_k(student, teacher, splits["val"], resolve(DistillSettings(progress=False)),
                                            (1, 2))
    assert k in (1, 2) and set(val_curve) == {1, 2}



def test_the_report_names_the_command_that_trains_a_row(tmp_path):
    import shlex

    from dcd import cli

    settings = DistillSettings(teacher="meter", epochs=8, teacher_folds=2, dynamic=False,
                               teacher_config={"max_steps": 3200, "epochs": 16}, directions=("i2t",), progress=False)
    command = ablations.sweep_command(settings, Path("runs/x"))
    assert command == ("dcd ablations --teacher-config epochs=16 --teacher-config max_steps=3200 --teacher-folds 2 "
                       "--epochs 8 --directions i2t --no-dynamic --out runs/x")
    args = cli.build_parser().parse_args(shlex.split(command)[1:] + ["--seeds", "0", "--methods", "dcd"])
    assert (args.epochs, args.teacher_folds, args.dynamic, args.directions) == (8, 2, False, "i2t")
    assert ablations.sweep_command(DistillSettings(), Path("runs/y")) == "dcd ablations --out runs/y"
    longer = ablations.sweep_command(DistillSettings(epochs=8), Path("runs/y"), fusion_epochs=16)
    assert longer == "dcd ablations --epochs 8 --fusion-epochs 16 --out runs/y"
    args = cli.build_parser().parse_args(shlex.split(longer)[1:])
    assert (args.epochs, args.fusion_epochs) == (8, 16)


def test_the_report_keeps_each_teachers_command(tmp_path):
    """METER and ViLT sweeps share compression.json: each writer replaces its own records and command only."""
    def record(teacher, seed):
        return {"teacher": teacher, "student": "fusion", "method": "baseline", "seed": seed, "params": 1e6,
                "test_rsum": 300.0 + seed}

    path = tmp_path / "compression.json"
    ablations.write_results([record("meter", 0)], path, "dcd ablations --epochs 8 --out runs/a")
    everything = ablations.write_results([record("vilt", 0), record("vilt", 1)], path,
                                         "dcd ablations --teacher vilt --epochs 8 --out runs/a")
    stored = json.loads(path.read_text())
    assert everything == stored["records"]  # what the val-curve figure is drawn from: every teacher's runs
    assert sorted((r["teacher"], r["seed"]) for r in stored["records"]) == [("meter", 0), ("vilt", 0), ("vilt", 1)]
    assert stored["commands"] == {"meter": "dcd ablations --epochs 8 --out runs/a",
                                  "vilt": "dcd ablations --teacher vilt --epochs 8 --out runs/a"}
    table = path.with_suffix(".md").read_text()
    assert "- meter: `dcd ablations --epochs 8 --out runs/a --seeds S --methods M --students K`" in table
    assert "- vilt: `dcd ablations --teacher vilt --epochs 8 --out runs/a --seeds S --methods M --students K`" in table


# ------------------------------------------------------------------------------------------ ablation runner
def test_ablation_runner_records_every_row_and_resumes(data_json, tmp_path):
    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    settings = _settings(data_json, tmp_path, teacher_checkpoint=str(teacher_dir), eval_split="test")
    out = tmp_path / "ablations"
    results = tmp_path / "compression.json"
    methods = ["baseline", "vanilla_kd", "dcd"]
    records = ablations.run_ablations(settings, seeds=(0, 1), methods=methods, kinds=("dual",), out=out,
                                      results_json=results)
    stored = json.loads(results.read_text())["records"]
    assert stored == records
    teacher_rows = [r for r in stored if r["method"] == "teacher"]
    assert len(teacher_rows) == 1 and "test_rsum" in teacher_rows[0]
    assert "val_rsum" not in teacher_rows[0]  # a sweep never starts the teacher's exhaustive val pass itself
    rows = [r for r in stored if r["method"] != "teacher"]
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, s) for m in methods for s in (0, 1))
    for r in rows:
        for key in ("teacher", "student", "method", "seed", "test_rsum", "test_i2t_r1", "test_t2i_r1", "params",
                    "val_rsum"):
            assert key in r, key
        assert r["student"] == "dual" and r["params"] < teacher_rows[0]["params"]
    table = results.with_suffix(".md").read_text()
    assert "± " in table and "vanilla_kd" in table
    assert f"`dcd ablations --data {data_json} --teacher-checkpoint {teacher_dir} " in table
    assert f"--out {out} --seeds S --methods M --students K`" in table  # the command that trains one row
    assert "test scoring (s)" in table and all(r.get("eval_seconds") is not None for r in stored)
    assert results.with_suffix(".png").is_file()
    # a second run trains nothing: every record is reused
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    again = ablations.run_ablations(settings, seeds=(0, 1), methods=methods, kinds=("dual",), out=out,
                                    results_json=results)
    assert again == records and mtimes == {p: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    # a report gathers what exists and trains nothing
    partial = ablations.run_ablations(settings, seeds=(0, 1, 2), methods=methods, kinds=("dual",), out=out,
                                      results_json=results, train_missing=False)
    assert partial == records and not list((out / "records").glob("dual-dcd-seed2-*"))
    # ... and shows the teacher's val figures once they are stored beside its test scores (`dcd teacher` does that)
    import teachers
    from dcd.score_matrices import cached_score_matrix

    _, val_info = cached_score_matrix(as_teacher(teachers.create_model("meter", checkpoint=teacher_dir)),
                                      load_karpathy(data_json, split="val"), out / "scores", progress=False)
    with_val = ablations.run_ablations(settings, seeds=(0, 1), methods=methods, kinds=("dual",), out=out,
                                       results_json=results, train_missing=False)
    assert with_val[0]["val_rsum"] == round(val_info["metrics"]["rsum"], 2) and with_val[1:] == records[1:]
    # ... of the settings asked for only: records of a sweep with another budget are not mixed in
    from dataclasses import replace

    other = ablations.run_ablations(replace(settings, lr=0.5), seeds=(0, 1), methods=methods, kinds=("dual",), out=out,
                                    results_json=results, train_missing=False)
    assert [r["method"] for r in other] == ["teacher"]
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    # another teacher's sweep in the same folder shares the rows trained without a teacher, shown under its teacher
    from teachers.vilt import vilt_preset

    vilt_preset("vit32x2").save_pretrained(tmp_path / "vilt")
    vilt = ablations.run_ablations(replace(settings, teacher="vilt", teacher_checkpoint=str(tmp_path / "vilt")),
                                   seeds=(0, 1), methods=methods, kinds=("dual",), out=out, results_json=results,
                                   train_missing=False)
    assert [(r["teacher"], r["method"]) for r in vilt] == [("vilt", "teacher"), ("vilt", "baseline"), ("vilt", "baseline")]
    assert [r["test_rsum"] for r in vilt[1:]] == [r["test_rsum"] for r in records if r["method"] == "baseline"]
    # every record names its student's stage folder and stores the row's recipe
    for path in (out / "records").iterdir():
        stored = json.loads(path.read_text())
        assert Path(stored["stage"]).parent == out / "students" and stored["recipe"]["seed"] == stored["record"]["seed"]
    with pytest.raises(ValueError, match="unknown method"):
        ablations.run_ablations(settings, methods=["dcd_magic"], out=out)
    with pytest.raises(ValueError, match="--fusion-epochs must be a positive"):
        ablations.run_ablations(settings, kinds=("fusion",), out=out, fusion_epochs=0)


def test_fusion_rows_are_measured_as_re_rankers_of_the_dual_baseline(data_json, tmp_path):
    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    settings = _settings(data_json, tmp_path, teacher_checkpoint=str(teacher_dir), eval_split="test",
                         max_steps=None)  # whole epochs: each ends in a val pass
    out = tmp_path / "ablations"
    with pytest.raises(ValueError, match="re-rank the dual baseline of the same seed"):
        ablations.run_ablations(settings, seeds=(0,), methods=["dcd"], kinds=("fusion",), out=out,
                                results_json=tmp_path / "c.json")
    records = ablations.run_ablations(settings, seeds=(0,), methods=["baseline", "dcd", "dcd_denoised_t2i"],
                                      kinds=("dual", "fusion"), out=out, results_json=tmp_path / "c.json")
    fusion = [r for r in records if r["student"] == "fusion"]
    dual_baseline = next(r for r in records if r["student"] == "dual" and r["method"] == "baseline")
    assert [r["method"] for r in fusion] == ["baseline", "dcd", "dcd_denoised_t2i"]  # both DCD recipes
    gains = {g["method"]: g["differences"] for g in ablations.rerank_gains(records)}
    for r in fusion:  # the first stage's own recall is the dual baseline's: the same model, the same split
        assert r["rerank_k"] == ablations.FUSION_RERANK_K and r["first_stage_test_rsum"] == dual_baseline["test_rsum"]
        assert gains[r["method"]] == [pytest.approx(r["test_rsum"] - dual_baseline["test_rsum"])]
        assert 0 <= r["test_i2t_r1"] <= 100 and r["params"] < records[0]["params"]
        # its training curve: val RSUM after each epoch, re-ranking the same shortlist; the last is the record's
        from dcd.report import read_metrics
        curve = [m["eval"]["rsum"] for m in read_metrics(Path(r["stage"]) / "metrics.jsonl") if "eval" in m]
        assert len(curve) == settings.epochs and curve[-1] == pytest.approx(r["val_rsum"], abs=0.01)
    # a longer budget for the fusion rows alone: a new record, re-ranking the same dual baseline (not retrained)
    longer = ablations.run_ablations(settings, seeds=(0,), methods=["baseline"], kinds=("dual", "fusion"), out=out,
                                     results_json=tmp_path / "c.json", fusion_epochs=settings.epochs + 1)
    assert longer[1] == {**dual_baseline, "teacher": longer[1]["teacher"]}
    assert longer[2]["first_stage_test_rsum"] == dual_baseline["test_rsum"]
    assert longer[2]["steps"] > fusion[0]["steps"] and longer[2]["stage"] != fusion[0]["stage"]
    curve = [m for m in read_metrics(Path(longer[2]["stage"]) / "metrics.jsonl") if "eval" in m]
    assert len(curve) == settings.epochs + 1
    assert "--fusion-epochs" in json.loads((tmp_path / "c.json").read_text())["commands"]["meter"]


def test_a_fusion_students_val_pass_scores_only_the_student_at_the_scoring_precision(tiny_splits):
    """The first stage (a dual student) is scored at its own precision: its dot products in bf16 tie, and it lost
    31 val RSUM when the whole val pass ran under bf16 autocast."""
    seen = {}

    def spy(name, model):
        encode = model.encode_images

        def encode_images(images):
            seen.setdefault(name, set()).add(torch.is_autocast_enabled("cpu"))
            return encode(images)
        model.encode_images = encode_images
        return model

    first = spy("first stage", students.dual_test(pretrained=False).eval())
    student = spy("student", students.dual_test(pretrained=False).eval())  # the trainer puts it in eval mode
    recipe = resolve(DistillSettings(progress=False, precision="bf16"))
    metrics = pipeline.rerank_validation(first, tiny_splits["val"], 2, recipe)(student)
    assert seen == {"first stage": {False}, "student": {True}} and "rsum" in metrics
    assert all(p.requires_grad for p in student.parameters())  # scored as it will be, and still training
    assert first.training is False and student.training is False  # each back in the mode it was in
    import teachers  # once trained, the student itself is what a Teacher view wraps, not the view around it

    assert as_teacher(teachers.ScoringView(student, "fp32")).model is student


def test_summary_means_and_stds():
    records = [{"teacher": "meter", "student": "dual", "method": "dcd", "seed": s, "params": 10, "test_rsum": v}
               for s, v in enumerate((400.0, 410.0, 420.0))]
    (row,) = ablations.summarise(records)
    assert row["test_rsum"] == pytest.approx(410.0) and row["test_rsum_std"] == pytest.approx(10.0)
    assert math.isfinite(row["test_rsum_std"]) and row["seeds"] == 3


def test_paired_differences_and_val_curves(tmp_path):
    records = [{"teacher": "meter", "student": "dual", "method": m, "seed": s, "params": 1, "test_rsum": v}
               for m, s, v in (("baseline", 0, 300.0), ("baseline", 1, 310.0), ("dcd", 0, 305.0), ("dcd", 1, 309.0),
                               ("dcd", 2, 400.0))]  # seed 2 has no baseline: left out of the pairs
    (pair,) = ablations.paired_differences(records)
    assert pair["method"] == "dcd" and pair["differences"] == [5.0, -1.0] and pair["mean"] == pytest.approx(2.0)
    assert "| meter | dual | dcd | 2 | +2.0 ± 4.2 | [-36.1, +40.1] | +5.0, -1.0 |" in ablations.markdown_table(records)
    single = [r for r in records if r["seed"] == 0]  # one pair: a difference, no spread
    assert "| meter | dual | dcd | 1 | +5.0 | - | +5.0 |" in ablations.markdown_table(single)
    log = tmp_path / "dual" / "dcd" / "seed0" / "metrics.jsonl"
    log.parent.mkdir(parents=True)
    log.write_text("\n".join(json.dumps({"step": e * 10, "epoch": e, "eval": {"rsum": 100.0 + e}}) for e in (1, 2)))
    assert ablations.val_curves(tmp_path, records) == {"dual": {"dcd": [[(1, 101.0), (2, 102.0)]]}}
    assert ablations.plot_val_curves(tmp_path, records, tmp_path / "curves.png").is_file()
    assert ablations.plot_val_curves(tmp_path / "empty", records, tmp_path / "none.png") is None


def test_the_student_aware_rows_change_one_part_of_the_two_direction_recipe_each():
    recipe = ablations.KNOWN_METHODS["dcd_denoised_t2i"]
    for name, change in (("dcd_gap_weights_denoised_t2i", {"weighting": "gap"}),
                         ("dcd_gap_alpha_denoised_t2i", {"alpha_schedule": "gap"})):
        row = ablations.KNOWN_METHODS[name]
        assert {k: v for k, v in row.items() if recipe.get(k) != v} == change
        assert ablations.ABLATION_OF[name] == "dcd_denoised_t2i" and ablations.TWO_DIRECTION_CONTROL[name] == "baseline_t2i"
        config = resolve(replace(DistillSettings(), **row)).dcd_config()
        assert getattr(config, next(iter(change))) == "gap"


def test_paired_differences_carry_a_t_interval():
    from dcd.stats import mean_interval, t_quantile_975

    low, high = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])  # mean 3, sd 1.581, 4 degrees of freedom: t 2.776
    assert (low, high) == pytest.approx((3 - 2.776 * 1.5811 / 5 ** 0.5, 3 + 2.776 * 1.5811 / 5 ** 0.5), abs=1e-3)
    assert mean_interval([4.0]) is None and t_quantile_975(100) == 1.96
    records = [{"teacher": "meter", "student": "dual", "method": m, "seed": s, "params": 1, "test_rsum": v}
               for s, (b, d) in enumerate([(300, 330), (310, 335), (305, 331)]) for m, v in (("baseline", b), ("dcd", d))]
    (pair,) = ablations.paired_differences(records)
    assert pair["ci95"][0] > 0  # +30, +25, +26: separable from zero at 95 %


def test_each_ablation_row_is_paired_with_the_full_recipe_it_takes_parts_out_of():
    rows = (("baseline", 0, 300.0), ("dcd", 0, 320.0), ("vanilla_kd", 0, 310.0), ("dcd_denoised_t2i", 0, 360.0),
            ("dcd_denoised_t2i", 1, 350.0), ("vanilla_kd_denoised_t2i", 0, 355.0),
            ("vanilla_kd_denoised_t2i", 1, 352.0), ("dcd_uniform_weights_denoised_t2i", 2, 390.0))
    records = [{"teacher": "meter", "student": "dual", "method": m, "seed": s, "params": 1, "test_rsum": v}
               for m, s, v in rows]  # seed 2 of the uniform-weights row has no full recipe: left out
    parts = {p["method"]: p for p in ablations.paired_differences(records, against=ablations.ABLATION_OF)}
    assert set(parts) == {"vanilla_kd", "vanilla_kd_denoised_t2i"}
    assert parts["vanilla_kd"]["against"] == "dcd" and parts["vanilla_kd"]["differences"] == [-10.0]
    assert parts["vanilla_kd_denoised_t2i"]["against"] == "dcd_denoised_t2i"
    assert parts["vanilla_kd_denoised_t2i"]["differences"] == [-5.0, 2.0]
    table = ablations.markdown_table(records)
    assert "| meter | dual | vanilla_kd_denoised_t2i | dcd_denoised_t2i | 2 | -1.5 ± 4.9 | [-46.0, +43.0] | -5.0, +2.0 |" in table
    assert "| meter | dual | vanilla_kd | dcd | 1 | -10.0 | - | -10.0 |" in table
    assert "two-direction baseline" not in table  # no baseline_t2i record: no such table
    control = [{"teacher": "meter", "student": "dual", "method": "baseline_t2i", "seed": 1, "params": 1,
                "test_rsum": 340.0}]
    assert "| meter | dual | dcd_denoised_t2i | 1 | +10.0 | - | +10.0 |" in ablations.markdown_table(records + control)
    # every paper ablation and every ablation of the two-direction recipe has its full recipe
    assert set(ablations.ABLATION_OF) == {"vanilla_kd", "dcd_random_negatives", "dcd_uniform_weights",
                                          "dcd_static_alpha"} | {f"{m}_denoised_t2i" for m in (
                                          "vanilla_kd", "dcd_random_negatives", "dcd_uniform_weights",
                                          "dcd_static_alpha")} | set(ablations.STUDENT_AWARE)


def test_two_direction_rows_distil_text_to_image_and_their_baseline_has_no_teacher(data_json, tmp_path):
    teacher_dir = tmp_path / "teacher"
    meter_preset("roberta32x1-vit32x2").save_pretrained(teacher_dir)
    settings = _settings(data_json, tmp_path, teacher_checkpoint=str(teacher_dir), eval_split="test",
                         directions=("i2t",))  # the embedded recipe's single direction
    out = tmp_path / "ablations"
    methods = ["baseline", "baseline_t2i", "dcd_denoised_t2i", "vanilla_kd_denoised_t2i"]
    ablations.run_ablations(settings, seeds=(0,), methods=methods, kinds=("dual",), out=out,
                            results_json=tmp_path / "c.json")
    stored = {m: json.loads(next((out / "records").glob(f"dual-{m}-seed0-*.json")).read_text()) for m in methods}
    identity = {m: record["identity"] for m, record in stored.items()}
    assert identity["baseline"]["dcd"]["directions"] == ["i2t"]
    assert identity["baseline_t2i"]["dcd"]["directions"] == ["i2t", "t2i"]
    assert identity["baseline_t2i"]["teacher"] is None and identity["baseline_t2i"]["dcd"]["use_teacher"] is False
    distilled = identity["dcd_denoised_t2i"]
    assert distilled["teacher"] is not None and distilled["dcd"]["directions"] == ["i2t", "t2i"]
    assert distilled["dcd"]["drop_false_negatives"] is True
    # both directions were distilled: the trainer logged a text->image teacher statistic
    log = (Path(stored["dcd_denoised_t2i"]["stage"]) / "metrics.jsonl").read_text()
    assert "teacher_top1_t2i" in log and "teacher_top1_t2i" not in \
        (Path(stored["baseline_t2i"]["stage"]) / "metrics.jsonl").read_text()
    # its vanilla-KD ablation keeps both directions and the denoising, and drops DCD's own parts
    vanilla = identity["vanilla_kd_denoised_t2i"]["dcd"]
    assert vanilla["directions"] == ["i2t", "t2i"] and vanilla["drop_false_negatives"] is True
    assert (vanilla["selection"], vanilla["dynamic"], vanilla["alpha_schedule"]) == ("random", False, "constant")


@pytest.mark.parametrize("paper_row", ["vanilla_kd", "dcd_random_negatives", "dcd_uniform_weights", "dcd_static_alpha"])
def test_ablations_of_the_two_direction_recipe_change_only_the_paper_rows_fields(paper_row):
    row = ablations.KNOWN_METHODS[f"{paper_row}_denoised_t2i"]
    recipe = ablations.KNOWN_METHODS["dcd_denoised_t2i"]
    own = {k: v for k, v in ablations.METHODS[paper_row].items() if k not in ablations.PAPER_DCD}
    assert {k: v for k, v in row.items() if recipe.get(k) != v} == own
    assert all(row[k] == v for k, v in recipe.items())


def test_the_embedded_recipe_is_the_row_chosen_on_val_and_the_paper_rows_stay_the_papers():
    """`make distill` runs `dcd_denoised_t2i`; the paper's rows keep image->text only and every candidate in the
    self-learning loss whatever the embedded default is, so their recorded identities stay valid."""
    embedded = DistillSettings()
    chosen = replace(embedded, **{k: v for k, v in ablations.KNOWN_METHODS["dcd_denoised_t2i"].items()})
    assert resolve(chosen).dcd_config() == resolve(embedded).dcd_config()
    assert resolve(embedded).dcd_config().directions == ("i2t", "t2i") and resolve(embedded).dcd_config().drop_false_negatives
    for name, fields in ablations.METHODS.items():
        paper = resolve(replace(embedded, **{k: v for k, v in fields.items() if k != "use_teacher"}))
        config = paper.dcd_config("dcd" if fields.get("use_teacher", True) else "baseline")
        assert config.directions == ("i2t",) and config.drop_false_negatives is False, name
    # on real data the reference (the paper's fine-tuning regime) keeps every candidate
    assert resolve(DistillSettings(data="coco")).dcd_config().drop_false_negatives is False
