"""A user's own image-caption files, no checkpoint: dcd teacher -> dcd distill -> dcd index -> dcd search.

The files are what people have: images of any size and aspect, a transparent PNG, greyscale, CMYK and 16-bit
files, a phone photo stored sideways with an EXIF orientation, one file that is not an image and one truncated
JPEG; a Karpathy file with train and test splits only (no val).
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dcd import cli
from dcd.data import load_image, load_split

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 70, 220), (230, 200, 30), (150, 60, 180), (30, 180, 190)]
SHAPES = ["square", "circle", "bar"]


def _picture(colour, shape, size):
    from PIL import ImageDraw

    image = Image.new("RGB", size, (250, 250, 250))
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "bar":
        draw.rectangle((w // 8, h // 3, 7 * w // 8, 2 * h // 3), fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def _write(image: Image.Image, path: Path, kind: str) -> None:
    if kind == "rgba":  # transparent background: must come out white, not black
        rgba = image.convert("RGBA")
        pixels = np.array(rgba)
        pixels[(pixels[..., :3] > 240).all(-1), 3] = 0
        Image.fromarray(pixels, "RGBA").save(path)
    elif kind == "grey":
        image.convert("L").save(path, quality=90)
    elif kind == "cmyk":
        image.convert("CMYK").save(path, quality=90)
    elif kind == "16bit":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        Image.fromarray(grey).save(path)
    elif kind == "exif":  # stored rotated, with the orientation tag that turns it back
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 clockwise to display
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
    else:
        image.save(path, quality=90)


@pytest.fixture
def own_data(tmp_path):
    """24 pictures (train 18, test 6) with two captions each, in every format above, plus two broken files."""
    root = tmp_path / "photos"
    root.mkdir()
    kinds = ["jpg", "rgba", "grey", "cmyk", "16bit", "exif"]
    images = []
    for i in range(24):
        colour, shape = COLOURS[i % 6], SHAPES[(i // 6) % 3]
        size = [(64, 48), (40, 90), (120, 60), (33, 33)][i % 4]
        kind = kinds[i % len(kinds)]
        name = f"img{i:02d}.{'png' if kind in ('rgba', '16bit') else 'jpg'}"
        _write(_picture(colour, shape, size), root / name, kind)
        name_colour = ["red", "green", "blue", "yellow", "purple", "cyan"][i % 6]
        images.append({"filename": name, "split": "test" if i % 4 == 3 else "train",
                       "sentences": [{"raw": f"a {name_colour} {shape}"}, {"raw": f"one {shape} in {name_colour}"}]})
    (root / "notes.jpg").write_text("this is not an image")
    buffer = io.BytesIO()
    _picture((10, 10, 10), "square", (64, 64)).save(buffer, format="JPEG")
    (root / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    images.append({"filename": "notes.jpg", "split": "train", "sentences": [{"raw": "a broken file"}]})
    images.append({"filename": "cut.jpg", "split": "test", "sentences": [{"raw": "a truncated file"}]})
    path = tmp_path / "my_photos.json"
    path.write_text(json.dumps({"dataset": "my_photos", "images": images}))
    return path, root


def test_real_image_files_decode_as_a_person_sees_them(own_data):
    _, root = own_data
    transparent = load_image(root / "img01.png")  # rgba: its background was transparent
    assert transparent.getpixel((0, 0)) == (255, 255, 255)
    assert load_image(root / "img04.png").getpixel((0, 0))[0] > 200  # 16-bit: scaled, not clipped to white or black
    assert load_image(root / "img04.png").getpixel((20, 20))[0] < 200
    upright = load_image(root / "img05.jpg")  # a 40 x 90 picture stored on its side: shown upright again
    assert upright.size == (40, 90)
    assert load_image(root / "img03.jpg").mode == "RGB" and load_image(root / "img02.jpg").mode == "RGB"


def test_a_file_without_val_gets_one_held_out_of_train(own_data):
    path, root = own_data
    train, val = (load_split(str(path), root, split=s) for s in ("train", "val"))
    assert val.num_images == 1 and train.num_images == 18  # every 10th of the 19 training images
    assert not set(train.image_paths) & set(val.image_paths)


@pytest.mark.slow
def test_own_data_end_to_end_without_a_checkpoint(own_data, tmp_path, capsys, unit_teacher_recipe):
    path, root = own_data
    unit_teacher_recipe(max_steps=3)
    assert cli.main(["teacher", "--data", str(path), "--data-root", str(root), "--teacher", "meter"]) == 0
    teachers_home = tmp_path / "home" / "teachers"
    [teacher_dir] = [p for p in teachers_home.iterdir() if p.is_dir()]
    assert teacher_dir.name.startswith(f"meter-{path.parent.name}-") and (teacher_dir / "model").is_dir()
    run = tmp_path / "run"
    cli.main(["distill", "--data", str(path), "--data-root", str(root), "--out", str(run), "--max-steps", "2", "--batch-size", "4",
              "--epochs", "1", "--rerank-k", "3", "--student", "dual-bert32x1-vit32x1"])
    assert [p for p in teachers_home.iterdir() if p.is_dir()] == [teacher_dir]  # the teacher dcd teacher made
    results = json.loads((run / "results.json").read_text())
    assert [r["model"] for r in results["results"]][:3] == ["teacher", "baseline dual", "dcd dual"]
    assert json.loads((run / "recipe.json").read_text())["name"] == "own-data"
    skipped = (run / "skipped_images.txt").read_text()
    assert "notes.jpg" in skipped and "cut.jpg" in skipped  # listed with their reasons; the run went on
    assert results["eval_split"].endswith("test") and results["results"][0]["seconds"] > 0
    # the user's images in an index, searched with the distilled student, re-ranked by the teacher dcd trained
    index = tmp_path / "photos.index"
    cli.main(["index", str(index), "--student", str(run), "--images", str(root), "--no-progress"])
    meta = json.loads((index / "index.json").read_text())
    assert meta["modalities"]["images"]["count"] == 24 and meta["modalities"]["images"]["skipped"] == 2
    capsys.readouterr()
    cli.main(["search", str(index), "a red square", "-k", "5", "--json", "--rerank", "teacher", "--data", str(path),
              "--data-root", str(root),
              "--rerank-k", "8"])
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert len(hits) == 5 and all(Path(h["item"]["path"]).parent == root for h in hits)


@pytest.mark.slow
def test_a_checkpoint_is_fine_tuned_further_on_own_data(own_data, tmp_path, capsys, unit_teacher_recipe):
    import torch

    import teachers
    from teachers.meter import meter_preset

    path, root = own_data
    unit_teacher_recipe(max_steps=2)
    start = tmp_path / "start"
    meter_preset("roberta32x1-vit32x2").save_pretrained(start)
    capsys.readouterr()
    cli.main(["teacher", "--data", str(path), "--data-root", str(root), "--teacher-checkpoint", str(start)])
    printed = capsys.readouterr().out
    info = json.loads(printed[printed.index("{"):printed.rindex("}") + 1])
    assert info["start"] == str(start) and info["max_steps"] == 2
    assert info["steps"] == 1  # what it trained: one epoch of the few training captions at batch 32, under the cap
    tuned = teachers.create_model("meter", checkpoint=info["path"])
    before = teachers.create_model("meter", checkpoint=start)
    assert tuned.config == before.config  # the checkpoint's own architecture, its weights moved on
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), before.state_dict().values()))
    run = tmp_path / "run"
    cli.main(["distill", "--data", str(path), "--data-root", str(root), "--teacher-checkpoint", info["path"],
              "--out", str(run), "--max-steps", "2", "--batch-size", "4", "--epochs", "1", "--num-negatives", "4",
              "--num-hard", "2", "--rerank-k", "3", "--no-fusion", "--student", "dual-bert32x1-vit32x1"])
    assert json.loads((run / "recipe.json").read_text())["name"] == "reference"


def test_a_coco_caption_file_is_split_into_train_val_and_test(tmp_path):
    from dcd.pipeline import DistillSettings, load_data

    root = tmp_path / "images"
    root.mkdir()
    images, annotations = [], []
    for i in range(20):
        _picture(COLOURS[i % 6], SHAPES[i % 3], (40, 40)).save(root / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg"})
        annotations.append({"id": 100 + i, "image_id": i, "caption": f"picture {i}"})
    path = tmp_path / "captions_mine.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    splits = load_data(DistillSettings(data=str(path), data_root=str(root)))
    seen = [set(map(str, s.image_paths)) for s in splits.values()]
    assert [s.num_images for s in splits.values()] == [16, 2, 2]  # every 10th for test, every 10th from the 5th for val
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


def test_a_teacher_of_your_data_is_keyed_by_the_files_content_and_images_not_their_names(own_data, tmp_path):
    from dcd.recipes import DistillSettings, resolve

    path, root = own_data
    teacher = resolve(DistillSettings(data=str(path), data_root=str(root))).identity("teacher")
    other_root = resolve(DistillSettings(data=str(path), data_root=str(tmp_path))).identity("teacher")
    path.write_text(path.read_text().replace("a red", "one red"))  # same name, other captions
    edited = resolve(DistillSettings(data=str(path), data_root=str(root))).identity("teacher")
    assert len({json.dumps(t, sort_keys=True) for t in (teacher, other_root, edited)}) == 3
    embedded = resolve(DistillSettings()).identity("teacher")
    assert "data_file" not in embedded  # the embedded teacher's identity is what it was
