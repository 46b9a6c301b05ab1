"""Neighbour batches: caption-word neighbours, every caption once per epoch, grouped and resumable."""
from pathlib import Path

import torch

from dcd.data import CaptionSplit
from dcd.data.neighbour_batches import NeighbourGrouping, caption_neighbours
from dcd.trainer import ResumableSampler

#: three pairs of images whose captions share rare words (zebra / kayak / violin), two captions each
CAPTIONS = {
    0: ["a zebra on grass", "the striped zebra"], 1: ["zebra standing near a fence", "a zebra foal"],
    2: ["a red kayak on a lake", "kayak on water"], 3: ["two people in a kayak", "a kayak race"],
    4: ["a violin on a table", "an old violin"], 5: ["a girl playing violin", "violin lesson"],
}


def _split() -> CaptionSplit:
    captions = [c for i in sorted(CAPTIONS) for c in CAPTIONS[i]]
    caption_image = [i for i in sorted(CAPTIONS) for _ in CAPTIONS[i]]
    return CaptionSplit([Path(f"{i}.jpg") for i in CAPTIONS], list(CAPTIONS), captions, caption_image,
                        list(range(len(captions))), "pairs")


def test_nearest_neighbour_shares_the_rare_word():
    neighbours = caption_neighbours(_split(), k=1, chunk=4)  # chunked like a large split
    assert neighbours.squeeze(1).tolist() == [1, 0, 3, 2, 5, 4]


def test_groups_are_neighbours_and_cover_every_caption_once():
    split = _split()
    grouping = NeighbourGrouping(split, group_size=2)
    groups = grouping.groups(torch.Generator().manual_seed(0))
    flat = [c for g in groups for c in g]
    assert sorted(flat) == list(range(split.num_captions))
    for group in groups:
        assert len({split.caption_image[c] // 2 for c in group}) == 1  # the two images of one pair
        assert len({split.caption_image[c] for c in group}) == len(group)  # distinct images
    again = grouping.groups(torch.Generator().manual_seed(0))
    assert again == groups


def test_grouped_sampler_resumes_and_deals_whole_groups_to_ranks():
    split = _split()
    grouping = NeighbourGrouping(split, group_size=2)
    full = ResumableSampler(split.num_captions, seed=1, grouping=grouping)
    full.set_epoch(3)
    order = full.order()
    assert sorted(order) == list(range(split.num_captions))
    full.set_epoch(3, start=5)
    assert list(full) == order[5:]
    shards = [ResumableSampler(split.num_captions, seed=1, rank=r, world_size=2, grouping=grouping) for r in range(2)]
    orders = []
    for shard in shards:
        shard.set_epoch(3)
        orders.append(shard.order())
    assert len(orders[0]) == len(orders[1]) == shards[0].per_rank
    assert sorted(orders[0] + orders[1]) == list(range(split.num_captions))
    for a, b in zip(orders[0][::2], orders[0][1::2]):  # rank 0 got whole groups: consecutive pairs match
        assert split.caption_image[a] // 2 == split.caption_image[b] // 2
