"""Read tar shards in the WebDataset layout (``KEY.png`` + ``KEY.cls``) with their ``index.json``.

``index.json`` lists every shard with its sample count (what the sharded dataset needs to plan an epoch
without reading anything) and the class names. Shards are written by ``python -m launcher.tools.tarshards``.
A shard folder and its shards may be local paths or any fsspec URL (``s3://``, ``gs://``, ``https://``,
``memory://``...); remote files are read by streaming (fsspec's read-ahead buffer), never downloaded whole.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from .. import internals

INDEX = "index.json"
#: Beside a shard, ``SHARD.offsets``: the byte offset of each sample's first header, little-endian uint64
#: (written by ``python -m launcher.tools.tarshards``): a reader starts at any sample with one small read.
OFFSETS = ".offsets"


def open_file(url: str | os.PathLike[str]) -> IO[bytes]:
    """A seekable binary file for a local path or an fsspec URL (``PROTOCOL://...``)."""
    text = os.fspath(url)
    if "://" not in text or text.startswith("file://"):
        return open(text.removeprefix("file://"), "rb")
    import fsspec

    return fsspec.open(text, "rb").open()  # type: ignore[no-any-return]


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}"


def open_shards(directory: str | os.PathLike[str]) -> tuple[list[str], list[int], list[str]]:
    """``(shard paths, samples per shard, class names)`` from a folder written by :func:`write_shards`."""
    d = os.fspath(directory)
    try:
        with open_file(_join(d, INDEX)) as f:
            index = json.loads(f.read())
    except OSError:
        raise FileNotFoundError(
            f"{_join(d, INDEX)}: no shard index\n"
            f"HINT: write shards first (python -m launcher.tools.tarshards SRC {d})"
        ) from None
    paths = [_join(d, s["file"]) for s in index["shards"]]
    return paths, [int(s["samples"]) for s in index["shards"]], list(index.get("classes", []))


def read_tar(path: str, start: int = 0) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in order from sample ``start``: ``{"key", "image": bytes, "label": int}``
    (nothing decoded). The reader seeks to sample ``start`` through the shard's :data:`OFFSETS` file; without
    one, it walks the earlier members' headers (their data is never read).

    Raises:
        ShardError: the shard is truncated or corrupt, or its offsets file does not belong to it.
    """
    with open_file(path) as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        at = _sample_offset(path, start, size)
        if at is not None:
            f.seek(at)  # a TarFile starts reading where its file is
            start = 0
        index = -1
        try:
            # closed with f; seekable: a skip is one header read
            tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115
            current: dict[str, Any] = {}
            for index, key, member in _members(tar):
                if current and current["key"] != key:
                    yield current
                    current = {}
                end = internals.tar_member_data_end(member)
                if end > size:  # tarfile reads what is there, silently
                    raise tarfile.ReadError(f"{member.name} needs {member.size} bytes, the file ends first")
                if index < start:
                    continue
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                current["key"] = key
                if member.name.endswith(".cls"):
                    current["label"] = int(data.decode())
                else:
                    current["image"] = data
            # tarfile takes a file that ends at a member's boundary for the archive's end: a tar ends with
            # zero blocks, and a shard cut there has none
            if index >= 0:
                f.seek(end)
                if f.read(1024) != bytes(1024):
                    raise tarfile.ReadError("no end-of-archive blocks after the last member")
        except (tarfile.TarError, EOFError) as e:
            if at is not None and index < 0:
                raise ShardError(f"{path}{OFFSETS}: sample {start + 1}'s offset {at} is not where a sample "
                                 f"starts in {path} ({e}): the offsets file does not belong to this shard\n"
                                 f"{_REWRITE}") from None
            raise ShardError(f"{path}: truncated or corrupt tar shard ({e})\n{_REWRITE}") from None
        if current:
            yield current


class ShardError(ValueError):
    """A tar shard or its offsets file cannot be read as written; the message names the file."""


_REWRITE = ("HINT: write the shard again, or its offsets and index: python -m launcher.tools.tarshards "
            "--index FOLDER")


def _members(tar: tarfile.TarFile) -> Iterator[tuple[int, str, tarfile.TarInfo]]:
    """``(sample index, key, member)`` for every file member, reading headers only; the headers read are let
    go of as it goes, so memory stays flat whatever the shard's length."""
    index, key = -1, None
    while (member := tar.next()) is not None:
        internals.tar_forget_members(tar)
        if not member.isfile():
            continue
        name = member.name.rpartition(".")[0]
        if name != key:
            index, key = index + 1, name
        yield index, name, member


def _sample_offset(path: str, start: int, size: int) -> int | None:
    """Where sample ``start`` begins, from the shard's offsets file (None without one). An offset past the
    shard's end, or a file too short, is a wrong offsets file (another shard's, an old one): refused, never
    read from the wrong place."""
    if start == 0:
        return None
    try:
        with open_file(f"{path}{OFFSETS}") as f:
            entries = f.seek(0, os.SEEK_END) // 8
            f.seek(8 * start)
            raw = f.read(8)
    except OSError:
        return None
    if start == entries:  # just past the last sample: nothing to read
        return None
    at = int.from_bytes(raw, "little") if len(raw) == 8 else None
    if at is None or at % 512 or at >= size:
        has = "no entry" if at is None else f"offset {at}, not a header of the {size}-byte shard"
        raise ShardError(f"{path}{OFFSETS}: sample {start + 1} has {has}: the offsets file does not "
                         f"belong to {path}\n{_REWRITE}")
    return at


def sample_offsets(path: str) -> list[int]:
    """The byte offset of each sample's first header in a shard (what :data:`OFFSETS` files hold)."""
    offsets, last = [], -1
    with open_file(path) as f:
        tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 (closed with f)
        for index, _, member in _members(tar):
            if index != last:
                last = index
                offsets.append(internals.tar_member_offset(member))
    return offsets


class DecodeImage:
    """Sample transform: PNG/JPEG bytes -> RGB PIL image -> ``transform`` (torchvision), label kept."""

    def __init__(self, transform: Callable[[Any], Any] | None = None) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any]) -> tuple[Any, int]:
        from PIL import Image

        image = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        return (self.transform(image) if self.transform else image), sample["label"]
