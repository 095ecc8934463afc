"""Checkpoints: the whole training state, written atomically, verified on load, loaded safely.

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
import platform
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import dist, stop
from .rng import get_rng_state, set_rng_state

FORMAT = "launcher-checkpoint/1"
_NAME = re.compile(r"^step_(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unsafe or incompatible with this run; the message says what to do."""


@dataclass
class TrainState:
    """Counters that travel with every checkpoint."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch in progress (the next one after an end-of-epoch save)."""
    best_metric: float | None = None
    """Best value of the tracked metric so far."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32_of(f: Any) -> str:
    # CRC32 detects truncation and bit rot at several GB/s (sha256 ran at 0.8 GB/s here and capped the write
    # speed); protection against malicious files comes from weights_only loading, not from the checksum.
    # Hashing a read-only mapping skips the copy into a read buffer (0.07 s instead of 0.12 s for 256 MB).
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
    except ImportError:  # torch < 2.6: no such setting
        yield
        return
    patch = config.patch  # type: ignore[attr-defined]  # added when torch installs its config module
    with _ZIP_CRC_LOCK, patch({"save.compute_crc32": False}):
        yield


_FSYNC_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _fsync_thread() -> concurrent.futures.ThreadPoolExecutor:
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
            synced = _fsync_thread().submit(os.fsync, f.fileno())
            crc = _crc32_of(f)
            synced.result()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed save (disk full, unpicklable state) leaves nothing behind
        raise
    _fsync_dir(path.parent)
    return crc


class _Staging:
    """CPU copies of a state tree for a background write, made into the buffers of the previous save.

    Copying into memory that is already mapped runs at memory speed (16 ms for 256 MB here), while a fresh
    copy pays a page fault per 4 KiB (90 ms): the step loop's stall is the copy. The buffers stay allocated
    between saves (one CPU copy of the saved state), as torch.distributed.checkpoint's cached staging does.
    With ``copy=False`` (synchronous saves) CPU tensors are written from where they are and nothing is kept.
    """

    def __init__(self, copy: bool) -> None:
        self.copy = copy
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}

    def __call__(self, obj: Any, key: tuple[Any, ...] = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            t = obj.detach()
            if not self.copy:
                return t.cpu()
            buf = self._buffers.get(key)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.stride() != t.stride():
                buf = self._buffers[key] = t.to("cpu", copy=True)
            else:
                buf.copy_(t)
            return buf
        if isinstance(obj, dict):
            return {k: self(v, (*key, k)) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self(v, (*key, i)) for i, v in enumerate(obj))
        return obj


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, path)`` of every checkpoint file with a manifest, newest first (validity not checked)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.with_suffix(".json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint file against its manifest; returns the manifest or raises CheckpointError."""
    manifest_path = path.with_suffix(".json")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no readable manifest ({e})") from None
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
    for _, path in list_checkpoints(directory):
        try:
            return path, load_file(path)
        except CheckpointError as e:
            log(f"[launcher] skipping checkpoint: {e}")
    return None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint file, or the newest valid one in a directory, as a dict (``state["model"]`` etc.).

    No launcher object is needed and no pickled code runs. Raises CheckpointError when nothing valid exists.
    """
    p = Path(path)
    if p.is_dir():
        found = find_latest(p, log=lambda msg: print(msg, file=sys.stderr))
        if found is None:
            raise CheckpointError(f"{p}: no valid checkpoint in this directory")
        return found[1]
    return load_file(p)


class Checkpointer:
    """Save and restore the whole training state.

    Args:
        directory: where checkpoints go (created on rank 0).
        keep_last: how many recent checkpoints to keep (the best one is kept in addition).
        async_save: write in a background thread; the caller only pays for the copy to CPU memory.
        job: the resolved :class:`launcher.Job`, stored for resume checks (optional).
        per_rank: objects whose state differs per rank (the data loader), saved for every rank.
        **objects: objects with ``state_dict``/``load_state_dict`` (model, optimizer, scheduler, scaler...);
            a DDP model is unwrapped so the saved ``model`` is a plain state_dict.

    ``save`` and ``resume`` are collective: every rank calls them together. :meth:`for_job` takes the
    directory and settings from a job's ``checkpoint`` section.
    """

    @classmethod
    def for_job(cls, job: Any, **kwargs: Any) -> Checkpointer:
        """A checkpointer in ``job.checkpoint_dir`` with the job's ``keep_last`` and ``async_save``, storing
        ``job``; ``kwargs`` as for the constructor (``per_rank``, ``model=``, ``optimizer=``, ...)."""
        c = job.checkpoint
        return cls(job.checkpoint_dir, keep_last=c.keep_last, async_save=c.async_save, job=job, **kwargs)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int = 3,
        async_save: bool = True,
        job: Any = None,
        per_rank: dict[str, Any] | None = None,
        best_mode: str = "max",
        **objects: Any,
    ) -> None:
        from .wrap import unwrap

        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.job = job
        self.per_rank = dict(per_rank or {})
        self.objects = {k: (unwrap(v) if k == "model" else v) for k, v in objects.items()}
        self.best_mode = best_mode
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        # Both threads start here, before the training loop forks DataLoader workers (see _fsync_thread).
        self._pool.submit(int).result()
        _fsync_thread()
        self._pending: concurrent.futures.Future[Path] | None = None
        self._stage = _Staging(copy=async_save)
        self.last_saved: Path | None = None
        if dist.is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)

    # ----------------------------------------------------------------------------------------- saving

    def _better(self, metric: float | None, best: float | None) -> bool:
        if metric is None:
            return False
        if best is None:
            return True
        return metric > best if self.best_mode == "max" else metric < best

    def save(self, state: TrainState, metric: float | None = None, *, per_rank: bool = True) -> Path:
        """*Collective.* Save a checkpoint of ``state`` and every registered object; returns the file path.

        ``per_rank=False`` leaves out the per-rank objects (e.g. at the end of an epoch, when the loader
        position is of no use). The step loop pays for one all-gather and a copy to CPU; the write runs in the
        background when ``async_save`` is on (at most one write in flight).
        """
        is_best = self._better(metric, state.best_metric)
        if is_best:
            state.best_metric = metric
        mine = {"rng": get_rng_state()}
        if per_rank:
            mine.update({k: v.state_dict() for k, v in self.per_rank.items()})
        ranks = dist.all_gather_object(mine)
        path = self.directory / f"step_{state.step:08d}.pt"
        if dist.is_main_process():
            payload = {
                "format": FORMAT,
                "step": state.step,
                "epoch": state.epoch,
                "best_metric": state.best_metric,
                "metric": metric,
                "world_size": dist.get_world_size(),
                "ranks": ranks,
                "job": _job_dict(self.job),
                "versions": {"torch": str(torch.__version__), "python": platform.python_version(),
                             "launcher": _launcher_version()},
                "time": time.time(),
            }
            payload.update({k: v.state_dict() for k, v in self.objects.items()})
            self.wait()  # at most one write in flight, and it has let go of the staging buffers
            payload = self._stage(payload)
            if self.async_save:
                self._pending = self._pool.submit(self._write, path, payload, is_best)
            else:
                self._write(path, payload, is_best)
        self.last_saved = path
        return path

    def _write(self, path: Path, payload: dict[str, Any], is_best: bool) -> Path:
        digest = atomic_write_bytes(path, obj=payload)
        manifest = {"file": path.name, "crc32": digest, "bytes": path.stat().st_size, "step": payload["step"],
                    "epoch": payload["epoch"], "metric": payload["metric"]}
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(manifest).encode())
        atomic_write_bytes(self.directory / "latest", path.name.encode())
        if is_best:
            atomic_write_bytes(self.directory / "best", path.name.encode())
        self._prune()
        return path

    def _prune(self) -> None:
        best = (self.directory / "best").read_text().strip() if (self.directory / "best").exists() else None
        for _, p in list_checkpoints(self.directory)[self.keep_last :]:
            if p.name != best:
                # The manifest first: never a manifest without its file.
                p.with_suffix(".json").unlink(missing_ok=True)
                p.unlink(missing_ok=True)

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; re-raises its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """*Collective.* Finish pending writes; all ranks return once the newest checkpoint is on disk."""
        self.wait()
        self._pool.shutdown(wait=True)
        dist.barrier()

    def stop_if_requested(self, state: TrainState) -> None:
        """*Collective.* Call at every step boundary: when SLURM asked the job to stop (preemption, time
        limit, requeue), save ``state``, wait until it is on disk, and exit for the requeue (code 3).

        Free outside SLURM jobs (no communication); see :mod:`launcher.stop`.
        """
        if not stop.should_stop():
            return
        _log(f"[launcher] stop requested at step {state.step}: saving before the requeue")
        self.save(state)
        self.close()
        stop.exit_for_requeue()

    # ---------------------------------------------------------------------------------------- loading

    def resume(self, resume: str = "auto") -> TrainState:
        """*Collective.* Restore the newest valid checkpoint (``auto``), a given file, or nothing (``never``).

        Returns the :class:`TrainState` to continue from (a fresh one when nothing was restored).
        """
        found: tuple[Path, dict[str, Any]] | None = None
        if resume == "never":
            found = None
        elif resume == "auto":
            found = find_latest(self.directory, log=_log)
        else:
            found = (Path(resume), load_file(resume))
        # Every rank looked at the same files; make sure they agree before anyone restores anything.
        names = dist.all_gather_object(str(found[0]) if found else None)
        if len(set(names)) != 1:
            raise CheckpointError(f"ranks disagree on the checkpoint to resume from: {names}")
        if found is None:
            return TrainState()
        path, data = found
        restore_data = self._check_compatible(path, data)
        for k, obj in self.objects.items():
            if k not in data:
                raise CheckpointError(
                    f"{path}: has no '{k}' state\nHINT: register the same objects as when saving"
                )
            obj.load_state_dict(data[k])
        rank = dist.get_rank()
        mine = data["ranks"][rank] if rank < len(data["ranks"]) else None
        if mine is not None and restore_data:
            set_rng_state(mine["rng"])
            for k, obj in self.per_rank.items():
                if k in mine:
                    obj.load_state_dict(mine[k])
        state = TrainState(
            step=int(data["step"]), epoch=int(data["epoch"]), best_metric=data.get("best_metric")
        )
        _log(f"[launcher] resumed from {path} (step {state.step}, epoch {state.epoch})")
        return state

    def _check_compatible(self, path: Path, data: dict[str, Any]) -> bool:
        """Compare the saved run with this one; raise on changes that break exact resume unless allowed.

        Returns whether per-rank state (RNG, data position) can be restored.
        """
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a launcher checkpoint (format {data.get('format')!r})")
        saved, now = data.get("job") or {}, _job_dict(self.job) or {}
        changes = _diff(saved, now)
        if data.get("world_size") != dist.get_world_size():
            changes.insert(0, f"world size: {data.get('world_size')} -> {dist.get_world_size()}")
        breaking = [c for c in changes if c.split(":")[0] in _EXACT_KEYS or c.startswith("world size")]
        if changes:
            _log("[launcher] the job changed since the checkpoint was written:\n  " + "\n  ".join(changes))
        if breaking:
            allowed = bool(self.job and self.job.checkpoint.allow_changes)
            if not allowed:
                raise CheckpointError(
                    f"{path}: these changes break exact resume: {'; '.join(breaking)}\n"
                    "HINT: undo them, start a new run (checkpoint.resume=never or a new name), or pass "
                    "checkpoint.allow_changes=true to resume anyway (data order and RNG streams will differ)"
                )
            return False
        return True


#: Job keys whose change makes the resumed run differ from an uninterrupted one.
_EXACT_KEYS = {
    "seed", "train.batch_size", "train.grad_accum", "data.num_workers", "data.uneven", "data.shuffle_buffer",
    "distributed.nproc_per_node", "slurm.nodes", "slurm.tasks_per_node",
}
_IGNORED_KEYS = {"checkpoint.resume", "checkpoint.allow_changes", "output_dir"}


def _diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if key in _IGNORED_KEYS:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key not in ("args",):
            out += _diff(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def _job_dict(job: Any) -> dict[str, Any] | None:
    if job is None:
        return None
    from .config import to_dict

    return to_dict(job)


def _launcher_version() -> str:
    from . import __version__

    return __version__


def _log(msg: str) -> None:
    if dist.is_main_process():
        print(msg, flush=True)
