"""Stop requests in a SLURM job: preemption, time limit and external requeue, handled at a step boundary.

SLURM (through submitit's ``--signal=USR2@delay``) sends USR2 before the time limit or on preemption, and
SIGTERM when the job is requeued from outside (``scontrol requeue``), preempted or cancelled. A handler here
only sets a flag; nothing is saved inside a signal handler. At each step boundary every rank calls
:func:`should_stop` (one tiny all-reduce, so all ranks agree even when only some were signalled); when it is
true the caller saves a checkpoint and calls :func:`exit_for_requeue`: rank 0 asks SLURM to requeue the job
after USR2 (SLURM requeues by itself after an external requeue or a preemption; a ``scancel`` stays
cancelled, with the checkpoint to resume from), and every rank exits with :data:`EXIT_REQUEUE`.

Handlers are installed only inside SLURM jobs (:func:`install`, called by the worker), so elsewhere
:func:`should_stop` returns False without any communication.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from types import FrameType
from typing import NoReturn

import torch

from .. import dist
from ..errors import StopForRequeue

#: The signals that ask for a stop, in the order of the flags exchanged by :func:`should_stop`.
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_state: dict[str, object] = {"installed": False, "received": set(), "agreed": (), "max_requeues": 0}


def _handler(signum: int, frame: FrameType | None) -> None:
    _state["received"].add(signum)  # type: ignore[attr-defined]


def install(max_requeues: int) -> None:
    """Catch USR2 and SIGTERM (replacing submitit's handlers) and remember the requeue limit."""
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)  # SLURM sends it with SIGTERM; submitit's handler only logs
    _state.update(installed=True, received=set(), agreed=(), max_requeues=max_requeues)


def uninstall() -> None:
    """Restore default handlers (tests, and the end of a rank's work)."""
    if _state["installed"]:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    _state.update(installed=False, received=set(), agreed=())


def installed() -> bool:
    """True inside a SLURM job's rank, once the worker installed the handlers."""
    return bool(_state["installed"])


def received() -> set[int]:
    """Signals this rank received (not collective)."""
    return set(_state["received"])  # type: ignore[call-overload]


def should_stop() -> bool:
    """*Collective* inside SLURM jobs: True when any rank was asked to stop; call it at every step boundary.

    Returns False at once (no communication) outside SLURM jobs.
    """
    if not _state["installed"]:
        return False
    mine = received()
    flags = torch.tensor([float(s in mine) for s in SIGNALS], device=dist.get_device())
    total = dist.all_reduce_sum(flags)
    agreed = tuple(sig for sig, n in zip(SIGNALS, total.tolist()) if n > 0)
    _state["agreed"] = agreed
    return bool(agreed)


def exit_for_requeue() -> NoReturn:
    """*Collective.* After the checkpoint is on disk: requeue (rank 0, after USR2) and exit with code 3."""
    dist.barrier()  # nobody leaves before every rank has finished saving
    agreed: tuple[int, ...] = _state["agreed"]  # type: ignore[assignment]
    names = "+".join(signal.Signals(s).name for s in agreed) or "a stop request"
    if dist.is_main_process():
        if signal.SIGUSR2 in agreed:
            _requeue(names)
        else:
            print(f"[launcher] {names}: state saved; SLURM requeues a preempted or requeued job by itself "
                  "(after scancel, submit again to resume)", file=sys.stderr, flush=True)
    raise StopForRequeue()


def _requeue(reason: str) -> None:
    job_id = os.environ.get("SLURM_JOB_ID")  # unique per array task too
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    limit = int(_state["max_requeues"])  # type: ignore[call-overload]
    if not job_id:
        print(f"[launcher] {reason}: state saved; not in a SLURM job, nothing to requeue", file=sys.stderr)
        return
    if restarts >= limit:
        print(
            f"[launcher] {reason}: state saved; NOT requeued: job {job_id} was already requeued {restarts} "
            f"time(s) (slurm.max_requeues={limit})\nHINT: submit the job again to resume from the "
            "checkpoint, or raise slurm.max_requeues",
            file=sys.stderr,
            flush=True,
        )
        return
    r = subprocess.run(
        ["scontrol", "requeue", job_id], check=False, capture_output=True, text=True, timeout=60
    )
    if r.returncode != 0:
        print(f"[launcher] {reason}: state saved; `scontrol requeue {job_id}` failed: {r.stderr.strip()}\n"
              "HINT: submit the job again to resume from the checkpoint", file=sys.stderr, flush=True)
    else:
        print(f"[launcher] {reason}: state saved; requeued job {job_id} ({restarts + 1}/{limit})",
              file=sys.stderr, flush=True)
