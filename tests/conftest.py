"""Shared test set-up: small thread count (CI has 2 cores), deterministic seeds, offline hub, fp32.

``--precision auto`` is bf16 on machines with bf16 units and fp32 elsewhere; tests pin the CPU to fp32
(``DCD_CPU_BF16=0``) so that their exact comparisons mean the same on every machine, and the precision
tests (tests/test_precision.py) ask for bf16 by name.
"""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["DCD_CPU_BF16"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def unit_teacher_recipe(monkeypatch, tmp_path):
    """``use(max_steps)``: the embedded METER recipe at unit-test size, trained under a private ``$DCD_HOME``."""
    from dcd import teacher_training
    from dcd.recipes import SCRATCH_OVERRIDES

    monkeypatch.setenv("DCD_HOME", str(tmp_path / "home"))

    def use(max_steps: int) -> None:
        monkeypatch.setitem(teacher_training.EMBEDDED_TEACHERS, "meter",
                            {"preset": "roberta32x1-vit32x2", "overrides": SCRATCH_OVERRIDES, "epochs": 1,
                             "max_steps": max_steps, "lr": 1e-3})

    return use


@pytest.fixture(scope="module")
def tiny_data_json(tmp_path_factory):
    """A 16 / 4 / 4-image embedded-style set at 32 px: enough for a student to train a few steps."""
    from dcd.data import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("data"), sizes=(16, 4, 4), image_size=32)


@pytest.fixture(scope="module")
def tiny_splits(tiny_data_json):
    from dcd.data import load_karpathy

    return {role: load_karpathy(tiny_data_json, split=name) for role, name in (("train", "train"), ("val", "val"),
                                                                               ("eval", "test"))}

