"""Atomic training checkpoints: a run killed at any moment leaves the last complete checkpoint intact.

A checkpoint holds everything needed to continue bit-for-bit: trainable weights, optimiser, LR
schedule, AMP scaler, the RNG states of python / numpy / torch (and CUDA), and the data position
(epoch, batches consumed). It is written to a temporary file in the same folder, flushed to disk and
then renamed over the old one (``os.replace`` is atomic on POSIX), and it is loaded with
``torch.load(weights_only=True)``: numpy's RNG state is stored as plain lists for that reason.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from teachers.files import atomic_write, write_json

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


RECIPE_NAME = "recipe.json"


def claim_run_dir(directory: Path, recipe: Dict[str, Any], main_process: bool = True) -> bool:
    """Make ``directory`` hold only work done with ``recipe`` (a JSON-able dict of what shapes the result).

    Its ``recipe.json`` is compared with ``recipe``: the same -> the folder is kept (a finished result is
    reused, a half-finished one resumes), returns True; different or absent while the folder holds
    something -> it is emptied, so nothing made with other settings is reused or resumed, returns False.
    The recipe is then recorded. Only ``main_process`` touches the disk (other ranks just compare).
    """
    directory = Path(directory)
    recipe = json.loads(json.dumps(recipe))  # as it reads back (tuples -> lists)
    path = directory / RECIPE_NAME
    stored = json.loads(path.read_text()) if path.is_file() else None
    kept = stored == recipe
    if main_process:
        if not kept and directory.is_dir():
            shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(path, recipe, indent=1, sort_keys=False, newline=False)
    return kept
