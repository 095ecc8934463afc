"""Imported first by the fork server of a rank's DataLoader workers (:mod:`launcher.data.workerserver`).

The server and every worker it forks die with their parent (the rank, the server). Without it a SIGKILLed
rank left both behind: each worker holds the server's keep-alive pipe, so the server never saw the rank go,
and a worker only watches its own parent, the server.
"""

import os

from ..rank.process import die_with_parent

die_with_parent()
os.register_at_fork(after_in_child=die_with_parent)
