"""Other processes by pid, from any process (no torch imported: ``launcher stacks`` stays quick)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """A process with this pid exists (it may be another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
