"""Stop requests in a SLURM job: preemption, time limit and external requeue, handled at a step boundary.

SLURM (through submitit's ``--signal=USR2@delay``) sends USR2 before the time limit or on preemption, and
SIGTERM when the job is requeued from outside (``scontrol requeue``), preempted or cancelled. A handler here
only sets a flag; nothing is saved inside a signal handler. At each step boundary every rank calls
:func:`should_stop` (one tiny all-reduce, so all ranks agree even when only some were signalled); when it is
true the caller saves a checkpoint and calls :func:`exit_for_requeue`, and every rank exits with
:data:`EXIT_REQUEUE`. Rank 0 decides what happens to the job:

* preempted (``scontrol show job`` has a ``PreemptTime``, whatever the signal): it requeues the job itself.
  SLURM requeues a preempted job only when its grace time runs out, and a job that saved and exited before
  that simply ended (FAILED), never to resume. Preemptions do not count against ``slurm.max_requeues``;
* USR2 and not preempted (the time limit is near): it requeues the job while fewer than ``max_requeues``
  time-limit requeues happened. ``launcher submit`` counts them in a ledger file beside the job's logs
  (``SLURM_RESTART_COUNT`` counts every requeue, preemptions and node failures too); without one (``srun``
  inside an allocation) that count is used;
* SIGTERM alone: an external ``scontrol requeue`` (SLURM requeues by itself) or ``scancel`` (the job stays
  cancelled, with the checkpoint to resume from): nothing to do.

Handlers are installed only inside SLURM jobs (:func:`install`, called by the worker), so elsewhere
:func:`should_stop` returns False without any communication.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import torch

from .. import dist
from ..env import REQUEUE_LEDGER_ENV
from ..errors import StopForRequeue

#: The signals that ask for a stop, in the order of the flags exchanged by :func:`should_stop`.
SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

_state: dict[str, object] = {"installed": False, "received": set(), "agreed": (), "max_requeues": 0,
                             "leaving": False}


def _handler(signum: int, frame: FrameType | None) -> None:
    _state["received"].add(signum)  # type: ignore[attr-defined]


def _set_handlers(handler: Any) -> None:
    for sig in SIGNALS:
        signal.signal(sig, handler)


def install(max_requeues: int) -> None:
    """Catch USR2 and SIGTERM (replacing submitit's handlers) and remember the requeue limit."""
    _set_handlers(_handler)
    signal.signal(signal.SIGCONT, signal.SIG_DFL)  # SLURM sends it with SIGTERM; submitit's handler only logs
    _state.update(installed=True, received=set(), agreed=(), max_requeues=max_requeues, leaving=False)


def uninstall(leaving: bool = False) -> None:
    """Restore default handlers (tests, and the end of a rank's work in a process that goes on).

    A process that exits once its rank's work has ended (``leaving``, or after :func:`exit_for_requeue`)
    ignores the stop signals instead: srun ends the step with SIGTERM as soon as one task exits
    (``--kill-on-bad-exit``), and a rank still closing its process group would die of it, cut short, with
    exit code 15 for the job instead of the rank's own."""
    if _state["installed"]:
        _set_handlers(signal.SIG_IGN if leaving or _state["leaving"] else signal.SIG_DFL)
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
        _decide(names, agreed)
    # Nor before rank 0 has requeued the job: srun (--kill-on-bad-exit) ends the step when the first task
    # exits with code 3. From here on SLURM's SIGTERM for that end, or for the requeue, is ignored (see
    # uninstall).
    dist.barrier()
    _state["leaving"] = True
    _set_handlers(signal.SIG_IGN)
    raise StopForRequeue()


def _say(message: str) -> None:
    print(f"[launcher] {message}", file=sys.stderr, flush=True)


def _decide(reason: str, agreed: tuple[int, ...]) -> None:
    job_id = os.environ.get("SLURM_JOB_ID")  # unique per array task too
    if not job_id:
        _say(f"{reason}: state saved; not in a SLURM job, nothing to requeue")
    elif preempted(job_id):
        if _requeue(f"{reason} (preempted)", job_id):
            _say(f"{reason}: preempted; state saved; requeued job {job_id} (preemptions do not count "
                 "against slurm.max_requeues)")
    elif signal.SIGUSR2 in agreed:
        _time_limit(reason, job_id)
    else:
        _say(f"{reason}: state saved; SLURM requeues a job requeued from outside by itself (after scancel, "
             "submit again to resume)")


def preempted(job_id: str, timeout_s: float = 30.0) -> bool:
    """True when SLURM is preempting the job (``PreemptTime`` set in ``scontrol show job``).

    scontrol is asked again, once a second within ``timeout_s``, while it gets no answer (a busy controller
    times a call out): "no answer" is not "not preempted", and a preempted job taken for a time-limit stop
    was not requeued (seen once under load on the 3-node test cluster)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = subprocess.run(["scontrol", "show", "job", "-o", job_id], check=False, capture_output=True,
                               text=True, timeout=max(1.0, deadline - time.monotonic()))
            if r.returncode == 0:
                found = re.search(r"\bPreemptTime=(\S+)", r.stdout)
                return found is not None and found.group(1) not in ("None", "Unknown")
            why = (r.stderr or r.stdout).strip()
        except (OSError, subprocess.SubprocessError) as e:
            why = str(e)
        if time.monotonic() + 1 >= deadline:
            _say(f"could not ask SLURM whether job {job_id} is preempted ({why}): taken as not preempted")
            return False
        time.sleep(1)


def _time_limit(reason: str, job_id: str) -> None:
    limit = int(_state["max_requeues"])  # type: ignore[call-overload]
    ledger = os.environ.get(REQUEUE_LEDGER_ENV)
    if ledger:
        try:
            used = len(Path(ledger).read_text().splitlines())
        except FileNotFoundError:
            used = 0
    else:
        used = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if used >= limit:
        _say(f"{reason}: state saved; NOT requeued: job {job_id} was already requeued {used} time(s) for its "
             f"time limit (slurm.max_requeues={limit})\nHINT: submit the job again to resume from the "
             "checkpoint, or raise slurm.max_requeues")
        return
    if _requeue(reason, job_id):
        if ledger:
            with open(ledger, "a") as f:
                f.write(f"{job_id} {reason}\n")
        _say(f"{reason}: state saved; requeued job {job_id} ({used + 1}/{limit} for the time limit)")


def _requeue(reason: str, job_id: str) -> bool:
    try:
        r = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True,
                           timeout=60)
        said = "" if r.returncode == 0 else r.stderr.strip() or f"exit code {r.returncode}"
    except (OSError, subprocess.SubprocessError) as e:
        said = str(e)
    if said:
        _say(f"{reason}: state saved; `scontrol requeue {job_id}` failed: {said}\n"
             "HINT: submit the job again to resume from the checkpoint")
    return not said
