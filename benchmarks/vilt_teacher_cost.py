"""What an embedded ViLT teacher costs: parameters, and the time of one exhaustive pass over a split.

Why: ViLT is single-stream, so it runs its whole network on every (image, caption) pair and nothing
can be cached per image or per caption. Issue 12 needs a teacher larger than the dual student (14.3 M
parameters) whose exhaustive val and test ranking is measured; this prints what that costs here, for
the embedded preset (``vit128x4``) and a ViLT of MiniLM-L6's size (384 wide, 6 layers), the smallest
standard size above the student. Random weights: the cost does not depend on them.

    python benchmarks/vilt_teacher_cost.py --threads 1
"""
from __future__ import annotations

import argparse
import time

import torch

import teachers

SIZES = {
    "vit128x4 (embedded)": {},
    "minilm-size 384x6": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
CAPTION = "a small red cube to the left of a large blue sphere"


def pairs_per_second(model, side: int, repeats: int) -> float:
    """Pairs scored per second: ``side`` images x ``side`` captions, each pair through the whole network."""
    images = {"pixel_values": torch.randn(side, 3, 64, 64), "pixel_mask": torch.ones(side, 64, 64, dtype=torch.long)}
    with torch.no_grad():
        image_features = model.encode_images(images)
        text_features = model.encode_texts(model.tokenize([CAPTION] * side))
        rows, cols = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
        model.score_index_pairs(image_features, text_features, rows[:side], cols[:side])  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            model.score_index_pairs(image_features, text_features, rows, cols)
    return repeats * side * side / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--side", type=int, default=16, help="images and captions per timed call (side^2 pairs)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--split-pairs", type=float, default=500 * 2500, help="pairs in one exhaustive pass")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'ViLT':<22}{'params':>10}{'pairs/s':>10}{'one split (min)':>17}")
    for name, overrides in SIZES.items():
        model = teachers.create_model("vilt", preset="vit128x4", **overrides).eval()
        params = sum(p.numel() for p in model.parameters())
        rate = pairs_per_second(model, args.side, args.repeats)
        print(f"{name:<22}{params / 1e6:>9.2f}M{rate:>10.0f}{args.split_pairs / rate / 60:>17.0f}")


if __name__ == "__main__":
    main()
