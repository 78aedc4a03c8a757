"""The synthetic image task of docs/multimodal.md's worked example, generated offline with Pillow (seeded).

Each 32x32 image holds one shape (circle, square or triangle) in one colour (red, green or blue) at a random
place and size on a light background with a little noise; the question asks what it shows and the answer is
"COLOUR SHAPE" (9 classes: chance is 1/9). Writes, under OUT (default examples/shapes):

  train.jsonl     chats with an image part (HF/TRL convention), 3,000 rows
  heldout.jsonl   prompt + images + label rows for the final score (generate probe): 90 images never trained on,
                  never used for any choice
  val.jsonl       the same kind of rows, 90 other images: the probes scored during training (and any tuning) use
                  these, so the held-out images stay untouched until the end
  *_tagged.jsonl  the same three splits with the answer after a visual-operation token (ATLAS-style functional
                  tokens, model.new_tokens): "<|Shape|>circle<|/Shape|> red circle"
  img/*.png

The three splits come from one seeded stream of draws (train first, then held-out, then validation), so no two
images are alike and adding validation rows leaves the training and held-out images as they were.

Usage: python examples/make_shapes.py [OUT] [--train N] [--heldout N] [--val N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220)}
SHAPES = ("circle", "square", "triangle")
QUESTION = "What is in the picture? Answer with its colour and shape."
SIZE = 32
OPEN, CLOSE = "<|Shape|>", "<|/Shape|>"


def tagged(colour: str, shape: str) -> str:
    """The answer after its visual-operation token: the model names the shape first, then answers."""
    return f"{OPEN}{shape}{CLOSE} {colour} {shape}"


def row(split: str, image: str, answer: str) -> dict:
    if split == "train":
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                          {"type": "text", "text": QUESTION}]},
                             {"role": "assistant", "content": answer}]}
    return {"prompt": QUESTION, "images": [image], "label": answer}


def draw(colour: str, shape: str, rng: random.Random):
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 255) for _ in range(3))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(7, 12)  # half the shape's size
    cx, cy = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
    fill = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in COLOURS[colour])
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    px = im.load()
    for _ in range(40):  # a little pixel noise, so no two images are alike
        x, y = rng.randrange(SIZE), rng.randrange(SIZE)
        px[x, y] = tuple(max(0, min(255, v + rng.randint(-40, 40))) for v in px[x, y])
    return im


def write(out: Path, n_train: int, n_heldout: int, seed: int, n_val: int = 0) -> None:
    rng = random.Random(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    splits = [("train", n_train), ("heldout", n_heldout), ("val", n_val)]
    files = {name + tag: open(out / f"{name}{tag}.jsonl", "w") for name, _ in splits for tag in ("", "_tagged")}
    try:
        i = 0
        for split, n in splits:
            for _ in range(n):
                colour, shape = classes[i % len(classes)]  # balanced
                name = f"img/{split}-{i:04d}.png"
                draw(colour, shape, rng).save(out / name)
                files[split].write(json.dumps(row(split, name, f"{colour} {shape}")) + "\n")
                files[split + "_tagged"].write(json.dumps(row(split, name, tagged(colour, shape))) + "\n")
                i += 1
    finally:
        for f in files.values():
            f.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).parent / "shapes"))
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--heldout", type=int, default=90)
    ap.add_argument("--val", type=int, default=90)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    write(Path(a.out), a.train, a.heldout, a.seed, a.val)
    print(f"wrote {a.train} training, {a.heldout} held-out and {a.val} validation images to {a.out}")


if __name__ == "__main__":
    main()
