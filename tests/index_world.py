"""A tiny index world for the index, search and serve tests: 8 colour pictures, a student that tells them apart."""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from students import dual_test

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20),
           "cyan": (20, 220, 220), "magenta": (220, 20, 220), "white": (250, 250, 250), "black": (5, 5, 5)}


def caption(name: str) -> str:
    return f"a {name} picture"


def train_colours(student, images, captions, steps=120):
    """A few contrastive steps: enough for 8 colours and 8 captions to find each other."""
    pixels = student.collate_images([student.image_transform()(im) for im in images])
    tokens = student.tokenize(captions)
    optimiser = torch.optim.AdamW(student.parameters(), lr=2e-3)
    target = torch.arange(len(images))
    student.train()
    for _ in range(steps):
        logits = student.score(pixels, tokens)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return student.eval()


def make_world(root: Path) -> dict:
    """A folder of 8 colour JPEGs (two sub-folders), 2 broken images and a text file; two saved students."""
    folder = root / "images"
    images = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        path = folder / ("a" if i % 2 else "b") / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (40, 40), rgb)
        image.save(path, quality=95)
        images.append(image)
    (folder / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    whole = (folder / "b" / "red.jpg").read_bytes()
    (folder / "a" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    trained = train_colours(dual_test(), images, [caption(n) for n in COLOURS])
    trained.save_pretrained(root / "student")
    torch.manual_seed(1)
    dual_test().save_pretrained(root / "other")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"caption": caption(n), "colour": n}) + "\n" for n in COLOURS))
    return {"root": root, "images": folder, "student": root / "student", "other": root / "other",
            "captions": captions}
