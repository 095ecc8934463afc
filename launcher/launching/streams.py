"""The launcher's console streams: a reader that stops reading (``launcher run ... | head -3``) is not a
failed job.

Python ignores SIGPIPE, so a write to a closed pipe raises ``BrokenPipeError``: in the launcher's own lines
(a finished job exited 1 with a traceback) and in torch elastic's threads that copy the ranks' logs to the
console. From the first such error on, the stream's descriptor points at ``/dev/null``: the job, its exit
code and its checkpoints go on as if nothing happened, and the logs in the run directory keep everything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from typing import Any, TextIO


class _ClosedPipeSafe:
    """A text stream that swallows ``EPIPE`` once its reader has gone, then writes to ``/dev/null``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._to_devnull()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            self._to_devnull()

    def _to_devnull(self) -> None:
        with self._lock:
            with contextlib.suppress(OSError, ValueError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._stream.fileno())
                os.close(null)
            # what the closed pipe's buffer still holds can never be written: drop it
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_closed_pipes() -> None:
    """Make this process's stdout and stderr safe for a reader that goes away (the ``launcher`` command)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _ClosedPipeSafe):
            setattr(sys, name, _ClosedPipeSafe(stream))
