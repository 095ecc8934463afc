"""Ctrl-C in a rank: SIGINT stops the target with ``KeyboardInterrupt``; the rank tells a stop from a failure.

Two things Python's default SIGINT handler gets wrong in a rank:

* A rank blocked in a collective may see its peer, stopped a moment earlier, close the connection before its
  own handler has run. :func:`interruptible` runs the pending handler before the error leaves, so
  :func:`stopped_by` names the signal and that error counts as the stop.
* The handler runs in whatever Python code comes next, and some of it cannot pass an exception on: an at-fork
  callback (logging's lock release, after a DataLoader forks its workers at every epoch), a finalizer, a
  ``__del__``. Python prints the ``KeyboardInterrupt`` there as "Exception ignored" and drops it, and the rank
  trains on until its peers' errors or the launcher's SIGKILL end it. Here such a dropped interrupt is sent
  again from a thread, and lands a moment later in code that can raise it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

_STATE: dict[str, Any] = {
    "signal": None,  # the name of the signal that stopped the target
    "closing": False,  # the target is unwinding: a SIGINT is only recorded
    "previous_hook": None,  # sys.unraisablehook outside the block
    "in_hook": False,  # the main thread is in _unraisable: a resend waits until it has left
}


def stopped_by() -> str | None:
    """The name of the signal that stopped the target of the last :func:`interruptible` block, or None."""
    return _STATE["signal"]


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT raises ``KeyboardInterrupt`` in the block and is remembered (see :func:`stopped_by`).

    Only Python's default handler is replaced: a user's own SIGINT handler is kept, and then nothing changes.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _STATE.update(signal=None, closing=False, previous_hook=sys.unraisablehook)
    sys.unraisablehook = _unraisable
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    except BaseException:
        _STATE["closing"] = True  # from here a SIGINT is only recorded: no second exception
        _run_pending_signal_handlers()
        raise
    finally:
        _STATE["closing"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.unraisablehook = _STATE["previous_hook"]


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _STATE["signal"] = signal.Signals(signum).name
    if not _STATE["closing"] and not _called_from(frame, _unraisable):  # there it is being sent again
        raise KeyboardInterrupt


def _run_pending_signal_handlers() -> None:
    """Nothing: calling a Python function is where CPython runs the handlers of signals already delivered."""


def _unraisable(info: Any) -> None:
    """``sys.unraisablehook``: a dropped interrupt is sent again; anything else goes to the previous hook."""
    if isinstance(info.exc_value, KeyboardInterrupt) and not _STATE["closing"]:
        _STATE["in_hook"] = True
        threading.Thread(target=_resend, name="launcher-sigint", daemon=True).start()
        _STATE["in_hook"] = False  # last, with no call after it: no handler runs in this frame from here
        return
    _STATE["previous_hook"](info)


def _called_from(frame: FrameType | None, fn: Any) -> bool:
    while frame is not None:
        if frame.f_code is fn.__code__:
            return True
        frame = frame.f_back
    return False


def _resend() -> None:
    """Send SIGINT again once the main thread (which runs the handler) has left the hook."""
    while _STATE["in_hook"]:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)
