"""The Makefile's targets pass what they are given: checked with ``make -n`` (prints, runs nothing)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # the defaults under test, stated: a TEACHER or ABLATION_EPOCHS set in the environment must not leak in
    fixed = ["TEACHER=meter", "ABLATION_EPOCHS=8", "SEEDS=0,1,2"]
    done = subprocess.run(["make", "-n", *args, *fixed], cwd=ROOT, capture_output=True, text=True, check=True)
    return " ".join(done.stdout.replace("\\\n", " ").split())


def test_ablations_defaults():
    command = _dry_run("ablations")
    assert "--out runs/ablations-meter-8ep --results benchmarks/results/compression.json" in command
    assert "--teacher-config" not in command


def test_ablations_with_a_teacher_config_gets_its_own_folder_and_results():
    command = _dry_run("ablations", "TEACHER_CONFIG=max_steps=3200 epochs=16", "RESULTS=benchmarks/results/x.json")
    assert "--teacher-config max_steps=3200 --teacher-config epochs=16" in command
    assert "--out runs/ablations-meter-8ep-max_steps3200-epochs16 --results benchmarks/results/x.json" in command
    # without RESULTS, its own results file: the committed compression.json is never overwritten by it
    command = _dry_run("ablations", "TEACHER_CONFIG=max_steps=3200 epochs=16")
    assert "--results benchmarks/results/compression-max_steps3200-epochs16.json" in command
