"""Multi-process training through torchrun: 2 CPU processes with the gloo backend."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dcd.data import build_synthetic


@pytest.mark.slow
def test_two_process_gloo_training_keeps_replicas_in_sync(tmp_path):
    data = build_synthetic(tmp_path / "data", sizes=(16, 2, 2), image_size=32)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("dist_worker.py")), str(data), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "dist_result.json").read_text())
    assert result["world"] == 2 and result["steps"] == 3
    assert result["gathered_rows"] == 6  # in-batch negatives come from both ranks
    assert result["per_rank"] == 40  # 80 training pairs, sharded
    assert result["max_param_diff"] == 0.0  # DDP kept the replicas identical
