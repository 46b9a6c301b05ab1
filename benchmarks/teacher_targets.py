"""How sharp a teacher's distillation targets are on the training lists, against the same lists built on test.

A teacher that has memorised its training captions puts more of its softmax on the positive of a training list than
of a test list built the same way; its targets are then near one-hot where the student learns (docs/experiments.md,
"Out-of-fold teacher targets"). For each score cache (the training lists DCD reads: each caption's positive and its
image's pool) and the same teacher's exhaustive test matrix (lists built like the cache's: ``near`` caption
neighbours and random captions per image, same seed), this prints the mean probability of the positive, the mean
entropy and how often the positive is ranked first.

    python benchmarks/teacher_targets.py --pair runs/ablations-meter-8ep-bf16/teacher_scores \\
        ~/.cache/dcd/teachers/meter-synthetic-v2-bf16/scores/synthetic-test-bf16.npy
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict

import numpy as np

from dcd.data import load_split
from dcd.score_cache import candidate_pools


def list_statistics(logits: np.ndarray) -> Dict[str, float]:
    """Mean P(positive), mean entropy (nats) and the share of lists whose positive (column 0) is ranked first."""
    shifted = logits - logits.max(1, keepdims=True)
    p = np.exp(shifted)
    p /= p.sum(1, keepdims=True)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(1)
    return {"p_positive": float(p[:, 0].mean()), "entropy": float(entropy.mean()),
            "positive_first": float((logits.argmax(1) == 0).mean())}


def training_lists(cache_dir: Path) -> np.ndarray:
    """Each training caption's list: its positive logit, then its image's pool, from a score cache folder."""
    header = json.loads((cache_dir / "header.json").read_text())
    split = load_split(header["source"], None, split=header["split"].rsplit("-", 1)[-1])
    image = np.asarray(split.caption_image)
    positive, pool = np.load(cache_dir / "positive.npy"), np.load(cache_dir / "scores.npy")
    return np.concatenate([positive[:, None], pool[image]], axis=1), header


def test_lists(matrix_path: Path, header: Dict) -> np.ndarray:
    """The same lists on the test split, read from the exhaustive matrix: pools built as the cache built its own."""
    split = load_split(header["source"], None, split="test")
    matrix = np.load(matrix_path)
    pool = candidate_pools(split, header["pool_size"], header["seed"], header["near"])
    image = np.asarray(split.caption_image)
    positive = matrix[image, np.arange(len(image))]
    negatives = np.take_along_axis(matrix[image], pool.numpy()[image], axis=1)
    return np.concatenate([positive[:, None], negatives], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("CACHE_DIR", "TEST_MATRIX"),
                        help="a score cache folder and the same teacher's exhaustive test matrix (.npy); repeatable")
    args = parser.parse_args()
    print(f"{'score cache':<28} {'lists':<6} {'P(positive)':>11} {'entropy':>8} {'positive first':>15}")
    for cache, matrix in args.pair:
        cache_dir = Path(cache).expanduser()
        train, header = training_lists(cache_dir)
        for name, logits in (("train", train), ("test", test_lists(Path(matrix).expanduser(), header))):
            s = list_statistics(logits)
            print(f"{cache_dir.name:<28} {name:<6} {s['p_positive']:>11.3f} {s['entropy']:>8.3f} "
                  f"{s['positive_first']:>15.3f}")


if __name__ == "__main__":
    main()
