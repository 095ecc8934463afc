"""Exit codes and the errors users see when a job fails.

Exit codes of ``launcher run`` / ``launcher submit --wait`` (also in the README):

=====  ==========================================================
0      the job finished
1      a rank failed (its rank, host, exit code or signal and traceback are printed)
2      bad usage or an invalid job file
3      stopped to be requeued: state saved, run the same command again (SLURM does it for you)
130    interrupted by Ctrl-C / SIGINT; 143 for SIGTERM
=====  ==========================================================
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_REQUEUE = 3
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class LaunchError(RuntimeError):
    """A user-facing launcher error (printed without a launcher traceback)."""


class UsageError(LaunchError):
    """Bad usage found before anything started (exit code 2): the message names what and how to fix it."""


class StopForRequeue(SystemExit):
    """Raised inside a rank after its state was saved, to exit with :data:`EXIT_REQUEUE`."""

    def __init__(self) -> None:
        super().__init__(EXIT_REQUEUE)


# Messages that mean "a peer died" or "the launcher stopped this rank" rather than "this rank is the cause".
_SECONDARY = ("Connection closed by peer", "Connection reset by peer", "ECONNRESET", "Broken pipe",
              "Signal 15 (SIGTERM) received", "Signal 2 (SIGINT) received")


@dataclass
class Failure:
    """One failed rank."""

    rank: int
    host: str
    exitcode: int
    signal: str | None
    timestamp: int
    message: str
    traceback: str
    log_tail: str = ""

    @property
    def how(self) -> str:
        """How the rank ended, in words: ``signal SIGKILL`` or ``exit code 1``."""
        return f"signal {self.signal}" if self.signal else f"exit code {self.exitcode}"

    @property
    def secondary(self) -> bool:
        """True when this rank most likely failed because another one died first (or was stopped for it)."""
        if self.signal in ("SIGTERM", "SIGINT"):  # the launcher stops the surviving ranks with these
            return True
        return any(s in self.traceback or s in self.message for s in _SECONDARY)


#: Frames of these files are the launcher's and torch elastic's plumbing around the user's code.
_PLUMBING = ("torch/distributed/elastic/", "launcher/rank/program.py", "launcher/entry.py", "<frozen runpy>")


def user_frames(traceback: str) -> str:
    """``traceback`` without the frames of the plumbing that called the user's code (every line is kept when
    that would leave no frame at all)."""
    lines = traceback.splitlines()
    out, skipping = [], False
    for line in lines:
        if line.startswith("  File "):
            skipping = any(p in line for p in _PLUMBING)
        elif not line.startswith("    "):
            skipping = False
        if not skipping:
            out.append(line)
    if not any(line.startswith("  File ") for line in out):
        return traceback
    return "\n".join(out)


class RankFailure(LaunchError):
    """A rank raised or died; carries the first failure (by time, root causes first) and all others."""

    def __init__(self, failures: list[Failure], stalled: str = "") -> None:
        # Root causes first, then by time: timestamps have one-second resolution and the agent stamps a rank
        # killed by a signal when it notices, which can be after the peers it stopped because of it.
        self.failures = sorted(failures, key=lambda f: (f.secondary, f.timestamp, f.rank))
        self.first = self.failures[0]
        self.stalled = stalled  # "rank N stopped making progress ...": a collective timed out waiting for it
        super().__init__(self.render())

    @property
    def exit_code(self) -> int:
        """What the launcher exits with: the requeue code passes through, anything else is a failure."""
        if all(f.exitcode == EXIT_REQUEUE for f in self.failures):
            return EXIT_REQUEUE
        return EXIT_FAILURE

    def render(self) -> str:
        f = self.first
        how = f.how
        lines = [f"rank {f.rank} failed first (host {f.host}, {how})"]
        if self.stalled:
            lines = [self.stalled, f"so rank {f.rank} failed first (host {f.host}, {how}):"]
        if f.traceback:
            lines += [f"[rank{f.rank}]: {line}" for line in user_frames(f.traceback).rstrip().splitlines()]
        elif f.message:
            lines.append(f"[rank{f.rank}]: {f.message}")
        if f.log_tail and not f.traceback:
            lines.append(f"last lines of rank {f.rank}'s log:")
            lines += [f"[rank{f.rank}]: {line}" for line in f.log_tail.rstrip().splitlines()]
        others = [o for o in self.failures if o is not f]
        if others:
            lines.append(
                "also failed: "
                + ", ".join(
                    f"rank {o.rank} ({o.how})"
                    for o in others
                )
            )
        return "\n".join(lines)


class DataLoaderWaitExpired(RuntimeError):
    """No batch (or start-up answer) from any DataLoader worker for ``waited`` seconds, all of them alive."""

    def __init__(self, waited: float) -> None:
        super().__init__(f"DataLoader timed out after {waited:.0f} seconds")
        self.waited = waited
