"""Atomic training checkpoints: a run killed at any moment leaves the last complete checkpoint intact.

A checkpoint holds everything needed to continue bit-for-bit: trainable weights, optimiser, LR
schedule, AMP scaler, the RNG states of python / numpy / torch (and CUDA), and the data position
(epoch, batches consumed). It is written to a temporary file in the same folder, flushed to disk and
then renamed over the old one (``os.replace`` is atomic on POSIX), and it is loaded with
``torch.load(weights_only=True)``: numpy's RNG state is stored as plain lists for that reason.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from teachers.files import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    if isinstance(value, list):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise RuntimeError(f"checkpoint {path} could not be read ({type(err).__name__}: {err})") from err
