"""Where is every rank? Ask each for its stacks (:mod:`launcher.rank.stacks`) and read what they wrote.

Runs in the ``launcher`` process: for ``launcher stacks RUN_DIR`` (a job on this machine) and when a
collective timed out, to show where the rank that stopped making progress is.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import sysconfig
import time
from pathlib import Path

from ..spec import STACKS_SIGNAL as SIGNAL

#: Longest wait for the dumps; a rank that has not written by then is named as such.
WAIT_S = 5.0


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "stacks"


def ranks_of(stacks: Path) -> dict[int, tuple[int, str]]:
    """``{rank: (pid, host)}`` from the ranks' ``rankN.pid`` files."""
    out = {}
    for p in stacks.glob("rank*.pid"):
        try:
            pid, host = p.read_text().split()
            out[int(p.name[4:-4])] = (int(pid), host)
        except (OSError, ValueError):
            continue
    return dict(sorted(out.items()))


def request(stacks: Path, pids: dict[int, int]) -> dict[int, int]:
    """Signal each rank (``{rank: pid}``) for its stacks; returns the size of each rank's dump file before,
    where its new dump starts (:func:`read_new`)."""
    sizes = {}
    for rank, pid in pids.items():
        path = stacks / f"rank{rank}.txt"
        sizes[rank] = path.stat().st_size if path.exists() else 0
        try:
            os.kill(pid, SIGNAL)
        except (ProcessLookupError, PermissionError):
            sizes.pop(rank)
    return sizes


def read_new(stacks: Path, sizes: dict[int, int], wait_s: float = WAIT_S) -> dict[int, str]:
    """What each rank wrote after ``sizes`` (``{rank: dump}``, "" for one that wrote nothing), waiting up to
    ``wait_s`` for every rank and until the dumps stop growing."""
    deadline = time.monotonic() + wait_s
    last: dict[int, int] = {}
    while True:
        now = {r: _size(stacks / f"rank{r}.txt") for r in sizes}
        done = all(now[r] > sizes[r] for r in sizes) and now == last
        if done or time.monotonic() > deadline:
            break
        last = now
        time.sleep(0.1)
    out = {}
    for rank, start in sizes.items():
        try:
            with open(stacks / f"rank{rank}.txt", errors="replace") as f:
                f.seek(start)
                out[rank] = f.read()
        except OSError:
            out[rank] = ""
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<fn>.+)$')
_PATHS = sysconfig.get_paths()
#: Frames from these folders are not the user's code: Python's, installed packages', the launcher's own.
_NOT_USER = tuple({_PATHS["stdlib"], _PATHS["purelib"], _PATHS["platlib"], str(Path(__file__).parents[1])})


def where(dump: str) -> str:
    """The innermost frame of the user's code in the main thread's stack of a faulthandler dump
    (``file:line in function``), else its innermost frame; "" when there is none."""
    blocks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", dump.strip())
    main = next((b for b in blocks if b.startswith("Current thread")), blocks[-1] if blocks else "")
    frames = [m for line in main.splitlines() if (m := _FRAME.match(line))]
    user = [m for m in frames if not os.path.realpath(m["file"]).startswith(_NOT_USER)]
    if not frames:
        return ""
    pick = (user or frames)[0]
    return f"{pick['file']}:{pick['line']} in {pick['fn']}"


def cmd_stacks(run_dir: Path) -> int:
    """``launcher stacks RUN_DIR``: every live rank's stacks on this machine, within :data:`WAIT_S`."""
    stacks = folder(run_dir)
    ranks = ranks_of(stacks)
    if not ranks:
        print(f"launcher: no rank of a job has run in {run_dir} (no {stacks}/rank*.pid)\nHINT: give the run "
              "directory of a running job (output_dir/name)", file=sys.stderr)
        return 2
    here = socket.gethostname()
    local = {r: pid for r, (pid, host) in ranks.items() if host == here and _alive(pid)}
    elsewhere = {r: host for r, (_, host) in ranks.items() if host != here}
    if not local and not elsewhere:
        print(f"launcher: no rank of {run_dir} is running", file=sys.stderr)
        return 1
    dumps = read_new(stacks, request(stacks, local))
    for rank, dump in dumps.items():
        print(f"== rank {rank} (pid {local[rank]} on {here})")
        print(dump.rstrip() if dump else f"(no stacks within {WAIT_S:.0f} s: the process may be stopped or "
              "in uninterruptible I/O)")
    for rank, host in elsewhere.items():
        print(f"== rank {rank} runs on {host}: run `launcher stacks {run_dir}` there (under SLURM: "
              f"srun --overlap --jobid JOBID -w {host} launcher stacks {run_dir})")
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
