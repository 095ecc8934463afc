"""Process-group set-up and rank helpers that answer sensibly when nothing is distributed.

Training code never branches on "is DDP on?": ``get_rank()`` is 0, ``get_world_size()`` is 1, ``barrier()`` is
a no-op and the object collectives return the single-process answer when no process group exists. Functions
marked *collective* must be called by all ranks together.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import time
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from . import internals
from .env import ClusterEnvironment

T = TypeVar("T")

_state: dict[str, Any] = {
    "step": None,
    "step_timeout_s": None,
    "startup_timeout_s": None,
    "first_step_done": False,
}


def is_initialized() -> bool:
    """True when a default process group exists."""
    return tdist.is_available() and tdist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 when not distributed."""
    return tdist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks, 1 when not distributed."""
    return tdist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    """Rank on this node (from the launcher's environment), 0 when not distributed."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) if is_initialized() else 0


def is_main_process() -> bool:
    """True on global rank 0 (and when not distributed)."""
    return get_rank() == 0


def get_device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` on NCCL runs, else CPU."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_backend(backend: str, local_world_size: int) -> str:
    """``auto`` -> NCCL when every local rank gets its own CUDA device, else Gloo."""
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        return "nccl"
    return "gloo"


def attempt_store(addr: str, port: int, world_size: int, timeout_s: float) -> Any:
    """In an attempt after a restart by the elastic agent (``launcher run --max-restarts``): the agent's
    store, seen through a namespace of this attempt's own; None in a first attempt or without it.

    The agent's store outlives a restart (ours is kept open on purpose), and torch's ``env://`` uses it
    without a namespace: Gloo read the dead ranks' addresses of the previous attempt and failed to connect,
    or waited for them.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = tdist.TCPStore(addr, port, world_size, is_master=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    return tdist.PrefixStore(f"launcher/attempt_{restart}", store)


def init(env: ClusterEnvironment, backend: str, startup_timeout_s: float, step_timeout_s: float) -> str:
    """Create the default process group for ``env``; returns the backend used.

    The CUDA device is set before ``init_process_group`` (NCCL binds to the current device). Collectives use
    ``startup_timeout_s`` until :func:`note_step` reports the first completed step, then ``step_timeout_s``.
    """
    backend = resolve_backend(backend, env.local_world_size())
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank())
    kwargs: dict[str, Any] = {}
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        # srun step or another launcher that does not export MASTER_ADDR/PORT: say it explicitly.
        kwargs["init_method"] = f"tcp://{env.master_addr()}:{env.master_port()}"
    elif (store := attempt_store(env.master_addr(), env.master_port(), env.world_size(),
                                 startup_timeout_s)) is not None:
        kwargs["store"] = store
    tdist.init_process_group(
        backend=backend,
        rank=env.rank(),
        world_size=env.world_size(),
        timeout=datetime.timedelta(seconds=startup_timeout_s),
        **kwargs,
    )
    _state.update(step=None, step_timeout_s=step_timeout_s, startup_timeout_s=startup_timeout_s,
                  first_step_done=False)
    return backend


def teardown() -> None:
    """Destroy every process group (safe to call twice)."""
    _gloo_group.cache_clear()
    if is_initialized():
        tdist.destroy_process_group()


def note_step(step: int) -> None:
    """Tell the launcher a training step completed (for error messages and timeouts).

    After the first step the collective timeout drops from the start-up value to ``distributed.timeout_s``.
    Not collective; cheap enough to call every step.
    """
    _state["step"] = step
    _heartbeat(step)
    if _state.get("pause"):  # Ctrl-Z: wait here, where no collective is in flight (launcher.rank.pause)
        from .rank import pause

        if pause.hold(step):
            _state["pause"] = False
    if not _state["first_step_done"] and is_initialized() and _state["step_timeout_s"]:
        _state["first_step_done"] = True
        timeout = datetime.timedelta(seconds=_state["step_timeout_s"])
        internals.set_group_timeout(timeout)
        if _gloo_group.cache_info().currsize:
            internals.set_group_timeout(timeout, _gloo_group())


#: Set by ``launcher run`` for the ranks it spawns: a folder where each rank leaves its last step and when.
HEARTBEAT_ENV = "LAUNCHER_HEARTBEAT_DIR"
_beat: dict[str, Any] = {"fd": None, "pid": None, "last": 0.0}
#: Cumulated in this rank: seconds waiting for a batch (the launcher's loader), seconds with a gradient
#: all-reduce in flight (DDP), samples the loader gave. The launcher turns them into figures per window.
_waits: dict[str, float] = {"data": 0.0, "sync": 0.0, "samples": 0, "sync_end": 0.0}
#: Known once: the FLOPs of one sample's step and the device's peak FLOP/s (:mod:`launcher.rank.figures`),
#: the run's last step (:func:`set_total_steps`); 0: not known.
_known: dict[str, float] = {"flops": 0.0, "peak": 0.0, "total": 0}


def set_total_steps(total: int | None) -> None:
    """The run's last step, when you know it: the launcher's progress line then shows an ETA. Not
    collective; call it on any rank (each rank's heartbeat carries it), again if it changes."""
    _known["total"] = total or 0


def note_flops(per_sample: float, peak: float) -> None:
    """FLOPs of one sample's training step, and the device's peak FLOP/s (0: not known), for the MFU."""
    _known.update(flops=per_sample, peak=peak)


def request_pause() -> None:
    """The launcher asked this rank to pause at its next step boundary (a signal handler calls this)."""
    _state["pause"] = True


def note_data_wait(seconds: float, samples: int) -> None:
    """The loader waited ``seconds`` for a batch of ``samples`` (not collective; a few additions)."""
    _waits["data"] += seconds
    _waits["samples"] += samples


def note_sync(started: float, ended: float) -> None:
    """A gradient all-reduce ran from ``started`` to ``ended`` (``time.perf_counter()``); overlapping ones
    count once."""
    begin = max(started, _waits["sync_end"])
    if ended > begin:
        _waits["sync"] += ended - begin
    _waits["sync_end"] = max(_waits["sync_end"], ended)


def _heartbeat(step: int) -> None:
    """At most once a second: ``"STEP TIME DATA_S SYNC_S SAMPLES FLOPS PEAK TOTAL HOST"`` into this rank's
    heartbeat file (one ``pwrite``), so that the launcher can tell, when a collective times out, which rank
    stopped making progress, and, while the job runs, how fast it goes and which rank holds the others
    back."""
    folder = os.environ.get(HEARTBEAT_ENV)
    now = time.time()
    if not folder or now - _beat["last"] < 1.0:
        return
    _beat["last"] = now
    if _beat["pid"] != os.getpid():  # first beat of this process (a restarted rank is a new one)
        try:
            fd = os.open(os.path.join(folder, f"rank{get_rank()}"), os.O_WRONLY | os.O_CREAT, 0o600)
        except OSError:  # the folder went (its run directory removed; rank 0 done in place): a help only
            return
        _beat.update(pid=os.getpid(), fd=fd, host=socket.gethostname())
    w, k = _waits, _known
    os.pwrite(_beat["fd"], f"{step} {now:.3f} {w['data']:.4f} {w['sync']:.4f} {w['samples']:.0f} "
              f"{k['flops']:.6g} {k['peak']:.6g} {k['total']:.0f} {_beat['host']}".ljust(160).encode(), 0)


def note_ended() -> None:
    """This rank's work has ended without an error (the target returned, or exited with code 0): said in the
    heartbeat folder, so that a peer failing afterwards is not blamed for the rank that left early."""
    folder = os.environ.get(HEARTBEAT_ENV)
    step = _state["step"]
    if folder:
        with contextlib.suppress(OSError), open(os.path.join(folder, f"ended-rank{get_rank()}"), "w") as f:
            f.write("" if step is None else str(step))  # a note: a full disk must not fail a finished rank


def current_step() -> int | None:
    """The last step passed to :func:`note_step` (None before the first)."""
    return _state["step"]


def data_timeout_s() -> float:
    """How long a rank waits for one batch from its DataLoader workers: the job's start-up timeout (worker
    start-up is paid again at every epoch), or 600 s outside the launcher."""
    return _state["startup_timeout_s"] or 600.0


@functools.lru_cache(maxsize=1)
def _gloo_group() -> Any:
    """A gloo group over all ranks for object collectives (never NCCL: they pickle on the CPU)."""
    if tdist.get_backend() == "gloo":
        return tdist.group.WORLD
    return tdist.new_group(backend="gloo")


def barrier() -> None:
    """*Collective.* Wait for all ranks (no-op when not distributed), bounded by the collective timeout.

    A plain barrier on the object group: its timeout is the group's (start-up, then
    ``distributed.timeout_s``).
    Not ``monitored_barrier``: when a peer has died it logs "Rank N failed to pass monitoredBarrier" from C++
    before the launcher can report the real cause, and its own default timeout is 30 minutes.
    """
    if not is_initialized() or get_world_size() == 1:
        return
    tdist.barrier(group=_gloo_group() if tdist.get_backend() == "gloo" else None)


def all_gather_object(obj: T) -> list[T]:
    """*Collective.* Every rank's ``obj`` in rank order (``[obj]`` when not distributed)."""
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * get_world_size()
    tdist.all_gather_object(out, obj, group=_gloo_group())
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """*Collective.* Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized() or get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, group=_gloo_group())
    return box[0]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """*Collective.* Element-wise sum over ranks of a tensor on this rank's device (a new tensor)."""
    out = values.clone()
    if is_initialized() and get_world_size() > 1:
        tdist.all_reduce(out)
    return out


def any_rank(flag: bool) -> bool:
    """*Collective.* True when ``flag`` is true on at least one rank (one tiny all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=get_device())
    return bool(all_reduce_sum(t).item() > 0)


def autocast_dtype(amp: str, device: Any) -> torch.dtype | None:
    """The ``torch.autocast`` dtype for ``amp`` (``off``, ``bf16``, ``fp16``) on ``device``; None on CPU (full
    precision), so a loop can write ``torch.autocast(dev.type, dtype, enabled=dtype is not None)``."""
    if torch.device(device).type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def log(message: str) -> None:
    """Print ``message`` on rank 0 only (flushed: rank logs are tailed to the console). Not collective."""
    if is_main_process():
        print(message, flush=True)
