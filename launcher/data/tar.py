"""Read tar shards in the WebDataset layout (``KEY.png`` + ``KEY.cls``) with their ``index.json``.

``index.json`` lists every shard with its sample count (what the sharded dataset needs to plan an epoch
without reading anything) and the class names. Shards are written by ``python -m launcher.tools.tarshards``.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

INDEX = "index.json"


def open_shards(directory: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """``(shard paths, samples per shard, class names)`` from a folder written by :func:`write_shards`."""
    d = Path(directory)
    try:
        index = json.loads((d / INDEX).read_text())
    except OSError:
        raise FileNotFoundError(
            f"{d / INDEX}: no shard index\n"
            f"HINT: write shards first (python -m launcher.tools.tarshards SRC {d})"
        ) from None
    paths = [str(d / s["file"]) for s in index["shards"]]
    return paths, [int(s["samples"]) for s in index["shards"]], list(index.get("classes", []))


def read_tar(path: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in order: ``{"key", "image": bytes, "label": int}`` (nothing decoded)."""
    current: dict[str, Any] = {}
    with tarfile.open(path, "r|") as tar:  # streaming: one sequential read
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if current and current["key"] != key:
                yield current
                current = {}
            f = tar.extractfile(member)
            assert f is not None
            data = f.read()
            current["key"] = key
            if ext == "cls":
                current["label"] = int(data.decode())
            else:
                current["image"] = data
    if current:
        yield current


class DecodeImage:
    """Sample transform: PNG/JPEG bytes -> RGB PIL image -> ``transform`` (torchvision), label kept."""

    def __init__(self, transform: Callable[[Any], Any] | None = None) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        from PIL import Image

        image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        return (self.transform(image) if self.transform else image), sample["label"]
