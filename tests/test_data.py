"""Data loading: Karpathy and COCO formats, split selection, clear errors, safe image decoding, datasets."""
import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from dcd.data import (
    CaptionSplit, DataError, EvalImages, TrainPairs, collate_train, load_coco_captions, load_image, load_karpathy,
    load_split,
)


def _jpeg(path, colour=(200, 30, 30), size=(24, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path, "JPEG", quality=95)
    return path


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _sentences(imgid, n, first_sentid):
    return [{"raw": f"  caption {k} of image {imgid}. ", "tokens": ["caption"], "imgid": imgid,
             "sentid": first_sentid + k} for k in range(n)]


@pytest.fixture
def karpathy(tmp_path):
    """COCO-style Karpathy JSON: 2 test images (6 and 4 captions), train, restval, val one each."""
    root = tmp_path / "coco"
    layout = [("val2014", "a.jpg", "test", 6), ("val2014", "b.jpg", "test", 4), ("train2014", "c.jpg", "train", 5),
              ("val2014", "d.jpg", "restval", 5), ("val2014", "e.jpg", "val", 5)]
    images, sentid = [], 100
    for imgid, (folder, name, split, n) in enumerate(layout):
        _jpeg(root / folder / name, colour=(40 * imgid, 90, 200))
        images.append({"filepath": folder, "filename": name, "split": split, "imgid": imgid, "cocoid": 9000 + imgid,
                       "sentids": list(range(sentid, sentid + n)), "sentences": _sentences(imgid, n, sentid)})
        sentid += n
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}, indent=1))
    return path


@pytest.fixture
def coco_file(tmp_path):
    """A real COCO caption annotation file (images, annotations, info, licenses)."""
    folder = tmp_path / "val2017"
    images = []
    for image_id, n in ((42, 6), (7, 4), (13, 5)):
        name = f"{image_id:012d}.jpg"
        _jpeg(folder / name, colour=(image_id * 5, 10, 10))
        images.append({"id": image_id, "file_name": name, "width": 24, "height": 16, "license": 1,
                       "coco_url": "", "date_captured": "2013-11-14 16:28:13", "flickr_url": ""})
    annotations, ann_id = [], 500
    for image_id, n in ((42, 6), (13, 5), (7, 4)):
        for k in range(n):
            annotations.append({"id": ann_id, "image_id": image_id, "caption": f"A photo {k} of {image_id}.\n"})
            ann_id += 1
    data = {"info": {"description": "test", "version": "1.0", "year": 2017}, "licenses": [{"id": 1, "name": "x"}],
            "images": images, "annotations": annotations}
    path = tmp_path / "annotations" / "captions_val2017.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path, folder


# ----------------------------------------------------------------------------- Karpathy
def test_karpathy_test_split_counts_ids_and_paths(karpathy):
    split = load_karpathy(karpathy, split="test", check_files=True)
    assert isinstance(split, CaptionSplit)
    assert (split.num_images, split.num_captions, len(split)) == (2, 10, 10)
    assert split.image_to_captions() == [list(range(6)), list(range(6, 10))]
    assert split.captions_per_image() == {4: 1, 6: 1}
    assert split.caption_image_tensor().tolist() == [0] * 6 + [1] * 4
    assert split.image_paths == [karpathy.parent / "val2014" / "a.jpg", karpathy.parent / "val2014" / "b.jpg"]
    assert split.image_ids == [9000, 9001]  # cocoid
    assert split.caption_ids[:2] == [100, 101]  # sentid
    assert split.captions[0] == "caption 0 of image 0."  # stripped
    assert split.name == "coco-test" and split.source == karpathy
    sub = split.select_images([1])
    assert sub.num_images == 1 and sub.captions == split.captions[6:] and sub.caption_image == [0] * 4


def test_karpathy_split_selection(karpathy):
    train = load_karpathy(karpathy, split="train")  # train + restval
    assert [p.name for p in train.image_paths] == ["c.jpg", "d.jpg"] and train.num_captions == 10
    assert load_karpathy(karpathy, split=["train"]).num_images == 1  # a list is literal
    assert load_karpathy(karpathy, split="restval").num_images == 1
    assert load_karpathy(karpathy, split="val").num_images == 1
    assert load_karpathy(karpathy, split="all").num_images == 5
    assert load_karpathy(karpathy, split=["val", "test"]).num_images == 3


def test_flickr_style_entries_and_dispatcher(tmp_path, karpathy, coco_file):
    root = tmp_path / "f30k"
    _jpeg(root / "flickr30k-images" / "1000092795.jpg")
    entry = {"filename": "1000092795.jpg", "split": "test", "imgid": 3, "sentids": [0],
             "sentences": [{"raw": "Two young guys . ", "imgid": 3, "sentid": 0}]}
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": [entry], "dataset": "flickr30k"}))
    split = load_split("flickr30k", root=root, split="test", check_files=True)
    assert split.image_paths == [root / "flickr30k-images" / "1000092795.jpg"]
    assert split.image_ids == [3] and split.captions == ["Two young guys ."]
    assert load_split("coco", root=karpathy.parent, split="test").num_captions == 10
    # a .json path: Karpathy or COCO detected from its keys
    assert load_split(karpathy, split="val").num_images == 1
    path, folder = coco_file
    assert load_split(path, image_root=folder).num_captions == 15
    with pytest.raises(DataError, match="dataset_coco.json"):
        load_split("coco", root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown data set"):
        load_split("imagenet")


# ----------------------------------------------------------------------------- COCO annotations
def test_coco_annotation_file(coco_file, capsys):
    path, folder = coco_file
    split = load_coco_captions(path, folder, check_files=True)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert split.image_ids == [7, 13, 42]  # ordered by COCO image id
    assert split.image_paths[0] == folder / "000000000007.jpg"
    assert split.captions_per_image() == {4: 1, 5: 1, 6: 1}
    assert split.image_to_captions()[2] == list(range(9, 15))  # image 42: its 6 captions
    assert split.caption_ids[:4] == [511, 512, 513, 514]  # annotation ids
    assert split.captions[0] == "A photo 0 of 7."
    assert split.name == "captions_val2017"


def test_coco_bad_fields(coco_file):
    path, folder = coco_file
    data = json.loads(path.read_text())
    del data["annotations"][3]["caption"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[3\].*'caption'") as err:
        load_coco_captions(path, folder)
    assert str(path) in str(err.value)
    data["annotations"][3]["caption"] = "ok"
    data["annotations"][4]["image_id"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="999"):
        load_coco_captions(path, folder)


# ----------------------------------------------------------------------------- errors
def test_missing_and_malformed_json(tmp_path, karpathy):
    with pytest.raises(DataError, match="not found") as err:
        load_karpathy(tmp_path / "nope.json")
    assert "nope.json" in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": "test" oops}\n]}')
    with pytest.raises(DataError, match=r"malformed JSON in .*bad\.json, line 3"):
        load_karpathy(bad)
    with pytest.raises(DataError, match="bad.json"):
        load_split(bad)


def test_missing_fields_name_field_and_image(karpathy):
    data = json.loads(karpathy.read_text())
    del data["images"][1]["sentences"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\].*b\.jpg.*'sentences'") as err:
        load_karpathy(karpathy, split="test")
    assert str(karpathy) in str(err.value)
    data["images"][1]["sentences"] = [{"sentid": 1}]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\].*sentences\[0\].*'raw'"):
        load_karpathy(karpathy, split="test")
    del data["images"][4]["split"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[4\] has no field 'split'"):
        load_karpathy(karpathy, split="train")
    karpathy.write_text(json.dumps({"dataset": "coco"}))
    with pytest.raises(DataError, match="'images'"):
        load_karpathy(karpathy)


def test_unknown_and_empty_split(karpathy):
    with pytest.raises(DataError, match="unknown split 'testing'") as err:
        load_karpathy(karpathy, split="testing")
    message = str(err.value)
    assert "train, val, test, restval" in message and "test: 2 images" in message and str(karpathy) in message
    data = json.loads(karpathy.read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "restval"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match="split 'restval' is empty") as err:
        load_karpathy(karpathy, split="restval")
    assert "val: 1 images" in str(err.value)
    # no val split: one is held out of train, unless train is too small to give one
    data["images"] = [im for im in data["images"] if im["split"] != "val"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match="1 training image.* too few to hold out a val split"):
        load_karpathy(karpathy, split="val")


def test_missing_image_file_named(karpathy):
    (karpathy.parent / "val2014" / "b.jpg").unlink()
    split = load_karpathy(karpathy, split="test")  # lazily: fine until checked or read
    with pytest.raises(DataError, match=r"1 of 2 image files are missing: .*val2014/b\.jpg"):
        load_karpathy(karpathy, split="test", check_files=True)
    assert split.missing_files() == [karpathy.parent / "val2014" / "b.jpg"]
    with pytest.raises(DataError, match="not found.*b.jpg"):
        load_image(split.image_paths[1])


# ----------------------------------------------------------------------------- images
def test_load_image_rgb_and_truncated_jpeg(tmp_path, monkeypatch):
    grey = _jpeg(tmp_path / "grey.jpg", colour=(128,), mode="L")
    image = load_image(grey)
    assert image.mode == "RGB" and image.size == (24, 16)
    # a truly truncated file (half of its bytes, noise so the scan data is long)
    noisy = tmp_path / "noisy.jpg"
    Image.effect_noise((64, 64), 80).convert("RGB").save(noisy, "JPEG", quality=95)
    _truncate(noisy)
    with pytest.raises(DataError, match=r"noisy\.jpg.*truncated"):
        load_image(noisy)
    # even if some library switched PIL's global flag on, a truncated file is still an error
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DataError, match="noisy.jpg"):
        load_image(noisy)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # and the flag is restored
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="junk.jpg"):
        load_image(junk)


# ----------------------------------------------------------------------------- datasets and collation
class FakeModel:
    """What collate_train needs from a Scorer: collate_images and tokenize."""

    def __init__(self, size, vocab_offset):
        self.size, self.vocab_offset = size, vocab_offset

    def image_transform(self, train=False):
        return lambda image: torch.full((3, self.size, self.size), image.getpixel((0, 0))[0] / 255.0)

    def collate_images(self, images):
        return {"pixel_values": torch.stack(images), "pixel_mask": torch.ones(len(images), self.size, self.size)}

    def tokenize(self, texts):
        ids = [[self.vocab_offset + len(w) for w in t.split()] for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}


def test_train_pairs_transform_per_model_and_collate(karpathy):
    split = load_karpathy(karpathy, split="test")
    teacher, student = FakeModel(8, 100), FakeModel(4, 0)
    data = TrainPairs(split, {"teacher": teacher.image_transform(True), "student": student.image_transform(True)})
    assert len(data) == 10
    item = data[7]
    assert item["caption"] == split.captions[7] and item["image_index"] == 1 and item["caption_index"] == 7
    assert item["images"]["teacher"].shape == (3, 8, 8) and item["images"]["student"].shape == (3, 4, 4)
    batch = next(iter(DataLoader(data, batch_size=4, collate_fn=collate_train({"teacher": teacher,
                                                                                "student": student}))))
    assert batch["images"]["teacher"]["pixel_values"].shape == (4, 3, 8, 8)
    assert batch["images"]["student"]["pixel_values"].shape == (4, 3, 4, 4)
    assert batch["texts"]["teacher"]["input_ids"].min() >= 100 and batch["texts"]["student"]["input_ids"].max() < 100
    assert batch["captions"] == split.captions[:4]
    assert batch["image_index"].dtype == torch.long and batch["image_index"].tolist() == [0, 0, 0, 0]
    assert batch["caption_index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="'other'"):
        collate_train({"other": student})([item])


def test_train_pairs_skip_corrupt_image_once(karpathy, caplog):
    split = load_karpathy(karpathy, split="all")
    bad = split.image_paths[1]  # b.jpg, captions 6..9
    _truncate(bad)
    data = TrainPairs(split, FakeModel(4, 0).image_transform(True))
    with caplog.at_level(logging.WARNING, logger="dcd.data"):
        items = [data[i] for i in range(len(data))] + [data[i] for i in range(len(data))]
    warnings = [r for r in caplog.records if "b.jpg" in r.getMessage()]
    assert len(warnings) == 1  # reported once, naming the file
    assert data.bad_images == {1} and data.skipped == 8  # 4 captions, read twice
    # deterministic replacement: the next caption whose image decodes (c.jpg's first caption, index 10)
    assert all(items[i]["caption_index"] == 10 and items[i]["image_index"] == 2 for i in range(6, 10))
    assert [it["caption_index"] for it in items[:10]] == [it["caption_index"] for it in items[len(data):len(data) + 10]]
    assert set(items[0]["images"]) == {"image"}


def test_train_pairs_decode_each_image_once_within_the_memory_budget(karpathy, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(Path(karpathy).parent, root)
    split = load_karpathy(root / Path(karpathy).name, split="test")
    data = TrainPairs(split, FakeModel(4, 0).image_transform(False))
    first = data[0]["images"]["image"]
    for path in split.image_paths:  # every later epoch reads memory, not the files
        Path(path).unlink()
    assert torch.equal(data[0]["images"]["image"], first) and data[1]["image_index"] == 0
    # a budget too small for one image keeps nothing: the file is read every time
    small = TrainPairs(load_karpathy(karpathy, split="test"), FakeModel(4, 0).image_transform(False), memory_bytes=10)
    small[0]
    assert small._decoded == {}


def test_eval_images_raise_on_corrupt_image(karpathy):
    split = load_karpathy(karpathy, split="test")
    _truncate(split.image_paths[0])
    data = EvalImages(split, FakeModel(4, 0).image_transform(False))
    assert data[1].shape == (3, 4, 4)
    with pytest.raises(DataError, match="a.jpg"):
        data[0]
