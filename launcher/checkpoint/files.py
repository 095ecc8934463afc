"""Checkpoint files: format, atomic write, manifest, verification, safe loading, discovery (no collectives).

Layout of a checkpoint directory::

    step_00000120.pt     torch.save of one dict (see below); written to a temp file, fsynced, renamed
    step_00000120.json   manifest {"file", "crc32", "bytes", "step", "epoch", "metric"}; written after
                         the .pt, so a checkpoint without a manifest (killed mid-save) is never picked up
    latest               name of the newest complete checkpoint (a hint; discovery does not depend on it)
    best                 name of the best checkpoint by metric (kept beyond ``keep_last``)

The ``.pt`` dict holds ``format``, ``step``, ``epoch``, ``best_metric``, ``model`` (a plain state_dict,
unwrapped from DDP: loadable without the launcher), every registered object's ``state_dict`` (optimizer,
scheduler, grad scaler, ...), ``ranks`` (one entry per rank: RNG states of Python, NumPy, torch CPU/CUDA, and
per-rank objects such as the data loader position), ``world_size``, ``job`` (the resolved job) and
``versions``. Everything is tensors and plain data, so ``torch.load(weights_only=True)`` reads it and no
pickled code ever runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import mmap
import os
import re
import shutil
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .. import processes, regularfile

FORMAT = "launcher-checkpoint/1"
_NAME = re.compile(r"^step_(\d{8,})\.(pt|dcp)$")  # .dcp: a sharded checkpoint's folder (see .sharded)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or incompatible with this run; the message says what to do."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32_of(f: Any) -> str:
    # CRC32 detects truncation and bit rot at disk speed (a cryptographic hash capped the write speed);
    # protection against malicious files comes from weights_only loading, not from the checksum.
    # Hashing a read-only mapping skips the copy into a read buffer.
    size = os.fstat(f.fileno()).st_size
    if size == 0:
        return f"{0:08x}"
    with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        return f"{zlib.crc32(m):08x}"


def _crc32(path: Path) -> str:
    with open(path, "rb") as f:
        return _crc32_of(f)


_ZIP_CRC_LOCK = threading.Lock()


@contextlib.contextmanager
def _without_zip_crc() -> Iterator[None]:
    """torch.save skips the zip format's per-record CRC32 (torch.load never checks it): our CRC32 of the whole
    file replaces it, and computing both capped the write at 0.75-0.85 of ``dd`` here (torch.save 0.25-0.28 s
    vs 0.21 s without it for 256 MB, dd 0.21 s). The setting is process-wide while a save runs; the lock keeps
    two of our saves in different threads from restoring it out of order."""
    try:
        from torch.utils.serialization import config
        patch = getattr(config, "patch", None)  # added when torch installs its config module
    except ImportError:  # torch < 2.6: no such setting
        patch = None
    if patch is None:
        yield
        return
    with _ZIP_CRC_LOCK, patch({"save.compute_crc32": False}):
        yield


_FSYNC_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def fsync_thread() -> concurrent.futures.ThreadPoolExecutor:
    """One thread, started once and kept, for the fsync that runs beside the CRC.

    Saves must never start or end a thread: in CPython 3.11 a thread starting or ending while another thread
    forks (a DataLoader starting its workers at an epoch boundary) leaves the child holding the interpreter's
    thread-list lock, and the worker hangs before running a line (seen in a test: a rank waited on a worker
    stuck in ``PyOS_AfterFork_Child``). :class:`Checkpointer` starts its threads when it is created.
    """
    pool = _FSYNC_POOLS.get(os.getpid())  # per process: a forked child has the object but not the thread
    if pool is None:
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckpt-fsync")
        _FSYNC_POOLS[os.getpid()] = pool
        pool.submit(int).result()  # start the thread now
    return pool


def atomic_write_bytes(path: Path, data: bytes | None = None, obj: Any = None) -> str:
    """Write ``data`` (or ``torch.save(obj)``) to ``path`` atomically; returns the written bytes' CRC32 (hex).

    Temp file in the same directory, fsync, rename over ``path``, fsync the directory: a crash at any moment
    leaves either the old file or the new one, never a torn one. ``torch.save`` gets the file *name*, so its
    C++ writer streams tensors to the file without a pass through Python; the CRC is then computed from the
    page cache while the fsync waits for the disk (both release the GIL), which hides it almost entirely.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if obj is not None:
            with _without_zip_crc():
                torch.save(obj, str(tmp))
        else:
            assert data is not None
            tmp.write_bytes(data)
        with open(tmp, "rb") as f:
            synced = fsync_thread().submit(os.fsync, f.fileno())
            crc = _crc32_of(f)
            synced.result()
        os.replace(tmp, path)
    except BaseException as e:
        # A failed save (disk full, unpicklable state) leaves nothing behind; the cleanup's own error (EROFS
        # on a file system turned read-only) must never replace the error it cleans up after.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        full = _disk_full(path, e, len(data) if data is not None else _payload_bytes(obj))
        if full:
            raise CheckpointError(full) from e
        raise
    _fsync_dir(path.parent)
    return crc


def _payload_bytes(obj: Any) -> int:
    """About the bytes ``torch.save(obj)`` writes: its tensors' sizes (the rest is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_payload_bytes(v) for v in obj)
    return 0


def _disk_full(path: Path, error: BaseException, needed: int) -> str:
    """A message when ``error`` (an ``OSError`` ENOSPC, or torch's C++ writer's ``iostream error`` /
    ``unexpected pos``) came from a full disk; empty otherwise."""
    import errno
    import shutil

    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    enospc = isinstance(error, OSError) and error.errno == errno.ENOSPC
    if not enospc and not (isinstance(error, RuntimeError) and free < needed + (1 << 20)):
        return ""
    mb = 1 << 20
    return (f"{path}: no space left on the device: the checkpoint needs about {needed / mb:.1f} MB, "
            f"{free / mb:.1f} MB are free; the previous checkpoints are untouched\nHINT: free space, lower "
            "checkpoint.keep_last, or point checkpoint.dir at a larger file system")


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file with a manifest, newest first (validity not checked)."""
    return [(step, p) for step, p in candidates(directory) if p.with_suffix(".json").exists()]


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint file against its manifest; returns the manifest or raises CheckpointError."""
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(regularfile.read_text(manifest_path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable manifest ({e})") from None
    if isinstance(manifest, dict) and path.suffix == ".dcp":
        from . import sharded

        sharded.verify(path, manifest)
        return manifest
    if not isinstance(manifest, dict) or not isinstance(manifest.get("crc32"), str) \
            or not isinstance(manifest.get("bytes"), int):
        raise CheckpointError(f"{path}: the manifest is not a launcher manifest (corrupt)")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if size != manifest.get("bytes"):
        raise CheckpointError(f"{path}: truncated ({size} bytes, manifest says {manifest.get('bytes')})")
    if _crc32(path) != manifest.get("crc32"):
        raise CheckpointError(f"{path}: checksum mismatch (the file is corrupt)")
    return manifest


def load_file(path: str | os.PathLike[str], verify_checksum: bool = True) -> dict[str, Any]:
    """Load one checkpoint file safely (``weights_only``: no pickled code runs) onto the CPU."""
    path = Path(path)
    if verify_checksum and path.with_suffix(".json").exists():
        verify(path)
    if path.suffix == ".dcp" and path.is_dir():
        from . import sharded

        return sharded.read(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for unsafe or broken pickles
        text = str(e)
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise CheckpointError(
                f"{path}: refused: the file asks to run code or build objects that are not plain tensors or "
                "data\nHINT: only load checkpoints you trust; convert it with torch.load(weights_only=False) "
                "in a sandbox and save the state_dicts alone"
            ) from None
        raise CheckpointError(
            f"{path}: cannot be read ({type(e).__name__}: {text.splitlines()[0]})"
        ) from None


def find_latest(directory: str | os.PathLike[str], log: Any = print) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``directory`` that verifies and loads; corrupt ones are reported, skipped."""
    return scan(directory, log)[0]


def scan(directory: str | os.PathLike[str],
         log: Any = print) -> tuple[tuple[Path, dict[str, Any]] | None, list[tuple[Path, str]]]:
    """``(newest valid checkpoint and its data, or None; [(newer file, why it was refused)])``.

    Every ``step_*.pt`` counts, with or without a manifest: a file that looks like a checkpoint and does not
    verify is reported, never silently passed over.
    """
    refused: list[tuple[Path, str]] = []
    for _, path in candidates(directory):
        try:
            verify(path)  # a file without its manifest was never finished: refused too
            return (path, load_file(path, verify_checksum=False)), refused
        except CheckpointError as e:
            log(f"[launcher] skipping checkpoint: {e}")
            refused.append((path, str(e)))
    return None, refused


def candidates(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every file named like a checkpoint, newest first (manifest or not)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def refusals(directory: str | os.PathLike[str]) -> list[tuple[Path, str]]:
    """When ``directory`` holds files named like checkpoints and none of them verifies (manifest, size,
    CRC32): each with the reason; an empty list otherwise. Reads files, loads none."""
    refused = []
    for _, path in candidates(directory):
        try:
            verify(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
        else:
            return []
    return refused


def describe_refusals(refused: list[tuple[Path, str]]) -> str:
    """One indented line per refused file: its name and why."""
    return "\n  ".join(f"{p.name}: {reason.removeprefix(str(p) + ': ')}" for p, reason in refused)


REFUSED = "refused"


def move_aside(path: Path, reason: str) -> Path:
    """Move a refused checkpoint (and its manifest) into ``refused/`` beside it, with the reason."""
    folder = path.parent / REFUSED
    folder.mkdir(exist_ok=True)
    for p in (path, path.with_suffix(".json")):
        if p.exists():
            if p.is_dir() and (folder / p.name).exists():
                shutil.rmtree(folder / p.name)  # refused before: the newer refusal replaces it
            os.replace(p, folder / p.name)
    (folder / f"{path.stem}.why.txt").write_text(reason + "\n")
    return folder / path.name


def remove_stale_temp_files(directory: Path) -> list[Path]:
    """Temp files of saves whose process is gone (a save killed half-way): ``.NAME.PID.tmp``; and the temp
    folders of sharded saves (``.step_N.dcp.SEQ.tmp``: called when a job starts, holding the folder's
    lock)."""
    removed = []
    for p in directory.glob(".*.tmp") if directory.is_dir() else []:
        pid = p.name.rsplit(".", 2)[-2]
        if ".dcp." in p.name and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        elif pid.isdigit() and not processes.alive(int(pid)):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file, or the newest valid one in a directory, as a dict (``state["model"]`` etc.).

    No launcher object is needed and no pickled code runs. Raises CheckpointError when nothing valid exists.
    """
    p = Path(path)
    if p.is_dir() and p.suffix != ".dcp":
        found = find_latest(p, log=lambda msg: print(msg, file=sys.stderr))
        if found is None:
            raise CheckpointError(f"{p}: no valid checkpoint in this directory")
        p, data = found
    else:
        data = load_file(p)
    if data.get("sharded"):
        from .states import consolidate

        return consolidate(p, data)
    return data
