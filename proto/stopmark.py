"""The router's mark that the server is shutting down, for its workers to find on SIGTERM.

A SIGTERM sent to a whole process group (a terminal's ``kill -- -PGID``, ``timeout``,
systemd's default ``KillMode=control-group``) reaches the router and its workers at once. A
worker that gets SIGTERM on its own (an operator's ``kill``) exits after its batch and is
replaced; one that got it with the router must go on serving while the router drains, and
stop when the router tells it to, or the requests still queued for it are lost. The router,
in its signal's callback, creates ``stopping`` in its run folder (the folder of the workers'
channel socket); a worker that gets SIGTERM looks for it for up to ``SIGTERM_WAIT_S``.
"""

from __future__ import annotations

import os
import time
from typing import Final

NAME: Final = "stopping"
SIGTERM_WAIT_S: Final = 0.2
"""How long a worker that got SIGTERM looks for the router's mark before it takes the
signal as its own."""


def mark(run_dir: str) -> None:
    """The router is shutting down (idempotent; the run folder goes at the end of it)."""
    try:
        with open(os.path.join(run_dir, NAME), "w"):
            pass
    except OSError:
        pass  # the folder is gone: the workers exit on their own


def path_for(endpoint: str) -> str:
    """The mark's path for a worker channel at ``endpoint`` (``ipc://<run folder>/<socket>``);
    "" for any other kind of endpoint."""
    if not endpoint.startswith("ipc://"):
        return ""
    return os.path.join(os.path.dirname(endpoint[len("ipc://") :]), NAME)


def wait_for(path: str, timeout_s: float = SIGTERM_WAIT_S) -> bool:
    """Whether the mark at ``path`` exists, or appears within ``timeout_s``."""
    if not path:
        return False
    deadline = time.monotonic() + timeout_s
    while True:
        if os.path.exists(path):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
