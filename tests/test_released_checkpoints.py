"""The official METER / ViLT checkpoints load as released: Lightning 1.x pickles, read where no Lightning exists.

Each file is written in a process of its own that has stand-ins for the ``pytorch_lightning`` classes the
released files name (so they are pickled by reference, as Lightning 1.3 wrote them), and read in a fresh process
where no such module exists: only the allow-listed unpickler (:mod:`teachers.safe_pickle`) stands between.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRITER = r'''
import argparse, os, sys, types
import numpy as np
import torch
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))

# stand-ins for what pytorch-lightning 1.3 pickles into a checkpoint, under its module names
for name in ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint",
             "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing"):
    sys.modules[name] = types.ModuleType(name)
class ModelCheckpoint:
    pass
class AttributeDict(dict):
    def __getattr__(self, key):
        return self[key]
ModelCheckpoint.__module__ = "pytorch_lightning.callbacks.model_checkpoint"
AttributeDict.__module__ = "pytorch_lightning.utilities.parsing"
sys.modules["pytorch_lightning.callbacks.model_checkpoint"].ModelCheckpoint = ModelCheckpoint
sys.modules["pytorch_lightning.utilities.parsing"].AttributeDict = AttributeDict

family, out = sys.argv[1], sys.argv[2]
if family == "meter":
    from test_meter import _model
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = {"image_size": model.config.image_size, "max_text_len": 40, "tokenizer": "minilm", "num_heads": 2,
              "vit": "ViT-B/16", "loss_names": {"itm": 0.5, "irtr": 1}, "learning_rate": np.float64(1e-4)}
else:
    from teachers.vilt import vilt_preset
    from test_vilt import _spread, _to_original
    model = _spread(vilt_preset("vit32x2")).eval()
    state = _to_original(model.hf.state_dict())
    config = {"num_heads": 2, "max_text_len": 40, "learning_rate": np.float32(1e-4), "exp_name": "irtr_coco"}
torch.save({k: v for k, v in model.state_dict().items()}, out + ".expected.pt")
torch.save({
    "epoch": 9, "global_step": 5660, "pytorch-lightning_version": "1.3.8",
    "state_dict": state,
    "callbacks": {ModelCheckpoint: {"monitor": "val/the_metric", "best_model_score": torch.tensor(3.4),
                                    "best_model_path": "/checkpoints/epoch=9.ckpt", "current_score": np.float64(3.4)}},
    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.98), "params": [0, 1]}]}],
    "lr_schedulers": [{"last_epoch": 9, "_step_count": 10}],
    "hparams_name": "config",
    "hyper_parameters": AttributeDict(config=config, args=argparse.Namespace(seed=0, data_root="/data")),
}, out)
'''

READER = r'''
import json, sys
import torch
import teachers
family, path = sys.argv[1], sys.argv[2]
assert "pytorch_lightning" not in sys.modules
model = teachers.create_model(family, checkpoint=path)
expected = torch.load(path + ".expected.pt", weights_only=True)
ours = model.state_dict()
same = [k for k in expected if k in ours and torch.equal(ours[k], expected[k])]
from teachers.meter_checkpoint import read_checkpoint
_, hparams = read_checkpoint(path, family=family)
print(json.dumps({"same": len(same), "total": len(expected), "lightning_imported": "pytorch_lightning" in sys.modules,
                  "hparams": hparams}, default=str))
'''

PAYLOAD = r'''
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (os.system, ("touch " + sys.argv[2],))
torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"config": Payload()}}, sys.argv[1])
'''


def _python(code: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("family", ["meter", "vilt"])
def test_a_lightning_13_checkpoint_loads_in_a_process_without_lightning(family, tmp_path):
    path = tmp_path / f"{family}_irtr_coco.ckpt"
    _python(WRITER, family, str(path), str(ROOT))
    report = json.loads(_python(READER, family, str(path)).strip().splitlines()[-1])
    assert report["same"] == report["total"] > 10  # every weight of the model, bit for bit
    assert report["lightning_imported"] is False
    config = report["hparams"]["config"]  # an AttributeDict, read back as a plain dict of plain values
    assert config["max_text_len"] == 40 and report["hparams"]["args"]["data_root"] == "/data"


def test_a_checkpoint_that_calls_anything_is_refused_and_nothing_runs(tmp_path):
    from teachers.meter_checkpoint import CheckpointError, read_checkpoint

    path, marker = tmp_path / "payload.ckpt", tmp_path / "pwned"
    _python(PAYLOAD, str(path), str(marker))
    with pytest.raises(CheckpointError, match=r"refused: it calls posix\.system.*nothing in it was run"):
        read_checkpoint(path)
    assert not marker.exists()


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    from dcd import cli

    path, marker = tmp_path / "payload.ckpt", tmp_path / "pwned"
    _python(PAYLOAD, str(path), str(marker))
    with pytest.raises(SystemExit) as stop:
        cli.main(["eval", f"teacher:meter:{path}", "--data", "synthetic"])
    assert str(stop.value).startswith("dcd: error: METER checkpoint") and "\n" not in str(stop.value)
    assert not marker.exists()


def test_a_pickle_that_sets_state_on_a_class_is_refused():
    import io
    import pickle

    from teachers.safe_pickle import InertUnpickler, UnsafePickle

    # GLOBAL pytorch_lightning...AttributeDict, then BUILD {"update": 1} on the class itself
    crafted = (b"\x80\x02cpytorch_lightning.utilities.parsing\nAttributeDict\n}X\x06\x00\x00\x00updateK\x01sb.")
    with pytest.raises(UnsafePickle, match="sets the state of the class"):
        InertUnpickler(io.BytesIO(crafted)).load()
    plain = pickle.dumps({"a": [1, 2.5, "x"]}, protocol=2)
    assert InertUnpickler(io.BytesIO(plain)).load() == {"a": [1, 2.5, "x"]}


def test_paths_and_dates_in_hyper_parameters_read_back_inert():
    import datetime
    import io
    import pathlib
    import pickle

    from teachers.safe_pickle import InertUnpickler, plain

    data = pickle.dumps({"data_root": pathlib.PurePosixPath("/data/coco"), "at": datetime.date(2021, 6, 1)},
                        protocol=2)
    read = plain(InertUnpickler(io.BytesIO(data)).load())
    assert read["data_root"] == {"args": ["/", "data", "coco"]} and "args" in read["at"]
