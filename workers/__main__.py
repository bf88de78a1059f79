"""``python -m shoal.workers --endpoint ipc://... --identity NAME``: one model instance."""

from __future__ import annotations

import argparse
import ctypes
import io
import logging
import os
import signal
import sys

from shoal.workers.runtime import WorkerRuntime

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the router dies, so no worker outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shoal.workers")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--parent-pid", type=int, default=os.getppid())
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--heartbeat-ms", type=int, default=0, help="send a heartbeat this often (0: none)")
    args = p.parse_args(argv)
    # stdout is a pipe the router reads (its admin API keeps the last lines): a model's print
    # shows at once, as on a terminal, not when a block fills
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    logging.basicConfig(
        level=logging.DEBUG if args.log_verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s [worker {args.identity} pid {os.getpid()}] %(message)s",
        stream=sys.stderr,
    )
    _die_with_parent(args.parent_pid)
    # The router drives shutdown: SIGINT from a terminal's Ctrl-C reaches the whole
    # process group, and the worker must not die before the router drains it. SIGTERM
    # (an operator's `kill`) ends the worker, but only once the batch it is executing has
    # been answered; a SIGTERM the router got too (a process group's) is left to the router
    # (``proto.stopmark``).
    runtime = WorkerRuntime(endpoint=args.endpoint, identity=args.identity.encode(), heartbeat_ms=args.heartbeat_ms)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: runtime.on_sigterm())
    return runtime.run()


if __name__ == "__main__":
    sys.exit(main())
