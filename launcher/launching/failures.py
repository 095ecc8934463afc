"""What went wrong, in the launcher's words: the first failure of a run, a stalled rank, a rank that left
early, a failure whose report was lost (a full disk).

Runs in the ``launcher`` process, on what torch elastic's agent saw and what the ranks left in the heartbeat
folder (:mod:`launcher.dist`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from .. import internals
from ..errors import Failure


def of_attempt(agent: Any, reported: dict[int, ProcessFailure]) -> list[Failure]:
    """Every failed rank of the agent's last attempt, in the launcher's terms (see :func:`all_failures`)."""
    return [failure(rank, pf) for rank, pf in all_failures(agent, reported).items()]


def all_failures(agent: Any, reported: dict[int, ProcessFailure]) -> dict[int, ProcessFailure]:
    """The failure the agent reports, plus every other rank of the last attempt that wrote an error file.

    The agent reports the first failed rank it notices; when one rank's error makes a peer fail a moment
    later (a closed connection), that may be the peer. Each rank that raised wrote its traceback and time, so
    :class:`RankFailure` can still name the root cause.
    """
    failures = dict(reported)  # by global rank
    error_files, processes = internals.agent_processes(agent)  # by local rank
    to_global = {w.local_rank: w.global_rank for w in agent.get_worker_group().workers}
    for local, path in error_files.items():
        rank = to_global.get(local, local)
        if rank not in failures and os.path.isfile(path):
            # it raised
            failures[rank] = ProcessFailure(local_rank=local, pid=-1, exitcode=1, error_file=path)
    # Forked ranks (multiprocessing's process context) report one failure: a rank killed by a signal (OOM
    # killer, kill -9) wrote no error file, and its peer's "connection reset" may be the one reported.
    for local, proc in enumerate(processes):
        rank = to_global.get(local, local)
        if rank not in failures and (proc.exitcode or 0) < 0:
            failures[rank] = ProcessFailure(local_rank=local, pid=proc.pid, exitcode=proc.exitcode,
                                            error_file=error_files.get(local, ""))
    return failures


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (R running, S sleeping, D disk wait, T stopped, Z zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


_STATES = {"T": "stopped (SIGSTOP or a debugger)", "t": "stopped by a debugger",
           "D": "in uninterruptible I/O (a hung file system?)"}
#: How a collective's timeout reads in an exception message (Gloo, NCCL's watchdog, the c10d store).
_TIMEOUT = ("Timed out waiting", "collective operation timeout", "Socket Timeout", "timed out after")


def _timed_out(f: Failure) -> bool:
    """The rank's exception says one of its collectives timed out (code lines of the traceback, which are
    indented, do not count; nor does a DataLoader's own wait)."""
    said = [line for line in f.traceback.splitlines() if line and not line[0].isspace()] + [f.message]
    return any(t in line and "DataLoader" not in line for line in said for t in _TIMEOUT)


def left_early(failures: list[Failure], heartbeats: Path) -> str:
    """When a rank's work ended without an error while its peers still ran (a ``return`` or ``sys.exit(0)``
    in one rank only): that rank, which the failures of its peers' collectives would otherwise hide."""
    causes = {f.rank for f in failures if not f.secondary}
    ended = {}
    for path in heartbeats.glob("ended-rank*"):
        with contextlib.suppress(ValueError, OSError):
            ended[int(path.name[len("ended-rank"):])] = path.read_text().strip()
    early = sorted(r for r in ended if r not in causes)
    if not early or causes - set(ended):  # a rank that failed on its own is the cause
        return ""
    if {f.rank for f in failures} <= set(ended):  # every rank got to the end
        return ""
    rank = early[0]
    when = f"after step {ended[rank]}" if ended[rank] else "before its first step"
    return (f"rank {rank} ended its work without an error {when} (it returned or exited with code 0) while "
            "its peers still ran, and their collectives failed")


def stall_report(failures: list[Failure], heartbeats: Path, states: dict[int, str]) -> str:
    """When a collective timed out: which rank stopped making progress, its last step and what it was doing.

    The rank whose wait expired is the one reporting the timeout; the one behind is the rank with the oldest
    heartbeat (``launcher.note_step`` writes one a second), or a rank the kernel shows stopped.
    """
    timed_out = {f.rank for f in failures if _timed_out(f)}
    if not timed_out:
        return ""
    beats: dict[int, tuple[int, float]] = {}
    for path in heartbeats.glob("rank*"):
        with contextlib.suppress(ValueError, OSError):
            words = path.read_text().split()
            beats[int(path.name[4:])] = (int(words[0]), float(words[1]))
    ranks = sorted(set(states) | set(beats))
    candidates = [r for r in ranks if r not in timed_out] or ranks
    stopped = [r for r in candidates if states.get(r) in _STATES]
    if stopped:
        behind = stopped[0]
    elif any(r in beats for r in candidates):
        behind = min(candidates, key=lambda r: beats.get(r, (-1, 0.0)))
    else:
        return ""
    what = []
    if behind in beats:
        step, at = beats[behind]
        what.append(f"last step {step}, {time.time() - at:.0f} s before this report")
    else:
        what.append("before its first step")
    if states.get(behind) in _STATES:
        what.append(f"process {_STATES[states[behind]]}")
    return f"rank {behind} stopped making progress ({'; '.join(what)}), and its peers' collectives timed out"


def unreadable_reports(agent: Any, log_dir: Path) -> list[Failure]:
    """The ranks of the last attempt whose error file is there but not JSON (the rank failed, and its report
    could not be written): each named, with the free space left where the run directory is."""
    error_files, _ = internals.agent_processes(agent)
    to_global = {w.local_rank: w.global_rank for w in agent.get_worker_group().workers}
    try:
        free = shutil.disk_usage(log_dir).free
    except OSError:
        free = -1
    full = 0 <= free < (1 << 20)
    why = (f"no space left on the device that holds the run directory ({log_dir}: {free >> 10} KiB free)\n"
           "HINT: free space there, or point output_dir at a larger file system") if full else \
        f"its error report {{}} is unreadable (the run directory's file system: {log_dir})"
    failures = []
    for local, path in sorted(error_files.items()):
        try:
            with open(path) as f:
                json.load(f)
            continue
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            pass
        rank = to_global.get(local, local)
        message = f"rank {rank} failed, and its traceback was lost: {why.format(path)}"
        failures.append(Failure(rank=rank, host=socket.gethostname(), exitcode=1, signal=None,
                                timestamp=int(time.time()), message=message, traceback=""))
    return failures


def failure(rank: int, pf: ProcessFailure) -> Failure:
    message, tb = "", ""
    data = pf.message
    if isinstance(data, dict):
        message = str(data.get("message", ""))
        tb = str(data.get("extraInfo", {}).get("py_callstack", ""))
    elif data:
        message = str(data)
    signame = None
    if pf.exitcode < 0:
        try:
            signame = signal.Signals(-pf.exitcode).name
        except ValueError:
            signame = str(-pf.exitcode)
    _keep_in_log(pf, tb)
    return Failure(
        rank=rank,
        host=socket.gethostname(),
        exitcode=pf.exitcode,
        signal=signame,
        timestamp=pf.timestamp,
        message=message,
        traceback=tb,
        log_tail=log_tail(pf),
    )


_KEPT = "[launcher] the traceback above, from this rank's error report"


def _keep_in_log(pf: ProcessFailure, tb: str) -> None:
    """A rank's traceback goes to its error report (torch elastic's), not to its stderr: append it to the
    rank's ``stderr.log`` too, once, where a user reading that rank's log looks for it (written after the
    rank ended, so the console, which tails these logs, does not show it twice)."""
    if not tb or not pf.error_file:
        return
    log = Path(pf.error_file).parent / "stderr.log"
    with contextlib.suppress(OSError):
        if log.is_file() and _KEPT not in log.read_text(errors="replace")[-(len(tb) + 200):]:
            with open(log, "a") as f:
                f.write(f"{tb.rstrip()}\n{_KEPT}\n")


def log_tail(pf: ProcessFailure, lines: int = 30) -> str:
    if not pf.error_file:
        return ""
    stderr = Path(pf.error_file).parent / "stderr.log"
    try:
        return "\n".join(stderr.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
