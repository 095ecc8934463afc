"""A small, learnable synthetic image set (no download): shapes drawn on noisy backgrounds, in tar shards.

``python -m examples.shapes data/shapes`` writes ``train/`` and ``val/`` shard folders.
"""

from __future__ import annotations

import argparse
import io
import math
import random
from collections.abc import Iterator
from pathlib import Path

from launcher.data.tar import INDEX
from launcher.tools.tarshards import write_shards

CLASSES = ["circle", "square", "triangle", "cross"]


def draw(label: int, size: int, rng: random.Random) -> bytes:
    """One PNG: a shape of class ``label`` with random position, scale, rotation and colours, plus noise."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randrange(0, 90) for _ in range(3))  # dark background, bright shape: learnable in minutes
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    fg = tuple(rng.randrange(150, 256) for _ in range(3))
    r = rng.uniform(0.22, 0.4) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    if CLASSES[label] == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif CLASSES[label] == "square":
        pts = [
            (cx + r * math.cos(angle + k * math.pi / 2), cy + r * math.sin(angle + k * math.pi / 2))
            for k in range(4)
        ]
        d.polygon(pts, fill=fg)
    elif CLASSES[label] == "triangle":
        pts = [
            (cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3))
            for k in range(3)
        ]
        d.polygon(pts, fill=fg)
    else:
        w = max(2, int(r / 2.5))
        for a in (angle, angle + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=w)
    px = img.load()
    assert px is not None  # an image in memory always has pixel access
    for _ in range(size * size // 16):  # salt noise
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(rng.randrange(0, 256) for _ in range(3))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def samples(n: int, size: int, seed: int) -> Iterator[tuple[str, bytes, str, int]]:
    rng = random.Random(seed)
    for i in range(n):
        label = i % len(CLASSES)
        yield f"{i:07d}", draw(label, size, rng), "png", label


def generate(
    root: str | Path, train: int = 2400, val: int = 480, size: int = 32, per_shard: int = 250
) -> Path:
    """Write train/val shards under ``root`` unless they already exist; returns ``root``."""
    root = Path(root)
    for split, n, seed in (("train", train, 0), ("val", val, 1)):
        if not (root / split / INDEX).exists():
            write_shards(samples(n, size, seed), root / split, per_shard=per_shard, classes=CLASSES)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default="data/shapes")
    p.add_argument("--train", type=int, default=2400)
    p.add_argument("--val", type=int, default=480)
    p.add_argument("--size", type=int, default=32)
    a = p.parse_args()
    print(f"shapes data in {generate(a.root, a.train, a.val, a.size)}")


if __name__ == "__main__":
    main()
