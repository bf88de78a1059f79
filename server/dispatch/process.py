"""A worker's process: starting it (and saying why it could not be started), stopping it,
and saying how it ended."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import TYPE_CHECKING

from shoal.proto.errors import ErrorCode, ServingError

if TYPE_CHECKING:
    from shoal.server.dispatch.worker import WorkerSpec

HEARTBEAT_SUFFIX = b"/hb"
"""A worker's heartbeat thread connects its own socket under ``<identity>/hb``."""


def beat_interval_ms(timeout_s: float) -> int:
    """Heartbeats every sixth of the timeout (at most 5 s); 0: none."""
    if not timeout_s:
        return 0
    return max(50, min(5000, int(timeout_s * 1000 / 6)))


async def spawn(
    spec: WorkerSpec, *, endpoint: str, identity: bytes, stdout: int | None = None, stderr: int | None = None
) -> asyncio.subprocess.Process:
    """Start ``python -P -m shoal.workers`` for ``spec``; raises ``UNAVAILABLE`` when the
    process cannot be started (no interpreter, descriptors, processes or memory).
    ``stdout`` / ``stderr``: descriptors for the worker's (``output.Capture``; ``None``:
    the router's own)."""
    # the worker imports Shoal as the router does (installed, or on the inherited PYTHONPATH);
    # -P: no current directory on its sys.path (started from a checkout, Shoal's folders would
    # shadow a model's own top-level packages, such as proto-plus's `proto`)
    env = {**os.environ, **dict(spec.env)}
    try:
        return await asyncio.create_subprocess_exec(
            spec.python or sys.executable, "-P", "-m", "shoal.workers",
            "--endpoint", endpoint,
            "--identity", identity.decode(),
            "--parent-pid", str(os.getpid()),
            "--log-verbose", str(spec.log_verbose),
            "--heartbeat-ms", str(beat_interval_ms(spec.heartbeat_timeout_s)),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=stdout, stderr=stderr,
        )  # fmt: skip
    except OSError as exc:
        label = f"model '{spec.model_name}' version {spec.model_version} instance '{spec.instance_name}'"
        raise ServingError(
            f"cannot start a worker process for {label}: {exc.strerror or exc}", code=ErrorCode.UNAVAILABLE
        ) from None


async def terminate(proc: asyncio.subprocess.Process | None, timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout_s``; returns once the process is gone."""
    if proc is None or proc.returncode is not None:
        return
    try:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
    except ProcessLookupError:
        pass


def death_message(hung: str, rc: int | None) -> str:
    """How a worker process ended: ``hung`` (why the watchdog killed it), else its signal
    or exit status (``None``: it never started)."""
    if hung:
        return f"{hung}: killed and restarted"
    if rc is None:
        return "did not start"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"died: killed by signal {name}"
    return f"died: exited with status {rc}"
