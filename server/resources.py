"""The router's share of the machine: descriptors, connections, memory, processes.

Defaults that depend on the machine are computed here once at start-up, so that the
configured bounds always fit inside what the process may actually use (a connection cap
above the descriptor limit would let clients exhaust descriptors before the cap applies).
"""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass

from shoal.proto.errors import ErrorCode, ServingError
from shoal.server.config import ServerConfig

log = logging.getLogger("shoal")

_RESERVED_FDS = 128
"""Descriptors kept for the router itself (sockets, files, metrics scrapes)."""
_FDS_PER_WORKER = 6
"""Descriptors the router spends on each worker (its two channel connections, process
handling, the pipes its stdout and stderr come through): never left to client connections,
or a restarting worker could not connect."""
_MAX_AUTO_CONNECTIONS = 65536


def raise_nofile_limit() -> int:
    """Raise the soft descriptor limit to the hard one (as servers do); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


@dataclass(frozen=True, slots=True)
class Budget:
    """The bounds the router applies (from the config, or computed)."""

    http_max_connections: int
    grpc_max_connections: int
    max_buffered_request_bytes: int
    max_worker_processes: int


def budget(config: ServerConfig) -> Budget:
    """Resolve the ``0 = automatic`` settings of ``config`` on this machine, so that workers,
    then client connections, fit in the descriptor limit (raised to its hard limit first)."""
    fds = raise_nofile_limit()
    cpus = os.cpu_count() or 1
    workers = config.max_worker_processes or max(64, 16 * cpus)
    fit = max(1, (fds - _RESERVED_FDS) // (2 * _FDS_PER_WORKER))
    if workers > fit:
        if config.max_worker_processes:
            log.warning(
                "--max-worker-processes %d does not fit the descriptor limit (%d); raise it (ulimit -n, LimitNOFILE=)",
                workers,
                fds,
            )
        else:
            workers = fit
    left = fds - _RESERVED_FDS - workers * _FDS_PER_WORKER
    share = max(16, left * 2 // 5)
    auto_conns = min(share, _MAX_AUTO_CONNECTIONS)
    http = config.http_max_connections or auto_conns
    grpc = config.grpc_max_connections or auto_conns
    # the HTTP reserve for health checks is a sixteenth on top (frontends/http/connections)
    needed = http + max(16, http // 16) + grpc + _RESERVED_FDS + workers * _FDS_PER_WORKER
    if needed > fds:
        log.warning(
            "the descriptor limit (%d) is below what %d HTTP and %d gRPC connections and %d workers need (%d); "
            "raise it (ulimit -n, LimitNOFILE=) or lower --http-max-connections / --grpc-max-connections",
            fds,
            http,
            grpc,
            workers,
            needed,
        )
    return Budget(
        http_max_connections=http,
        grpc_max_connections=grpc,
        max_buffered_request_bytes=config.max_buffered_request_bytes or max(physical_memory_bytes() // 2, 1 << 30),
        max_worker_processes=workers,
    )


class RequestBudget:
    """Bytes of request bodies (HTTP) and messages (gRPC) the router holds at once, all
    clients together. Owned by the router's loop."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, nbytes: int) -> None:
        if self.held + nbytes > self.max_bytes:
            raise ServingError(
                f"the server is holding {self.held} bytes of request bodies and this one would pass its limit of "
                f"{self.max_bytes} bytes (--max-buffered-request-bytes); retry later",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )
        self.held += nbytes

    def give(self, nbytes: int) -> None:
        self.held -= nbytes
