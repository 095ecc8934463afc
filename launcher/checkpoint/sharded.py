"""Sharded checkpoints: a folder every rank writes its part of, through torch.distributed.checkpoint (DCP).

Layout (beside it, ``step_00000120.json``: the manifest, with a CRC32 and size per file, written last)::

    step_00000120.dcp/
        __0_0.distcp ...   DCP: tensors only, each rank's shards (or, for a tensor every rank holds, one copy)
        .metadata          DCP's index of the tensors (a pickle: read here by a restricted unpickler)
        header.pt          rank 0: step, epoch, job, versions, and the non-tensor part of every state_dict
        rank_00000.pt ...  each rank: its RNG states and per-rank objects (the data position)

Only tensors go through DCP: it keeps one copy of a key every rank saves (per-rank RNG or data state under
one key silently became one rank's), and it reads non-tensor items with ``torch.load(weights_only=False)``.
Everything else is in plain ``torch.save`` files read with ``weights_only=True``: no pickled code runs on
load.

Written into ``.step_00000120.dcp.N.tmp/`` and renamed by rank 0 once every rank's files are there and
checksummed; a kill at any moment leaves the previous checkpoint as the newest valid one.
"""

from __future__ import annotations

import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import internals
from .files import CheckpointError, _crc32, _disk_full, _fsync_dir, _payload_bytes, atomic_write_bytes

SUFFIX = ".dcp"
HEADER = "header.pt"
TENSOR = "<launcher:tensor>"  # stands for a tensor of a state_dict in the header (it is in the DCP files)
# Saved or read by one process on purpose (one rank, `launcher consolidate`): DCP's UserWarning says it
# assumes so at every call. Set once here, as a message filter: changing filters per call is not thread-safe.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def temp_folder(path: Path, seq: int) -> Path:
    """Where the ``seq``-th save of this job writes ``path`` (numbered: a step saved twice, at its end and
    at the epoch's end, gets two folders, so a rank that starts the second save while rank 0 still renames
    the first writes into its own)."""
    return path.with_name(f".{path.name}.{seq}.tmp")


# ------------------------------------------------------------------------ tensors apart from the rest

def split(tree: Any, path: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """``(tree with every tensor replaced by a marker, {key: tensor})``; nested dicts and lists."""
    tensors: dict[str, Any] = {}
    if isinstance(tree, torch.Tensor):
        return TENSOR, {"/".join(path): tree}
    if isinstance(tree, dict):
        rest = {}
        for k, v in tree.items():
            rest[k], t = split(v, (*path, _key(k)))
            tensors.update(t)
        return rest, tensors
    if isinstance(tree, (list, tuple)):
        items = []
        for i, v in enumerate(tree):
            r, t = split(v, (*path, str(i)))
            items.append(r)
            tensors.update(t)
        return type(tree)(items), tensors
    return tree, tensors


def merge(rest: Any, tensors: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    """The inverse of :func:`split`."""
    if isinstance(rest, str) and rest == TENSOR:
        return tensors["/".join(path)]
    if isinstance(rest, dict):
        return {k: merge(v, tensors, (*path, _key(k))) for k, v in rest.items()}
    if isinstance(rest, (list, tuple)):
        return type(rest)(merge(v, tensors, (*path, str(i))) for i, v in enumerate(rest))
    return rest


def _key(k: Any) -> str:
    if isinstance(k, str) and "/" in k:
        raise CheckpointError(f"a state_dict key holds '/', the separator of sharded checkpoints: {k!r}")
    return str(k)


# ------------------------------------------------------------------------------------------ writing

def write(path: Path, tensors: dict[str, Any], header: dict[str, Any] | None, mine: dict[str, Any],
          group: Any, seq: int) -> dict[str, Any] | None:
    """*Collective over ``group``.* Write this rank's part of the checkpoint folder ``path``; rank 0 (the one
    given a ``header``) then checks every rank's files, renames the folder into place and returns the
    manifest (None on other ranks)."""
    import torch.distributed as tdist

    distributed = tdist.is_initialized()
    rank = tdist.get_rank(group) if distributed else 0
    tmp = temp_folder(path, seq)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        return _write(path, tmp, rank, tensors, header, mine, group if distributed else None)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays the newest
        # DCP gathers every rank's write error into one CheckpointException (not an OSError)
        full = _disk_full(path, e if isinstance(e, (OSError, RuntimeError)) else RuntimeError(str(e)),
                          _payload_bytes(tensors))
        if full:
            raise CheckpointError(full) from e
        raise


def _write(path: Path, tmp: Path, rank: int, tensors: dict[str, Any], header: dict[str, Any] | None,
           mine: dict[str, Any], group: Any) -> dict[str, Any] | None:
    """:func:`write`'s work in ``tmp``; ``group`` None: not distributed."""
    import torch.distributed as tdist
    import torch.distributed.checkpoint as dcp

    files = {rank_file(rank): atomic_write_bytes(tmp / rank_file(rank), obj=mine)}
    # One writing thread (thread_count=1): a thread started per save can hang a DataLoader fork (see
    # files.fsync_thread). sync_files: each file is fsynced before DCP reports it written.
    writer = dcp.FileSystemWriter(str(tmp), thread_count=1, sync_files=True, overwrite=True)
    dcp.save(tensors, storage_writer=writer, process_group=group)
    for p in tmp.glob(f"__{rank}_*.distcp"):
        files[p.name] = _crc32(p)
    mine_files = {name: (crc, (tmp / name).stat().st_size) for name, crc in files.items()}
    everyone: list[Any] = [mine_files]
    if group is not None:
        everyone = [None] * tdist.get_world_size(group)
        tdist.all_gather_object(everyone, mine_files, group=group)
    if header is None:
        return None
    listed = {name: {"crc32": c, "bytes": b} for part in everyone for name, (c, b) in part.items()}
    atomic_write_bytes(tmp / HEADER, obj=header)
    for name in (HEADER, ".metadata"):
        listed[name] = {"crc32": _crc32(tmp / name), "bytes": (tmp / name).stat().st_size}
    absent = sorted(n for n in listed if not (tmp / n).is_file())
    if absent:
        raise CheckpointError(
            f"{tmp}: rank 0 does not see files other ranks wrote there ({', '.join(absent[:3])}): the ranks "
            "do not share this folder\nHINT: point checkpoint.dir at a file system every machine mounts, or "
            "use checkpoint.format=full (rank 0 writes one file)")
    _fsync_dir(tmp)
    if path.exists():  # a save of the same step, refused earlier or written by a run that was then undone
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return {"file": path.name, "files": listed, "bytes": sum(f["bytes"] for f in listed.values()),
            "world_size": len(everyone)}


def writer_group(job: Any) -> Any:
    """*Collective.* A Gloo group of every rank for the sharded writes: a background write's collectives
    never interleave with the training loop's on the default group. None when not distributed."""
    import datetime

    import torch.distributed as tdist

    if not tdist.is_initialized():
        return None
    d = job.distributed if job is not None else None
    timeout = max(d.timeout_s, d.startup_timeout_s) if d is not None else 600.0
    return tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))


# ------------------------------------------------------------------------------------------ reading

def verify(path: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is there with its size and CRC32, and nothing claims to be missing."""
    files = manifest.get("files")
    if not isinstance(files, dict) or HEADER not in files:
        raise CheckpointError(f"{path}: the manifest is not a sharded launcher manifest (corrupt)")
    for name, want in files.items():
        p = path / name
        try:
            size = p.stat().st_size
        except OSError:
            raise CheckpointError(f"{path}: {name} is missing") from None
        if size != want.get("bytes"):
            raise CheckpointError(f"{path}: {name} is truncated ({size} bytes, manifest says "
                                  f"{want.get('bytes')})")
        if _crc32(p) != want.get("crc32"):
            raise CheckpointError(f"{path}: {name}: checksum mismatch (the file is corrupt)")


def read(path: Path) -> dict[str, Any]:
    """The header and every rank's file, as one dict of the shape of a full checkpoint without its tensors
    (``sharded: True``; ``ranks``: one entry per saved rank). Plain data only (``weights_only``)."""
    from .files import load_file

    header = load_file(path / HEADER, verify_checksum=False)
    n = int(header.get("world_size", 0))
    header["ranks"] = [load_file(path / rank_file(r), verify_checksum=False) for r in range(n)]
    header["sharded"] = True
    return header


_PUBLIC = ("Metadata", "MetadataIndex", "BytesStorageMetadata", "ChunkStorageMetadata",
           "TensorStorageMetadata", "TensorProperties", "StorageMeta")
_ALLOWED = {("torch.distributed.checkpoint.metadata", n) for n in _PUBLIC} | {
    ("torch", "Size"), ("pathlib", "PosixPath"), ("collections", "OrderedDict"),
    *internals.DCP_METADATA_PRIVATE}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's ``.metadata`` is a pickle; this reads it with only the classes DCP puts there, so a crafted
    ``.metadata`` cannot run code (torch's reader uses ``pickle.load``)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                        torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")


def read_metadata(path: Path) -> Any:
    """DCP's index of a checkpoint folder, read without running pickled code."""
    try:
        with open(path / ".metadata", "rb") as f:
            return _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path}/.metadata: refused: {e}\nHINT: only load checkpoints you trust; this one holds more "
            "than torch.distributed.checkpoint writes") from None


def storage_reader(path: Path) -> Any:
    """A DCP reader of ``path`` whose ``.metadata`` goes through :func:`read_metadata`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_bytes(value: Any) -> Any:
    return torch.load(value, weights_only=True)


def load_planner() -> Any:
    """DCP's default load planner, reading non-tensor items (we write none) with ``weights_only``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            self.state_dict[read_item.dest_index.fqn] = _safe_bytes(value)

    return SafePlanner(flatten_state_dict=False)


def load(path: Path, template: dict[str, Any], group: Any) -> dict[str, Any]:
    """*Collective over ``group``.* Fill ``template``'s tensors (this rank's shards, any saved world size)."""
    import torch.distributed.checkpoint as dcp

    dcp.load(template, storage_reader=storage_reader(path), planner=load_planner(), process_group=group)
    return template


def load_all(path: Path) -> dict[str, Any]:
    """Every tensor of the folder, whole, in this process (no process group): for one consolidated file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    index = read_metadata(path).state_dict_metadata
    template = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in index.items()
                if isinstance(md, TensorStorageMetadata)}
    dcp.load(template, storage_reader=storage_reader(path), planner=load_planner(), no_dist=True)
    return template



