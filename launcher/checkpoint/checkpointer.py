"""The collective :class:`Checkpointer`: save and restore the whole training state of every rank.

The file format and its safety live in :mod:`launcher.checkpoint.files`; this module decides what goes into a
checkpoint, when (:meth:`Checkpointer.step`), and whether a checkpoint may be resumed by this job.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import platform
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dist
from ..fsdp import is_fsdp
from ..rank import stop
from ..rng import get_rng_state, set_rng_state
from . import compat, sharded, states
from .files import (
    FORMAT,
    CheckpointError,
    atomic_write_bytes,
    describe_refusals,
    fsync_thread,
    list_checkpoints,
    load_file,
    move_aside,
    remove_stale_temp_files,
    scan,
)
from .staging import Staging


@dataclass
class TrainState:
    """Counters that travel with every checkpoint."""

    step: int = 0
    """Optimizer steps completed."""
    epoch: int = 0
    """Epoch in progress (the next one after an end-of-epoch save)."""
    best_metric: float | None = None
    """Best value of the tracked metric so far."""



#: Every checkpointer of this process: a rank told to stop finishes their writes in flight first.
_LIVE: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


def finish_writes_in_flight(bound_s: float, say: Any = print) -> None:
    """Wait up to ``bound_s`` seconds for every background write of this process to reach the disk, saying
    so (a rank stopping on Ctrl-C or SIGTERM: the write in flight is the checkpoint a rerun resumes from).
    Errors of the write are said, not raised: the stop goes on."""
    deadline = time.monotonic() + bound_s
    for ckpt in list(_LIVE):
        ckpt.finish_write_in_flight(deadline, say)


class Checkpointer:
    """Save and restore the whole training state.

    Args:
        directory: where checkpoints go (created on rank 0).
        keep_last: how many recent checkpoints to keep (the best one is kept in addition).
        async_save: write in a background thread; the caller only pays for the copy to CPU memory.
        every_steps: :meth:`step` saves every this many steps (0: never; save at epoch ends yourself).
        job: the resolved :class:`launcher.Job`, stored for resume checks (optional).
        per_rank: objects whose state differs per rank (the data loader), saved for every rank.
        format: ``full`` (one file, rank 0), ``sharded`` (a folder every rank writes its part of, loadable at
            any world size: :mod:`.sharded`), ``auto`` (sharded when the model is FSDP-sharded).
        **objects: objects with ``state_dict``/``load_state_dict`` (model, optimizer, scheduler, scaler...);
            a DDP model is unwrapped so the saved ``model`` is a plain state_dict.

    ``step``, ``save``, ``resume`` and ``close`` are collective: every rank calls them together.
    :meth:`for_job` takes the directory and settings from a job's ``checkpoint`` section.
    """

    @classmethod
    def for_job(cls, job: Any, **kwargs: Any) -> Checkpointer:
        """A checkpointer in ``job.checkpoint_dir`` with the job's ``keep_last``, ``async_save`` and
        ``every_steps``, storing ``job``; ``kwargs`` as for the constructor (``per_rank``, ``model=``...)."""
        c = job.checkpoint
        return cls(job.checkpoint_dir, keep_last=c.keep_last, async_save=c.async_save,
                   every_steps=c.every_steps, job=job, format=c.format, **kwargs)

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int = 3,
        async_save: bool = True,
        every_steps: int = 0,
        job: Any = None,
        per_rank: dict[str, Any] | None = None,
        best_mode: str = "max",
        format: str = "auto",
        **objects: Any,
    ) -> None:
        from ..wrap import unwrap

        self.directory = Path(directory)
        self.keep_last = keep_last
        self.async_save = async_save
        self.every_steps = every_steps
        self.job = job
        self.per_rank = dict(per_rank or {})
        self.objects = {k: (unwrap(v) if k == "model" else v) for k, v in objects.items()}
        self.best_mode = best_mode
        if format not in ("auto", "full", "sharded"):
            raise ValueError(f"format: expected auto, full or sharded, got {format!r}")
        fsdp = any(is_fsdp(o) for o in self.objects.values())
        if fsdp and format == "full":
            raise CheckpointError("format='full' needs the whole model on one rank, which FSDP avoids\nHINT: "
                                  "format='sharded'; `launcher consolidate` writes one file from it")
        #: One folder written by every rank (torch.distributed.checkpoint), instead of one file by rank 0.
        self.sharded = format == "sharded" or (format == "auto" and fsdp)
        self._group = sharded.writer_group(job) if self.sharded else None
        self._saves = 0  # sharded saves so far: the same count on every rank
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        # Both threads start here, before the training loop forks DataLoader workers (see fsync_thread).
        self._pool.submit(int).result()
        fsync_thread()
        self._pending: concurrent.futures.Future[Path] | None = None
        self._pending_path: Path | None = None
        _LIVE.add(self)
        self._stage = Staging(copy=async_save)
        self.last_saved: Path | None = None
        self._last_counters: tuple[int, int] | None = None  # (step, epoch) of the newest checkpoint
        self._hyper = compat.hyperparameters(self.objects)  # what the optimizers were built with, this run
        if dist.is_main_process():
            self.directory.mkdir(parents=True, exist_ok=True)
            for p in remove_stale_temp_files(self.directory):
                _log(f"[launcher] removed {p.name}, left by a save that was killed half-way")

    # ----------------------------------------------------------------------------------------- saving

    def step(self, state: TrainState, metric: float | None = None) -> None:
        """*Collective.* Call once per optimizer step, after counting it in ``state.step``.

        Notes the step (error messages name it; collectives switch to ``distributed.timeout_s``), saves every
        ``every_steps`` steps, and when SLURM asked the job to stop (preemption, time limit) saves and exits
        for the requeue (see :meth:`stop_if_requested`).
        """
        dist.note_step(state.step)
        if self.every_steps > 0 and state.step % self.every_steps == 0:
            self.save(state, metric)
        self.stop_if_requested(state)

    def finish(self, state: TrainState, metric: float | None = None) -> Path | None:
        """*Collective.* Save the final state, the data position included, and wait until it is on disk.
        Nothing is written when ``state`` is already the last checkpoint's.

        A run stopped by ``max_steps`` in the middle of an epoch is resumed from here when ``max_steps`` is
        raised: without the position, the epoch was replayed from its start (samples trained twice)."""
        path = None
        if self._last_counters != (state.step, state.epoch):
            path = self.save(state, metric)
        self.close()
        return path

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
        if self.sharded:
            return self._save_sharded(state, metric, mine, is_best)
        ranks = dist.all_gather_object(mine)
        path = self.directory / f"step_{state.step:08d}.pt"
        if dist.is_main_process():
            payload = {**self._header(state, metric), "ranks": ranks}
            payload.update({k: v.state_dict() for k, v in self.objects.items()})
            self.wait()  # at most one write in flight, and it has let go of the staging buffers
            payload = self._stage(payload)
            if self.async_save:
                self._pending_path = path
                self._pending = self._pool.submit(self._write, path, payload, is_best)
            else:
                self._write(path, payload, is_best)
        self.last_saved = path
        self._last_counters = (state.step, state.epoch)
        return path

    def _header(self, state: TrainState, metric: float | None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": state.step,
            "epoch": state.epoch,
            "best_metric": state.best_metric,
            "metric": metric,
            "world_size": dist.get_world_size(),
            "job": compat.job_dict(self.job),
            "hyperparameters": self._hyper,
            "versions": {"torch": str(torch.__version__), "python": platform.python_version(),
                         "launcher": _launcher_version()},
            "time": time.time(),
        }

    def _save_sharded(self, state: TrainState, metric: float | None, mine: dict[str, Any],
                      is_best: bool) -> Path:
        """Every rank writes its shards, its RNG and data position (see :mod:`.sharded`)."""
        kinds = states.kinds(self.objects)
        rest, tensors = sharded.split(states.state_dicts(self.objects, kinds))
        header = None
        if dist.is_main_process():
            header = {**self._header(state, metric),
                      "objects": {k: {"kind": kinds[k], "rest": rest[k]} for k in self.objects}}
        path = self.directory / f"step_{state.step:08d}{sharded.SUFFIX}"
        self._saves += 1
        self.wait()
        staged = self._stage(tensors)
        if self.async_save:
            self._pending_path = path
            self._pending = self._pool.submit(self._write_sharded, path, staged, header, mine, is_best,
                                              self._saves)
        else:
            self._write_sharded(path, staged, header, mine, is_best, self._saves)
        self.last_saved = path
        self._last_counters = (state.step, state.epoch)
        return path

    def _write_sharded(self, path: Path, tensors: dict[str, Any], header: dict[str, Any] | None,
                       mine: dict[str, Any], is_best: bool, seq: int) -> Path:
        self._make_directory_again()
        manifest = sharded.write(path, tensors, header, mine, self._group, seq)
        if manifest is not None:
            assert header is not None
            manifest.update(step=header["step"], epoch=header["epoch"], metric=header["metric"])
            self._finish_write(path, manifest, is_best)
        return path

    def _finish_write(self, path: Path, manifest: dict[str, Any], is_best: bool) -> None:
        """The manifest last: a checkpoint without one was never finished."""
        atomic_write_bytes(path.with_suffix(".json"), json.dumps(manifest).encode())
        atomic_write_bytes(self.directory / "latest", path.name.encode())
        if is_best:
            atomic_write_bytes(self.directory / "best", path.name.encode())
        self._prune(path)

    def _make_directory_again(self) -> None:
        # The run directory may have been removed under the job (rm -rf by mistake): the job goes on and its
        # next checkpoint lands, instead of failing at the save (or at finish(), losing the whole run).
        if not self.directory.is_dir():
            self.directory.mkdir(parents=True, exist_ok=True)
            _log(f"[launcher] {self.directory} was removed while the job ran: made again")

    def _write(self, path: Path, payload: dict[str, Any], is_best: bool) -> Path:
        self._make_directory_again()
        digest = atomic_write_bytes(path, obj=payload)
        manifest = {"file": path.name, "crc32": digest, "bytes": path.stat().st_size, "step": payload["step"],
                    "epoch": payload["epoch"], "metric": payload["metric"]}
        self._finish_write(path, manifest, is_best)
        return path

    def _prune(self, written: Path) -> None:
        """Keep the newest ``keep_last`` checkpoints and the best one; never the one just written. Files that
        did not verify were moved to ``refused/`` at resume, so they take no place here."""
        best = (self.directory / "best").read_text().strip() if (self.directory / "best").exists() else None
        for _, p in list_checkpoints(self.directory)[self.keep_last :]:
            if p.name != best and p != written:
                # The manifest first: never a manifest without its file.
                p.with_suffix(".json").unlink(missing_ok=True)
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    def finish_write_in_flight(self, deadline: float, say: Any = print) -> None:
        """Wait until ``deadline`` (``time.monotonic()``) for the background write, saying so; its error
        is said, not raised (see :func:`finish_writes_in_flight`)."""
        pending, path = self._pending, self._pending_path
        if pending is None or pending.done():
            return
        name = path.name if path is not None else "a checkpoint"
        bound_s = max(0.0, deadline - time.monotonic())
        say(f"[launcher] stopping: waiting for the checkpoint write in flight ({name}), at most "
            f"{bound_s:.0f} s")
        try:
            pending.result(timeout=bound_s)
            say(f"[launcher] {name} is on disk")
        except concurrent.futures.TimeoutError:
            say(f"[launcher] {name} was not written within {bound_s:.0f} s: abandoned (the previous "
                "checkpoint stays; distributed.stop_grace_s gives a stop more time)")
        except Exception as e:  # noqa: BLE001 - the stop goes on; the write's error is said
            say(f"[launcher] {name} could not be written: {e}")

    def wait(self) -> None:
        """Block until the background write (if any) is on disk; re-raises its error."""
        pending = self._pending
        if pending is not None:
            try:
                pending.result()
            finally:  # an interrupted wait leaves the write in flight, for a stop to finish
                if pending.done():
                    self._pending = None

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

    def resume(self, resume: str | None = None) -> TrainState:
        """*Collective.* Restore the newest valid checkpoint (``auto``), a given file, or nothing (``never``).

        ``resume`` defaults to the job's ``checkpoint.resume`` (``auto`` without a job). Returns the
        :class:`TrainState` to continue from (a fresh one when nothing was restored).
        """
        if resume is None:
            resume = self.job.checkpoint.resume if self.job is not None else "auto"
        found: tuple[Path, dict[str, Any]] | None = None
        refused: list[tuple[Path, str]] = []
        if resume == "auto":
            found, refused = scan(self.directory, log=_log)
        elif resume != "never":
            found = (Path(resume), load_file(resume))
        # Every rank looked at the same files; make sure they agree before anyone restores anything.
        names = dist.all_gather_object(str(found[0]) if found else None)
        if len(set(names)) != 1:
            raise CheckpointError(f"ranks disagree on the checkpoint to resume from: {names}")
        if found is None and refused:
            raise CheckpointError(
                f"{self.directory}: checkpoints are there but none is valid; not starting from scratch "
                f"silently:\n  {describe_refusals(refused)}\nHINT: checkpoint.resume=never starts over (the "
                "files stay), or checkpoint.resume=PATH picks one")
        dist.barrier()  # every rank has read what it needed before rank 0 moves refused files aside
        if dist.is_main_process():
            for p, reason in refused:
                move_aside(p, reason)
                _log(f"[launcher] moved {p.name} to {p.parent.name}/refused/ ({reason})")
            best = self.directory / "best"
            if best.exists() and not (self.directory / best.read_text().strip()).exists():
                best.unlink()  # it named a refused file
        if found is None:
            return TrainState()
        path, data = found
        restore_data = compat.check_compatible(self.job, path, data, _log)
        missing = [k for k in self.objects if k not in (data["objects"] if data.get("sharded") else data)]
        if missing:
            raise CheckpointError(f"{path}: has no '{missing[0]}' state\nHINT: register the same objects as "
                                  "when saving")
        if data.get("sharded"):
            states.load_sharded(self.objects, path, data, self._group)
        elif any(is_fsdp(o) for o in self.objects.values()):
            states.load_full_into_fsdp(self.objects, data)
        else:
            for k, obj in self.objects.items():
                obj.load_state_dict(data[k])
        compat.apply_changed_hyperparameters(self._hyper, self.objects, data.get("hyperparameters") or {},
                                             _log)
        rank = dist.get_rank()
        mine = data["ranks"][rank] if rank < len(data["ranks"]) else None
        if mine is not None:
            # A rank that existed in the saved run takes its generators back, even on another topology; a new
            # rank keeps the fresh seeding a new run gives it (seed + rank).
            set_rng_state(mine["rng"])
        for k, obj in self.per_rank.items():
            if restore_data:
                if mine is not None and k in mine:
                    obj.load_state_dict(mine[k])
            elif hasattr(obj, "load_state_dict_from_ranks"):  # the sharded loader: the epoch goes on
                how = obj.load_state_dict_from_ranks([r.get(k) for r in data["ranks"]])
                if how and dist.is_main_process():
                    _log(f"[launcher] {k}: {how}")
        state = TrainState(
            step=int(data["step"]), epoch=int(data["epoch"]), best_metric=data.get("best_metric")
        )
        self.last_saved, self._last_counters = path, (state.step, state.epoch)
        _log(f"[launcher] resumed from {path} (step {state.step}, epoch {state.epoch})")
        return state


def _launcher_version() -> str:
    from .. import __version__

    return __version__


def _log(msg: str) -> None:
    if dist.is_main_process():
        print(msg, flush=True)
