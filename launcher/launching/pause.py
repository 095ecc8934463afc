"""Ctrl-Z with no collective in flight: the launcher's side (the ranks': :mod:`launcher.rank.pause`).

Before the launcher stops its ranks it asks each (:data:`SIGNAL`) to wait at its next step boundary, and
writes the step to wait at in ``HEARTBEAT_DIR/pause`` (0: the next one). Each waiting rank writes the step
it waits after in ``paused-rankN``. The ranks differ by a step at most, since every step's collectives join
them: when they wait at different steps, the target becomes the latest, and when one does not arrive (it
waits in a collective for a rank already waiting), one step later. Once all wait after one step, no
collective is in flight and the stop can last longer than ``distributed.timeout_s``. A rank that makes no
step within :data:`BOUND_S` (a script without ``note_step``, a long step) is stopped where it is, as before.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..spec import PAUSE_SIGNAL as SIGNAL

#: Longest the launcher waits for its ranks to reach one step boundary before it stops them anyway.
BOUND_S = 2.0
#: A rank missing this long while others wait: it may wait for them in a collective, move the target on.
NUDGE_S = 0.3


def request(folder: Path | None, pids: list[int]) -> bool:
    """Ask ``pids`` (every rank of the job) to wait at one step boundary; True once all do, False after
    :data:`BOUND_S`. ``folder``: the heartbeat folder; None (a launcher of one machine of several): False."""
    if folder is None or not pids:
        return False
    target = 0
    _write(folder / "pause", target)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, SIGNAL)
    deadline = time.monotonic() + BOUND_S
    seen: dict[int, int] = {}
    changed = time.monotonic()
    while time.monotonic() < deadline:
        at = _waiting(folder)
        steps = set(at.values())
        if len(at) == len(pids) and len(steps) == 1 and min(steps) >= target:
            return True
        if at != seen:
            seen, changed = at, time.monotonic()
        later = target
        if len(at) == len(pids) and len(steps) > 1:
            later = max(steps)
        elif at and time.monotonic() - changed > NUDGE_S:
            later, changed = max(steps) + 1, time.monotonic()
        if later > target:
            target = later
            _write(folder / "pause", target)
        time.sleep(0.005)
    return False


def release(folder: Path | None) -> None:
    """``fg``: the ranks go on (they read the file's absence at once; a stopped rank when continued)."""
    if folder is None:
        return
    for path in [folder / "pause", *folder.glob("paused-rank*")]:
        with contextlib.suppress(OSError):
            path.unlink()


def _waiting(folder: Path) -> dict[int, int]:
    """``{rank: step}`` of the ranks waiting at a boundary."""
    out = {}
    for path in folder.glob("paused-rank*"):
        with contextlib.suppress(OSError, ValueError):
            out[int(path.name[len("paused-rank"):])] = int(path.read_text())
    return out


def _write(path: Path, step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(step))
    os.replace(tmp, path)
