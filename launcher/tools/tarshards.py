"""Write tar shards of (image, label) samples and their index; convert ImageFolder trees and CIFAR-10.

A tool, not runtime: training reads the shards with :mod:`launcher.data.tar`.

The format is the common WebDataset layout: a plain tar whose members are ``KEY.png`` (or ``.jpg``) and
``KEY.cls`` (the label as text), grouped by key, one sample after the other. ``index.json`` beside the shards
lists every shard with its sample count (what the sharded dataset needs to plan an epoch without reading
anything) and the class names. Large image sets on slow file systems are read as a few big sequential files
instead of millions of small ones.

``python -m launcher.tools.tarshards IMAGE_FOLDER OUT_DIR --per-shard 1000`` converts an ImageFolder tree
into ``OUT_DIR/train`` and ``OUT_DIR/val``, the layout the classify example reads: ``root/train/...`` and
``root/val/...`` keep their split, a plain ``root/CLASS/image.jpg`` tree is split per class
(``--val-fraction``, default 0.1); ``--format cifar10`` converts a CIFAR-10 copy on disk (the python version).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..data.tar import INDEX, OFFSETS, open_shards, sample_offsets

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def write_shards(
    samples: Iterable[tuple[str, bytes, str, int]],
    out_dir: str | os.PathLike[str],
    *,
    per_shard: int = 1000,
    classes: list[str] | None = None,
    progress: bool = False,
) -> Path:
    """Write ``(key, image bytes, extension, label)`` samples into tar shards plus ``index.json``.

    Every shard and the index are written to a temp name and renamed, so a crash leaves no half shard behind.
    Returns the index path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Any]] = []
    tar: tarfile.TarFile | None = None
    tmp: Path | None = None
    count = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(desc=f"writing {out}", unit="img")

    def close() -> None:
        nonlocal tar, tmp
        if tar is not None and tmp is not None:
            tar.close()
            final = tmp.with_name(tmp.name.removeprefix(".").removesuffix(".tmp"))
            os.replace(tmp, final)
            write_offsets(final)
            shards.append({"file": final.name, "samples": count})
        tar = None

    for key, data, ext, label in samples:
        if tar is None or count >= per_shard:
            close()
            count = 0
            tmp = out / f".shard-{len(shards):06d}.tar.tmp"
            tar = tarfile.open(tmp, "w")  # noqa: SIM115 - a shard spans many samples; close() closes it
        for name, payload in ((f"{key}.{ext.lstrip('.')}", data), (f"{key}.cls", str(label).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        count += 1
        if bar is not None:
            bar.update()
    close()
    if bar is not None:
        bar.close()
    index = out / INDEX
    tmp_index = out / f".{INDEX}.tmp"
    tmp_index.write_text(json.dumps({"shards": shards, "classes": classes or []}, indent=1))
    os.replace(tmp_index, index)
    return index


def write_offsets(shard: str | os.PathLike[str]) -> int:
    """Write ``SHARD.offsets`` (:data:`launcher.data.tar.OFFSETS`) atomically; returns the sample count."""
    offsets = sample_offsets(os.fspath(shard))
    final = Path(f"{os.fspath(shard)}{OFFSETS}")
    tmp = final.with_name(f".{final.name}.tmp")
    tmp.write_bytes(b"".join(o.to_bytes(8, "little") for o in offsets))
    os.replace(tmp, final)
    return len(offsets)


def index_folder(folder: str | os.PathLike[str]) -> Path:
    """Index tar shards written elsewhere (WebDataset's, say): ``SHARD.offsets`` for each ``*.tar`` and an
    ``index.json`` with their sample counts (no class names). Returns the index path."""
    out = Path(folder)
    shards = [{"file": p.name, "samples": write_offsets(p)} for p in sorted(out.glob("*.tar"))]
    if not shards:
        raise FileNotFoundError(f"{out}: no *.tar shards to index")
    tmp_index = out / f".{INDEX}.tmp"
    tmp_index.write_text(json.dumps({"shards": shards, "classes": []}, indent=1))
    os.replace(tmp_index, out / INDEX)
    return out / INDEX


def image_folder_samples(
    root: str | os.PathLike[str], part: str = "all", val_fraction: float = 0.0, seed: int = 0,
) -> tuple[list[str], Iterator[tuple[str, bytes, str, int]]]:
    """Classes and samples of an ImageFolder tree (``root/CLASS/*.jpg``), files kept as they are encoded.

    ``part`` ``"train"`` or ``"val"`` keeps one side of a per-class split: ``val_fraction`` of each class's
    images (at least one where a class has two or more) drawn with ``seed``, the same on every call.
    """
    base = Path(root)
    classes = sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"{base}: no class folders\nHINT: expected {base}/CLASS_NAME/IMAGE.jpg")

    def files(cls: str) -> list[Path]:
        found = sorted(f for f in (base / cls).iterdir() if f.suffix.lower() in _IMAGE_EXT)
        if part == "all":
            return found
        rng = random.Random(f"{seed}:{cls}")
        picked = list(found)
        rng.shuffle(picked)
        n_val = min(len(found) - 1, max(1, round(len(found) * val_fraction))) if len(found) > 1 else 0
        val = set(picked[:n_val])
        return [f for f in found if (f in val) == (part == "val")]

    def gen() -> Iterator[tuple[str, bytes, str, int]]:
        for label, cls in enumerate(classes):
            for f in files(cls):
                yield f"{cls}_{f.stem}", f.read_bytes(), f.suffix.lstrip(".").lower(), label

    return classes, gen()


def cifar10_samples(
    root: str | os.PathLike[str], train: bool
) -> tuple[list[str], Iterator[tuple[str, bytes, str, int]]]:
    """Classes and samples (as PNG) of a CIFAR-10 copy on disk, read by torchvision (nothing is downloaded).

    ``root`` is the ``cifar-10-batches-py`` folder of the python version, or the folder that holds it.
    """
    from torchvision.datasets import CIFAR10

    base = Path(root)
    parent = base.parent if base.name == CIFAR10.base_folder else base
    try:
        ds = CIFAR10(str(parent), train=train, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise FileNotFoundError(
            f"{base}: {e}\nHINT: point to the extracted python version (cifar-10-python.tar.gz), "
            f"i.e. the folder that contains {CIFAR10.base_folder}/data_batch_1"
        ) from None

    def gen() -> Iterator[tuple[str, bytes, str, int]]:
        for i, (image, label) in enumerate(ds):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            yield f"{'train' if train else 'test'}_{i:05d}", buf.getvalue(), "png", int(label)

    return list(ds.classes), gen()


Split = tuple[str, tuple[list[str], Iterator[tuple[str, bytes, str, int]]]]


def _splits(src: Path, fmt: str, val_fraction: float) -> list[Split]:
    """``(output subfolder, (classes, samples))`` for ``train`` and ``val``: the tree's own split, or a
    per-class split of a plain ``CLASS/*.jpg`` tree (``val_fraction`` 0 writes everything to ``train``)."""
    if fmt == "cifar10":
        return [("train", cifar10_samples(src, True)), ("val", cifar10_samples(src, False))]
    if (src / "train").is_dir() and (src / "val").is_dir():
        return [(split, image_folder_samples(src / split)) for split in ("train", "val")]
    if val_fraction <= 0:
        return [("train", image_folder_samples(src))]
    return [(part, image_folder_samples(src, part, val_fraction)) for part in ("train", "val")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.tools.tarshards",
                                     description=__doc__.splitlines()[0])
    parser.add_argument(
        "src",
        help="an ImageFolder tree (SRC/CLASS/IMAGE.jpg, or SRC/train/... and SRC/val/...), "
        "or a CIFAR-10 copy with --format cifar10; with --index, a folder of tar shards",
    )
    parser.add_argument(
        "out", nargs="?",
        help="output folder for the shards and index.json (OUT/train and OUT/val for splits)"
    )
    parser.add_argument(
        "--index", action="store_true",
        help="index the tar shards in SRC (written by WebDataset's tools, say): sample counts in "
        "SRC/index.json and SHARD.offsets beside each shard, so readers start at any sample")
    parser.add_argument("--format", choices=("imagefolder", "cifar10"), default="imagefolder",
                        help="layout of SRC (default imagefolder)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each class held out as OUT/val when SRC has no train/ and val/ "
                        "(default 0.1; 0 writes everything to OUT/train)")
    args = parser.parse_args(argv)
    if args.index:
        try:
            index = index_folder(args.src)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        paths, sizes, _ = open_shards(index.parent)
        print(f"indexed {sum(sizes)} samples in {len(paths)} shards: {index}")
        return 0
    if args.out is None:
        parser.error("OUT is required (or --index SRC)")
    if not 0 <= args.val_fraction < 1:
        parser.error("--val-fraction must be at least 0 and below 1")
    try:
        splits = _splits(Path(args.src), args.format, args.val_fraction)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for sub, (classes, samples) in splits:
        index = write_shards(
            samples, Path(args.out) / sub, per_shard=args.per_shard, classes=classes, progress=True
        )
        paths, sizes, _ = open_shards(index.parent)
        print(
            f"wrote {sum(sizes)} samples of {len(classes)} classes into {len(paths)} shards in {index.parent}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
