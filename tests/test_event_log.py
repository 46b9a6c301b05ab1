"""Every training run writes TensorBoard scalars beside metrics.jsonl: the loss parts, alpha, weights, lr, val."""
from dcd.data import build_synthetic, load_karpathy
from dcd.pipeline import DistillSettings, build_student, train_student
from dcd.recipes import resolve
from teachers import as_teacher
from teachers.meter import meter_preset


def _scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_a_dcd_student_logs_its_loss_parts_alpha_weights_lr_and_val_recall(tmp_path):
    data = build_synthetic(tmp_path / "data", sizes=(16, 4, 4), image_size=32)
    splits = {role: load_karpathy(data, split=name) for role, name in (("train", "train"), ("val", "val"))}
    recipe = resolve(DistillSettings(data=str(data), student="dual-bert32x1-vit32x1", progress=False, epochs=1,
                                     batch_size=16, num_negatives=4, num_hard=2, score_cache=False),
                     splits["train"])
    teacher = as_teacher(meter_preset("roberta32x1-vit32x2"))
    _, summary = train_student("dcd", build_student("dual", recipe, teacher), teacher, recipe, splits, tmp_path / "run")
    scalars = _scalars(summary["stage"])
    for tag in ("train/loss", "train/distill", "train/self", "train/contrastive", "train/alpha", "train/lr",
                "train/r_spread_i2t", "val/rsum", "val/i2t_r1"):
        assert tag in scalars and scalars[tag], tag
    assert len(scalars["val/rsum"]) == 1 and scalars["train/alpha"][0] <= 0.5  # one epoch; alpha 0.5 -> 0.2
