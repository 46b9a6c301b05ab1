"""The training loop: exact resume after a kill, atomic checkpoints, metrics log."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dcd.checkpoint import load_checkpoint, save_checkpoint
from dcd.trainer import ResumableSampler, TrainConfig, Trainer


class NoisyRegressor(nn.Module):
    """Uses dropout and fresh random noise in forward, so resume must restore the RNG to match."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, batch):
        x, y = batch["x"], batch["y"]
        noise = 0.01 * torch.randn_like(x)
        loss = ((self.net(x + noise).squeeze(-1) - y) ** 2).mean()
        return {"loss": loss}


def _collate(items):
    xs, ys = zip(*items)
    return {"x": torch.stack(xs), "y": torch.stack(ys)}


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=g)
    return TensorDataset(x, x.sum(-1))


def _trainer(out, **overrides):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=3, batch_size=8, lr=1e-2, save_every=2, log_every=1, progress=False, **overrides)
    return Trainer(NoisyRegressor(), _data(), _collate, cfg, out)


class Killed(Exception):
    pass


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    reference = _trainer(tmp_path / "ref")
    reference.fit()
    ref_weights = {k: v.clone() for k, v in reference.module.state_dict().items()}
    assert reference.global_step == 36

    def kill(step, _):
        if step == 17:  # mid-epoch (12 steps per epoch), one step after the last checkpoint (16)
            raise Killed

    first = _trainer(tmp_path / "run")
    first.on_step = kill
    with pytest.raises(Killed):
        first.fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (saved["global_step"], saved["epoch"], saved["batch_in_epoch"]) == (16, 1, 4)

    # a fresh process: different initial weights and RNG, everything must come from the checkpoint
    torch.manual_seed(123)
    second = Trainer(NoisyRegressor(), _data(), _collate, first.config, tmp_path / "run")
    second.on_step = None
    second.fit(resume=True)
    assert second.global_step == 36
    for key, value in second.module.state_dict().items():
        assert torch.equal(value, ref_weights[key]), key


def test_training_time_is_summed_over_resumes(tmp_path, monkeypatch):
    """A resumed run reports the time of every run that trained it, not only its own (the checkpoint carries it)."""
    import dcd.trainer as trainer_module
    from dcd.trainer import seconds_trained

    clock = {"now": 1000.0}

    def tick():  # every call to the clock advances it one second: elapsed times are exact counts
        clock["now"] += 1.0
        return clock["now"]

    monkeypatch.setattr(trainer_module.time, "time", tick)

    def kill(step, _):
        if step == 17:
            raise Killed

    first = _trainer(tmp_path / "run")
    first.on_step = kill
    with pytest.raises(Killed):
        first.fit()
    spent_first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["elapsed_s"]
    assert spent_first > 0
    second = _trainer(tmp_path / "run")
    history = second.fit(resume=True)
    steps = [r["elapsed_s"] for r in history if "elapsed_s" in r]
    assert steps[0] > spent_first and steps == sorted(steps)  # continues from the first run's time
    assert seconds_trained(history, default=0.0) == round(steps[-1], 1)
    assert seconds_trained([], default=12.34) == 12.3
    # resumed once more with nothing left to train (killed while saving the result): the checkpoint's time
    spent = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["elapsed_s"]
    third = _trainer(tmp_path / "run")
    assert spent > 0 and spent <= seconds_trained(third.fit(resume=True), default=0.0) <= spent + 3  # + a tick or two


def test_sampler_order_is_seeded_sharded_and_resumable():
    full = ResumableSampler(10, seed=3)
    full.set_epoch(2)
    order = full.order()
    assert sorted(order) == list(range(10))
    full.set_epoch(2, start=4)
    assert list(full) == order[4:]
    shards = [ResumableSampler(10, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(2)
    assert sorted(shards[0].order() + shards[1].order()) == sorted(order)


def test_metrics_log_and_gradient_accumulation(tmp_path):
    trainer = _trainer(tmp_path, grad_accum=2)
    trainer.fit()
    assert trainer.global_step == 18
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 18 and losses[-1] < losses[0]


def test_atomic_checkpoint_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": torch.tensor(1)})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(Exception):
        save_checkpoint(path, {"step": torch.tensor(2), "bad": Boom()})
    assert load_checkpoint(path)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_corrupt_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="checkpoint.pt"):
        load_checkpoint(path)
