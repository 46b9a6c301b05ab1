"""A small, exact-resume training loop for anything whose ``forward(batch)`` returns ``{"loss": ...}``.

It trains the ``Distiller`` (DCD student), the undistilled baseline and the embedded teacher alike:
AdamW with warm-up then linear decay, gradient accumulation, mixed precision (bf16 autocast on CUDA and on
CPUs with bf16 units, fp16 on CUDA), tqdm progress,
a JSON-lines metrics log, evaluation every epoch, and atomic checkpoints (every ``save_every`` steps
and at each epoch end) holding optimiser, schedule, RNG state and data position, so a run killed at
any moment continues with ``resume=True`` on the very batch where it stopped, in the same order.

Multi-GPU / multi-node: launch with ``torchrun``; when ``torch.distributed`` is initialised the
module is wrapped in DistributedDataParallel and each rank reads its own shard of every epoch's
permutation. Rank 0 alone logs, evaluates and writes checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from teachers.precision import autocast, choose

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .event_log import EventLog

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the optimiser steps
    grad_accum: int = 1
    grad_clip: float = 1.0
    max_steps: Optional[int] = None  # stop early (optimiser steps), e.g. for a time budget
    precision: str = "auto"  # auto (bf16 where bf16 is fast: teachers.precision) | fp32 | bf16 | fp16 (CUDA)
    seed: int = 0
    num_workers: int = 0
    save_every: int = 200  # optimiser steps between checkpoints (and one at every epoch end)
    log_every: int = 10
    device: str = "cpu"
    progress: bool = True
    desc: str = "train"
    extra: Dict[str, Any] = field(default_factory=dict)


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation, sharded over ranks, that can start part-way through an epoch.

    With a ``grouping`` (``groups(generator) -> list of index lists``, e.g.
    :class:`~dcd.data.neighbour_batches.NeighbourGrouping`) the epoch is that grouping's order instead,
    and whole groups are dealt to the ranks, so a group's items land in one batch of one rank.
    """

    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, grouping=None):
        if size <= 0:
            raise ValueError("cannot train on an empty data set")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.grouping = grouping
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.grouping is not None:
            groups = self.grouping.groups(g)
            mine = [i for group in groups[self.rank :: self.world_size] for i in group]
            if not mine:
                mine = [i for group in groups for i in group]
            return (mine * math.ceil(self.per_rank / len(mine)))[: self.per_rank]  # every rank gets as many
        perm = torch.randperm(self.size, generator=g).tolist()
        perm += perm[: self.per_rank * self.world_size - self.size]  # pad so every rank gets as many
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start


def world_size() -> int:
    """Ranks of the torchrun job this process is in (1 outside one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def from_main_process(value):
    """``value`` as the main process (rank 0) has it, on every rank of a torchrun job (itself outside one): what
    rank 0 decides alone (behind a lock) the others follow, so no rank trains while another reuses."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _param_groups(params: List[nn.Parameter], names: List[str], weight_decay: float):
    decay = [p for p, n in zip(params, names) if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for p, n in zip(params, names) if not (p.ndim >= 2 and "embeddings" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def seconds_trained(history: List[Dict[str, Any]], default: float = 0.0) -> float:
    """Training wall time of a run from its :meth:`Trainer.fit` history, which always holds one: summed over
    resumes, the checkpoint's for a run that found its last checkpoint at the end. ``default`` for a history
    from elsewhere that logged no times."""
    return round(max((r["elapsed_s"] for r in history if "elapsed_s" in r), default=default), 1)


class Trainer:
    """Train ``module`` on ``dataset``; ``evaluate(module) -> dict`` runs on rank 0 after each epoch."""

    def __init__(
        self,
        module: nn.Module,
        dataset: Dataset,
        collate_fn: Callable,
        config: TrainConfig,
        out_dir: Path,
        evaluate: Optional[Callable[[nn.Module], Dict[str, float]]] = None,
        on_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
        grouping=None,
    ):
        self.module, self.dataset, self.collate_fn = module, dataset, collate_fn
        self.config, self.out_dir = config, Path(out_dir)
        self.events = EventLog(self.out_dir)
        self.evaluate, self.on_step = evaluate, on_step
        self.device = torch.device(config.device)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        # callers that know what they train pass the plan's choice (teachers.precision.PrecisionPlan.training)
        self.precision = choose(config.precision, self.device, "dual")

        self.module.to(self.device)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the module has no trainable parameters")
        self.params = [p for _, p in named]
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.params, [n for n, _ in named], config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-8
        )
        self.sampler = ResumableSampler(len(dataset), config.seed, self.rank, self.world_size, grouping)
        self.batches_per_epoch = self.sampler.per_rank // config.batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"batch_size {config.batch_size} is larger than the data set shard ({self.sampler.per_rank} items)")
        steps_per_epoch = self.batches_per_epoch // config.grad_accum
        self.total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        warmup_steps = int(config.warmup * self.total_steps)

        def lr_lambda(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / (warmup_steps + 1)
            return max(0.0, (self.total_steps - step) / max(1, self.total_steps - warmup_steps))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.model = module
        if dist.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(
                module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
            )
        self.epoch, self.batch_in_epoch, self.global_step = 0, 0, 0
        self.history: List[Dict[str, Any]] = []
        # training wall time across resumes: what earlier runs spent (from the checkpoint) plus this run's
        self._elapsed_before, self._started = 0.0, None

    @property
    def elapsed_s(self) -> float:
        """Seconds spent training so far, summed over every run that resumed this one."""
        running = time.time() - self._started if self._started is not None else 0.0
        return self._elapsed_before + running

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def state(self) -> Dict[str, Any]:
        return {
            "model": {k: v for k, v in self.module.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "elapsed_s": self.elapsed_s,
            "config": json.dumps(asdict(self.config), default=str),
        }

    def save(self) -> None:
        if is_main_process():
            save_checkpoint(self.checkpoint_path, self.state())

    def resume(self) -> bool:
        """Continue from ``out_dir/checkpoint.pt`` if it exists; returns whether it did."""
        if not self.checkpoint_path.exists():
            return False
        state = load_checkpoint(self.checkpoint_path)
        missing, unexpected = self.module.load_state_dict(state["model"], strict=False)
        trainable = {n for n, p in self.module.named_parameters() if p.requires_grad}
        if unexpected or trainable & set(missing):
            raise RuntimeError(
                f"checkpoint {self.checkpoint_path} does not match the model: "
                f"missing {sorted(trainable & set(missing))[:10]}, unexpected {sorted(unexpected)[:10]}"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
        self.global_step = state["global_step"]
        self._elapsed_before = float(state.get("elapsed_s", 0.0))  # checkpoints from before it was saved: 0
        log.info("resumed from %s at epoch %d, batch %d, step %d", self.checkpoint_path, self.epoch, self.batch_in_epoch, self.global_step)
        return True

    # ------------------------------------------------------------------ loop
    def _log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if is_main_process():
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            self.events.write(record)  # the same record as TensorBoard scalars

    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.config.batch_size)
        return DataLoader(
            self.dataset, batch_size=self.config.batch_size, sampler=self.sampler, collate_fn=self.collate_fn,
            num_workers=self.config.num_workers, drop_last=True,
            # its own generator: creating a loader part-way through an epoch must not consume global RNG
            generator=torch.Generator().manual_seed(self.config.seed + self.epoch),
        )

    def _to_device(self, value):
        if isinstance(value, torch.Tensor):
            return value.to(self.device, non_blocking=True)
        if isinstance(value, dict):
            return {k: self._to_device(v) for k, v in value.items()}
        return value

    def fit(self, resume: bool = False) -> List[Dict[str, Any]]:
        cfg = self.config
        if resume:
            self.resume()
        self.module.train()
        self._started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.global_step, desc=cfg.desc, disable=not (cfg.progress and is_main_process()),
                   dynamic_ncols=True)
        running: Dict[str, float] = {}
        window = 0
        while self.epoch < cfg.epochs and self.global_step < self.total_steps:
            micro = 0
            for batch in self._loader():
                if self.batch_in_epoch >= self.batches_per_epoch or self.global_step >= self.total_steps:
                    break
                batch = self._to_device(batch)
                last_micro = (micro + 1) % cfg.grad_accum == 0
                sync = contextlib.nullcontext() if last_micro or not isinstance(self.model, nn.parallel.DistributedDataParallel) \
                    else self.model.no_sync()
                with sync:
                    with autocast(self.device, self.precision):
                        out = self.model(batch)
                    loss = out["loss"] / cfg.grad_accum
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss at step {self.global_step}: {out}")
                    self.scaler.scale(loss).backward()
                micro += 1
                self.batch_in_epoch += 1
                for key, value in out.items():
                    if isinstance(value, torch.Tensor) and value.numel() == 1:
                        running[key] = running.get(key, 0.0) + float(value.detach()) / cfg.grad_accum
                if not last_micro:
                    continue
                if cfg.grad_clip:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
                self.global_step += 1
                window += 1
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self.global_step, running)
                if self.global_step % cfg.log_every == 0 or self.global_step == self.total_steps:
                    record = {k: v / window for k, v in running.items()}
                    record = {"step": self.global_step, "epoch": self.epoch, "lr": self.scheduler.get_last_lr()[0], **record,
                              "elapsed_s": round(self.elapsed_s, 2)}
                    bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
                    self._log(record)
                    running, window = {}, 0
                if cfg.save_every and self.global_step % cfg.save_every == 0:
                    self.save()
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch += 1
                self.batch_in_epoch = 0
                if self.evaluate is not None and is_main_process():
                    self.module.eval()
                    metrics = self.evaluate(self.module)
                    self.module.train()
                    self._log({"step": self.global_step, "epoch": self.epoch, "eval": metrics})
                    log.info("epoch %d: %s", self.epoch, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
                self.save()
            elif self.global_step >= self.total_steps:
                self.save()
        bar.close()
        self.events.close()
        self._elapsed_before, self._started = self.elapsed_s, None
        if not any("elapsed_s" in r for r in self.history):  # resumed at its end: what the checkpoint says
            self.history.append({"step": self.global_step, "elapsed_s": round(self._elapsed_before, 2)})
        if dist.is_initialized():
            dist.barrier()
        return self.history
