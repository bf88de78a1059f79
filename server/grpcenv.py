"""gRPC's process settings, applied before grpc is imported (``apply()``, called at the top of
the router's and the frontend processes' entry modules). Each is a default: a value the
operator set in the environment wins.

- ``GRPC_ENABLE_FORK_SUPPORT=false``: with grpc's fork handlers on, a fork while grpc threads
  run can abort the child before it execs ("epoll_wait error: Bad file descriptor",
  grpc/grpc#43055). The router forks for every worker it starts, and workers never use the
  router's grpc.
- ``GRPC_EXPERIMENTS=-event_engine_listener``: the server's listener and its connections on
  gRPC's older I/O layer, where the thread that waits on the completion queue (grpc.aio's
  poller thread) also reads the sockets, instead of on EventEngine's, which grpcio turned on
  for Python in 1.80 and which hands every read to a thread of its own pool first: one
  thread wake-up more per call.

  DESIGN: measured on the device machine (2026-12-03, one lease, 3 alternating rounds,
  medians, perf_analyzer small identity requests, grpcio 1.85.3): a one-process grpc.aio
  server with a hop (``scripts/ceiling_server.py --hop``) c=1 p50 0.298 ms against 0.443
  (3110 against 2132 infer/s), c=16 5.46k against 5.02k; Shoal with 4 frontend processes
  c=1 p50 0.723 against 0.796 ms, c=16 6.61k against 5.94k, c=64 10.5k against 9.9k. Set only
  when the installed grpc still knows the experiment (its name is in the library): an
  unknown one makes grpc log an error at start, and once grpc removes the experiment the
  older layer is gone with it.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
from pathlib import Path

EXPERIMENTS = "GRPC_EXPERIMENTS"
LISTENER_EXPERIMENT = "event_engine_listener"


SET: dict[str, str] = {}
"""What ``apply()`` set in this process (the router logs the experiments it chose)."""


def apply() -> None:
    """Set gRPC's defaults in ``os.environ`` (inherited by the frontend processes)."""
    if "GRPC_ENABLE_FORK_SUPPORT" not in os.environ:
        os.environ["GRPC_ENABLE_FORK_SUPPORT"] = SET["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    if EXPERIMENTS not in os.environ and knows_experiment(LISTENER_EXPERIMENT):
        os.environ[EXPERIMENTS] = SET[EXPERIMENTS] = f"-{LISTENER_EXPERIMENT}"


def knows_experiment(name: str) -> bool:
    """Whether the installed grpc's core library names experiment ``name`` (without importing
    grpc: the environment must be set first). About 15 ms once per server start."""
    spec = importlib.util.find_spec("grpc")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = b"\0" + name.encode() + b"\0"
    for location in spec.submodule_search_locations:
        for lib in (Path(location) / "_cython").glob("cygrpc*.so"):
            try:
                with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(needle) >= 0:
                        return True
            except (OSError, ValueError):
                continue
    return False
