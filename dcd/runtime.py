"""Process-level setup shared by the ``dcd`` command line and the index commands.

It lives apart from :mod:`dcd.cli` so that :mod:`dcd.index.commands` (which ``dcd.cli`` imports) need not
import the CLI back: joining and leaving the torch.distributed process group under ``torchrun``, and the
rank / world size of this process.
"""
from __future__ import annotations

import os

__all__ = ["init_distributed", "shutdown_distributed", "distributed_info"]


def init_distributed(device: str) -> str:
    """Under torchrun: join the process group; each rank gets its own CUDA device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return f"cuda:{local}"
    return device


def shutdown_distributed() -> None:
    """Under torchrun: free what still holds the group (DDP reducers left in reference cycles), wait for
    every rank, then leave the group together. Gloo aborts the process (``terminate called without an
    active exception``) when its work is torn down during interpreter exit, or while another rank still works."""
    import gc

    import torch.distributed as dist

    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def distributed_info():
    """``(rank, world_size, barrier)`` under torchrun, else ``(0, 1, no-op)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.barrier
    return 0, 1, lambda: None
