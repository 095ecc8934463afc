"""A rank's side of Ctrl-Z: wait at a step boundary, where no collective is in flight, before the launcher
stops it (:mod:`launcher.launching.pause`).

A collective that waits across a stop times out right after ``fg`` when the stop lasted longer than
``distributed.timeout_s``: Gloo and NCCL count in monotonic time, which runs on while a process is stopped.
On :data:`SIGNAL` the rank only notes the request; :func:`launcher.dist.note_step` (``ckpt.step``) then
calls :func:`hold` at the next step boundary, which waits there for as long as the launcher's ``pause``
file (in the heartbeat folder) names a step at or below this one. The launcher raises that step until every
rank waits at the same one, stops them, and removes the file at ``fg``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any

from .. import dist
from ..spec import PAUSE_SIGNAL as SIGNAL

#: Longest wait at a boundary while this process runs (a launcher that never says go: go on, said once).
HOLD_S = 30.0
POLL_S = 0.005


def install() -> None:
    """Note a pause request on :data:`SIGNAL` (under ``launcher run`` only: it alone sends it)."""
    if os.environ.get(dist.HEARTBEAT_ENV):
        signal.signal(SIGNAL, _requested)


def _requested(signum: int, frame: Any) -> None:
    dist.request_pause()


def hold(step: int) -> bool:
    """At the boundary after ``step`` with a pause requested: wait while the launcher's target step is at or
    below ``step``; True when the pause is over (the request is then cleared), False to go on to the next
    boundary (the target is later)."""
    folder = os.environ.get(dist.HEARTBEAT_ENV, "")
    mine = os.path.join(folder, f"paused-rank{dist.get_rank()}")
    said = False
    for _ in range(int(HOLD_S / POLL_S)):  # counts only while running: a stopped rank makes no turns
        try:
            with open(os.path.join(folder, "pause")) as f:
                target = int(f.read() or 0)
        except (OSError, ValueError):
            target = None
        if target is None:  # the launcher said go (or its folder is gone)
            with contextlib.suppress(OSError):
                os.unlink(mine)
            return True
        if step < target:
            return False
        if not said:
            tmp = f"{mine}.tmp"
            with open(tmp, "w") as f:
                f.write(str(step))
            os.replace(tmp, mine)
            said = True
        time.sleep(POLL_S)
    print(f"[launcher] rank {dist.get_rank()}: asked to pause at step {step} and not released within "
          f"{HOLD_S:g} s: going on", flush=True)
    return True
