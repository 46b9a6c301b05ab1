"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): DCD training with DDP on CPU."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import dcd
import students
from dcd.runtime import shutdown_distributed
from dcd.data import TrainPairs, load_karpathy
from dcd.losses import gather_with_grad
from dcd.trainer import TrainConfig, Trainer
from teachers.meter import meter_preset


def main(data_json: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights on every rank
    split = load_karpathy(data_json, split="train")
    distiller = dcd.wrap(meter_preset("roberta32x1-vit32x2"), students.dual_test(pretrained=False), captions=split.captions,
                         caption_image=split.caption_image_tensor(), num_negatives=4, num_hard=2)
    torch.manual_seed(100 + rank)  # candidate draws differ per rank, as they would on real GPUs
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, max_steps=3, progress=False, log_every=1)
    trainer = Trainer(distiller, TrainPairs(split, distiller.transforms()), distiller.collate(), config, Path(out))
    trainer.fit()
    gathered_rows = gather_with_grad(torch.full((3, 2), float(rank))).shape[0]
    flat = torch.cat([p.detach().flatten() for p in distiller.student.parameters()])
    copies = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(copies, flat)
    shard = torch.tensor(trainer.sampler.per_rank)
    if rank == 0:
        Path(out, "dist_result.json").write_text(json.dumps({
            "world": world, "steps": trainer.global_step, "gathered_rows": gathered_rows, "per_rank": int(shard),
            "max_param_diff": float(max((c - copies[0]).abs().max() for c in copies)),
        }))
    # drop DDP's reducer while the interpreter is alive, then the shutdown `dcd distill` uses (gc, barrier, destroy)
    del trainer, distiller
    shutdown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:])
