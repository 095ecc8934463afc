"""Where is every rank? Ask each for its stacks (:mod:`launcher.rank.stacks`) and read what they wrote.

Runs in the ``launcher`` process: for ``launcher stacks RUN_DIR`` (a job on this machine) and when a
collective timed out, to show where the rank that stopped making progress is.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from ..processes import alive as pid_alive
from ..processes import catches, parent_of
from ..spec import STACKS_SIGNAL as SIGNAL

#: A rank (its number) or a process of its (``(rank, name)``, name ``workerW`` or ``pidP``: see
#: :mod:`launcher.rank.stacks`).
Key = TypeVar("Key", bound=int | tuple[int, str])
AnyKey = int | tuple[int, str]
#: Longest wait for the dumps; a rank that has not written by then is named as such.
WAIT_S = 5.0


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "stacks"


def ranks_of(stacks: Path) -> dict[int, tuple[int, str]]:
    """``{rank: (pid, host)}`` from the ranks' ``rankN.pid`` files."""
    return {int(name[4:]): where for name, where in _pid_files(stacks).items() if name[4:].isdigit()}


def workers_of(stacks: Path) -> dict[int, dict[str, tuple[int, str]]]:
    """``{rank: {name: (pid, host)}}`` from the ``rankN-workerW.pid`` files of ``launcher.make_loader``'s
    workers (a later epoch's replace an earlier one's) and the ``rankN-pidP.pid`` of the rank's forked
    children, in that order."""
    out: dict[int, dict[str, tuple[int, str]]] = {}
    for name, where in _pid_files(stacks).items():
        if m := re.fullmatch(r"rank(\d+)-((?:worker|pid)\d+)", name):
            out.setdefault(int(m.group(1)), {})[m.group(2)] = where
    order = {r: sorted(w, key=lambda name: (name.startswith("pid"), int(re.sub(r"\D", "", name))))
             for r, w in out.items()}
    return {r: {name: out[r][name] for name in order[r]} for r in sorted(out)}


def label(name: str, dump: str, pid: bool = True) -> str:
    """What a process of a rank is, from its name (:func:`workers_of`) and what it dumped; with its pid
    (``pid``) when its name is one."""
    if name.startswith("worker"):
        return f"DataLoader worker {name[6:]}"
    kind = "DataLoader worker" if "in _worker_loop" in dump else "child process"
    return f"{kind} (pid {name[3:]})" if pid else kind


def _pid_files(stacks: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for p in stacks.glob("rank*.pid"):
        try:
            pid, host = p.read_text().split()
            out[p.name[:-4]] = (int(pid), host)
        except (OSError, ValueError):
            continue
    return dict(sorted(out.items()))


def _dump_file(stacks: Path, key: AnyKey) -> Path:
    return stacks / (f"rank{key}.txt" if isinstance(key, int) else f"rank{key[0]}-{key[1]}.txt")


def request(stacks: Path, pids: Mapping[Key, int]) -> dict[Key, int]:
    """Signal each process (``{key: pid}``, a key being a rank or ``(rank, name)``) for its stacks;
    returns the size of each one's dump file before, where its new dump starts (:func:`read_new`)."""
    sizes = {}
    for key, pid in pids.items():
        sizes[key] = _size(_dump_file(stacks, key))
        try:
            os.kill(pid, SIGNAL)
        except (ProcessLookupError, PermissionError):
            sizes.pop(key)
    return sizes


def ask(stacks: Path, ranks: Mapping[int, int]) -> dict[AnyKey, int]:
    """:func:`request` the stacks of ``ranks`` (``{rank: pid}``, this machine's) and of their live DataLoader
    workers and other children (keys ``(rank, name)``)."""
    return request(stacks, _with_workers(stacks, ranks))


def _with_workers(stacks: Path, ranks: Mapping[int, int]) -> dict[AnyKey, int]:
    """``{key: pid}`` of ``ranks`` and their live DataLoader workers, each rank followed by its workers."""
    pids: dict[AnyKey, int] = {}
    workers = _live_workers(stacks, ranks)
    for r, pid in ranks.items():
        pids[r] = pid
        pids.update({(r, w): p for w, p in workers.get(r, {}).items()})
    return pids


def read_new(stacks: Path, sizes: Mapping[Key, int], wait_s: float = WAIT_S) -> dict[Key, str]:
    """What each process wrote after ``sizes`` (``{key: dump}``, "" for one that wrote nothing), waiting up
    to ``wait_s`` for every one and until the dumps stop growing."""
    deadline = time.monotonic() + wait_s
    last: dict[Key, int] = {}
    while True:
        now = {r: _size(_dump_file(stacks, r)) for r in sizes}
        done = all(now[r] > sizes[r] for r in sizes) and now == last
        if done or time.monotonic() > deadline:
            break
        last = now
        time.sleep(0.1)
    out = {}
    for key, start in sizes.items():
        try:
            with open(_dump_file(stacks, key), errors="replace") as f:
                f.seek(start)
                out[key] = f.read()
        except OSError:
            out[key] = ""
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<fn>.+)$')
_PATHS = sysconfig.get_paths()
#: Frames from these folders are not the user's code: Python's, installed packages and scripts, the launcher.
_NOT_USER = tuple({_PATHS["stdlib"], _PATHS["purelib"], _PATHS["platlib"], _PATHS["scripts"],
                   str(Path(__file__).parents[1])})


def where(dump: str) -> str:
    """The innermost frame of the user's code in the main thread's stack of a faulthandler dump
    (``file:line in function``), else its innermost frame; "" when there is none."""
    frames = _main_frames(dump)
    user = [m for m in frames if not os.path.realpath(m["file"]).startswith(_NOT_USER)]
    if not frames:
        return ""
    pick = (user or frames)[0]
    return f"{pick['file']}:{pick['line']} in {pick['fn']}"


def cmd_stacks(run_dir: Path) -> int:
    """``launcher stacks RUN_DIR``: every live rank's and DataLoader worker's stacks on this machine, within
    :data:`WAIT_S`."""
    stacks = folder(run_dir)
    ranks = ranks_of(stacks)
    if not ranks:
        print(f"launcher: no rank of a job has run in {run_dir} (no {stacks}/rank*.pid)\nHINT: give the run "
              "directory of a running job (output_dir/name)", file=sys.stderr)
        return 2
    here = socket.gethostname()
    local = {r: pid for r, (pid, host) in ranks.items() if host == here and pid_alive(pid)}
    elsewhere = {r: host for r, (_, host) in ranks.items() if host != here}
    if not local and not elsewhere:
        print(f"launcher: no rank of {run_dir} is running", file=sys.stderr)
        return 1
    pids = _with_workers(stacks, local)
    dumps = read_new(stacks, request(stacks, pids))
    for key, pid in pids.items():
        if key in dumps:
            title = f"rank {key}"
            if isinstance(key, tuple):
                title = f"rank {key[0]}, {label(key[1], dumps[key], pid=False)}"
            print(f"== {title} (pid {pid} on {here})")
            print(dumps[key].rstrip() if dumps[key] else f"(no stacks within {WAIT_S:.0f} s: the process "
                  "may be stopped or in uninterruptible I/O)")
    for rank, host in elsewhere.items():
        print(f"== rank {rank} runs on {host}: run `launcher stacks {run_dir}` there (under SLURM: "
              f"srun --overlap --jobid JOBID -w {host} launcher stacks {run_dir})")
    return 0


def _live_workers(stacks: Path, ranks: Mapping[int, int]) -> dict[int, dict[str, int]]:
    """``{rank: {name: pid}}``: the live DataLoader workers and forked children of ``ranks`` (``{rank:
    pid}``, this machine's), those whose parent is the rank or the rank's own fork server
    (:mod:`launcher.data.workerserver`) and that still handle :data:`SIGNAL` (one that ran another program
    since would be ended by it)."""
    out: dict[int, dict[str, int]] = {}
    for rank, workers in workers_of(stacks).items():
        if rank not in ranks:
            continue
        for w, (pid, _) in workers.items():
            parent = parent_of(pid)
            mine = parent is not None and (parent == ranks[rank] or parent_of(parent) == ranks[rank])
            if mine and catches(pid, SIGNAL):
                out.setdefault(rank, {})[w] = pid
    return out


def main_thread(dump: str) -> str:
    """The main thread's block of a faulthandler dump ("Current thread ..."), else the whole dump."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    return next((b for b in blocks if b.startswith("Current thread")), dump.strip())


#: Early warning with no bound given: this many step times without a step, at least MIN_WARN_S seconds.
WARN_STEPS = 20
MIN_WARN_S = 30.0


def warning_bound(given: float | None, timeout_s: float, step_s: float | None) -> float:
    """Seconds without a step after which a rank's stack is printed: ``given``, else :data:`WARN_STEPS` step
    times (at least :data:`MIN_WARN_S`), never later than half of ``timeout_s``; 0: never."""
    if given is not None:
        return min(given, timeout_s / 2) if given > 0 else 0.0
    derived = max(MIN_WARN_S, WARN_STEPS * step_s) if step_s else timeout_s / 2
    return min(derived, timeout_s / 2)


def watch_for_stalls(heartbeats: Path, stacks: Path, pids: Callable[[], dict[int, int]], given: float | None,
                     timeout_s: float, quiet_until: Callable[[], float],
                     done: threading.Event | None = None) -> threading.Event:
    """A thread of the launcher that prints, once per stall, the stack of a rank that made no step for
    :func:`warning_bound` seconds (the job goes on; its peers' collectives fail only at ``timeout_s``).
    ``pids()``: ``{global rank: pid}`` of this machine's ranks now; ``quiet_until()``: a ``time.time()``
    before which nothing is said (the job was suspended by Ctrl-Z until then). Set the event (``done``, or
    a new one) to stop it."""
    done = done or threading.Event()

    def run() -> None:
        first: dict[int, tuple[int, float]] = {}
        warned: dict[int, int] = {}  # rank -> the step it was warned about
        while not done.wait(1.0):
            with contextlib.suppress(Exception):  # a warning is a help: never a reason to stop the launcher
                beats = _beats(heartbeats)
                for rank, beat in beats.items():
                    first.setdefault(rank, beat)
                rates = [(b[1] - first[r][1]) / (b[0] - first[r][0])
                         for r, b in beats.items() if b[0] > first[r][0]]
                bound = warning_bound(given, timeout_s, statistics.median(rates) if rates else None)
                now = time.time()
                if bound <= 0 or now < quiet_until() + bound:
                    continue
                stale = {r: b for r, b in beats.items() if now - b[1] > bound and warned.get(r) != b[0]}
                live = pids()
                stale = {r: b for r, b in stale.items() if r in live}
                if not stale or done.is_set():
                    continue
                warned.update({r: b[0] for r, b in stale.items()})
                _warn(stale, read_new(stacks, ask(stacks, {r: live[r] for r in stale}), wait_s=2.0), now,
                      timeout_s)

    threading.Thread(target=run, name="launcher-stall-watch", daemon=True).start()
    return done


def _warn(stale: dict[int, tuple[int, float]], dumps: dict[AnyKey, str], now: float,
          timeout_s: float) -> None:
    """Say where the stale ranks are, and their DataLoader workers (in ``dumps`` as ``(rank, name)``).
    Ranks waiting in a collective for a peer stop stepping too: the ranks that are not (the ones holding the
    others back) are shown, all of them when every one waits."""
    waiting = {r for r in stale if _in_collective(dumps.get(r, ""))}
    shown = [r for r in sorted(stale) if r not in waiting] or sorted(stale)
    for rank in shown:
        step, at = stale[rank]
        dump = dumps.get(rank, "")
        place = f" It is at {where(dump)}:\n{main_thread(dump)}" if dump else " It wrote no stacks."
        place += _workers_at(rank, dumps, "Its {} is at")
        print(f"[launcher] rank {rank} made no step for {now - at:.0f} s (last step {step}); the job goes "
              f"on, and its peers' collectives time out after distributed.timeout_s ({timeout_s:g} s)."
              f"{place}", file=sys.stderr, flush=True)
    if waiting and len(shown) < len(stale):
        print(f"[launcher] rank(s) {', '.join(map(str, sorted(waiting)))} wait for it in a collective",
              file=sys.stderr, flush=True)


def _workers_at(rank: int, dumps: Mapping[AnyKey, str], said: str) -> str:
    """A line per DataLoader worker of ``rank`` in ``dumps``: ``said`` (given what the worker is), where."""
    return "".join(f"\n{said.format(label(key[1], dump))} {where(dump) or '(no stacks written)'}"
                   for key, dump in dumps.items() if isinstance(key, tuple) and key[0] == rank)


def where_stalled(stacks: Path | None, sizes: Mapping[AnyKey, int], stalled: str) -> str:
    """Where the rank that stopped making progress (named in ``stalled``, the report) was when its peers
    failed: the innermost frame of the user's code in its main thread, and where each of its DataLoader
    workers was (from the stacks :func:`ask` asked for then, ``sizes``); "" when unknown."""
    m = re.match(r"rank (\d+) stopped making progress", stalled)
    if m is None or stacks is None or int(m.group(1)) not in sizes:
        return ""
    rank = int(m.group(1))
    mine = {k: n for k, n in sizes.items() if k == rank or (isinstance(k, tuple) and k[0] == rank)}
    dumps = read_new(stacks, mine, wait_s=1.0)
    at = where(dumps[rank])
    if not at:
        return f"\n(rank {rank} wrote no stacks: it may be in uninterruptible I/O)"
    return (f"\nrank {rank} was at {at} (every rank's threads: {stacks}/rank*.txt)"
            f"{_workers_at(rank, dumps, 'its {} was at')}")


def _in_collective(dump: str) -> bool:
    """The main thread's innermost frame is torch.distributed's (a collective waiting for a peer)."""
    frames = _main_frames(dump)
    return bool(frames) and f"torch{os.sep}distributed" in frames[0]["file"]


def _main_frames(dump: str) -> list[re.Match[str]]:
    """The frames of the main thread's block of a dump, innermost first."""
    return [m for line in main_thread(dump).splitlines() if (m := _FRAME.match(line))]


def _beats(heartbeats: Path) -> dict[int, tuple[int, float]]:
    """``{rank: (last step, time)}`` of the ranks still at work (those that wrote ``ended-rankN`` are not)."""
    from ..perf import read_beats

    return {r: (b.step, b.time) for r, b in read_beats(heartbeats).items()}
