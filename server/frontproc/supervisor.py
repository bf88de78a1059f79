"""The router's side of its frontend processes: it holds the public ports (a bound socket
that never listens, so the kernel sends every connection to the frontends' listening
sockets), starts the processes, restarts one that exits, and stops them at shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from collections.abc import Callable

from shoal.proto import wire
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel

log = logging.getLogger("shoal.frontends")

START_TIMEOUT_S = 60.0
RESTART_BACKOFF_S = (0.1, 0.5, 2.0, 5.0)
"""Waits before restarting a frontend process that exited, by how often it exited lately."""


def arena_prefix(server_prefix: str, index: int, pid: int) -> str:
    """The segments of frontend process ``index`` (``pid``): under the server's prefix, so
    that the router removes them when it stops, and unique per process."""
    return f"{server_prefix}_fe{index}p{pid}"


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` that never listens: it keeps the port (0: a free
    one) for the frontend processes, which bind it too (SO_REUSEPORT) and listen. It binds
    before it allows SO_REUSEPORT, so a port that another server holds (even with
    SO_REUSEPORT) is refused as without frontend processes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    except OSError:
        sock.close()
        raise
    return sock


class Frontends:
    def __init__(
        self,
        count: int,
        channel: WorkerChannel,
        run_dir: str,
        prefix: str,
        argv: tuple[str, ...],
        *,
        triton: bool,
        on_exit: Callable[[str], None] | None = None,
        http_port: int,
        grpc_port: int,
    ) -> None:
        self.count = count
        self.channel = channel
        self.run_dir = run_dir
        self.prefix = prefix
        self.on_exit = on_exit
        """Called with the shared-memory prefix of a frontend process that exited."""
        self.argv = argv
        self.triton = triton
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._exits: dict[int, list[float]] = {}
        self.stopping = False
        self.started = False
        self._stop_messages = 0
        """``Shutdown`` messages sent to each process (1: stop accepting; 2: finish now)."""
        self.on_ready: list[Callable[[bytes], None]] = []
        """Called with a process's identity when it (re)started and is ready."""

    @staticmethod
    def identity(index: int) -> bytes:
        return f"frontend/{index}".encode()

    @property
    def identities(self) -> list[bytes]:
        return [self.identity(i) for i in range(self.count)]

    async def start(self) -> None:
        """Start every process; raises ``RuntimeError`` when one does not come up (one that
        exits before it is ready is not restarted: its error is in the log)."""
        await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        waits = [asyncio.ensure_future(self._ready[i].wait()) for i in range(self.count)]
        exits = [asyncio.ensure_future(p.wait()) for p in self.procs.values()]
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while not all(w.done() for w in waits):
                if any(e.done() for e in exits):
                    gone = {i: p.returncode for i, p in self.procs.items() if p.returncode is not None}
                    raise RuntimeError(f"a frontend process exited as it started (exit codes {gone})")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the frontend processes did not start within {START_TIMEOUT_S:.0f} s")
                await asyncio.wait([*waits, *exits], timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (*waits, *exits):
                f.cancel()
        self.started = True

    async def _spawn(self, index: int) -> None:
        ident = self.identity(index)
        ready = self._ready[index] = asyncio.Event()

        def on_message(env: wpb.Envelope, frames: list[bytes]) -> None:
            if env.WhichOneof("body") == "ready":
                ready.set()
                for hook in self.on_ready:
                    hook(ident)
                for _ in range(self._stop_messages):  # it started while the server stops
                    self._tell(index)

        self.channel.register(ident, on_message)
        cmd = [
            sys.executable, "-P", "-m", "shoal.server.frontproc",
            "--index", str(index),
            "--run-dir", self.run_dir,
            "--prefix", self.prefix,
            "--http-port", str(self.http_port),
            "--grpc-port", str(self.grpc_port),
        ]  # fmt: skip
        if self.triton:
            cmd.append("--triton")
        proc = await asyncio.create_subprocess_exec(*cmd, "--", *self.argv, stdin=asyncio.subprocess.DEVNULL)
        self.procs[index] = proc
        task = asyncio.get_running_loop().create_task(self._watch(index, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self.on_exit is not None:
            self.on_exit(arena_prefix(self.prefix, index, proc.pid))
        if self.stopping or not self.started or self.procs.get(index) is not proc:
            return
        now = time.monotonic()
        recent = [t for t in self._exits.get(index, []) if now - t < 60.0] + [now]
        self._exits[index] = recent
        wait = RESTART_BACKOFF_S[min(len(recent), len(RESTART_BACKOFF_S)) - 1]
        log.warning("frontend process %d (pid %d) exited with code %s; restarting it", index, proc.pid, code)
        await asyncio.sleep(wait)
        if not self.stopping:
            await self._spawn(index)

    def _tell(self, index: int) -> None:
        env = wire.envelope(0)
        env.shutdown.SetInParent()
        try:
            self.channel.send(self.identity(index), env)
        except ServingError:  # not connected (yet): it hears it with its ready
            pass

    def forget_arena(self, prefix: str) -> None:
        """A worker exited: every frontend process unmaps its output arena (the segments are
        unlinked already; the mappings would keep their memory)."""
        env = wire.envelope(0)
        env.forget.arena_prefixes.append(prefix)
        for index in range(self.count):
            try:
                self.channel.send(self.identity(index), env)
            except ServingError:  # not connected: a new process has no mapping of it
                pass

    def begin_stop(self) -> None:
        """Ask every process to stop accepting and finish what it has (its gRPC calls within
        ``--exit-timeout-secs``)."""
        if self._stop_messages:
            return
        self.stopping = True
        self._stop_messages = 1
        for index in self.procs:
            self._tell(index)

    def finish(self) -> None:
        """Every accepted inference is answered: streams still open get a short grace (a
        second ``Shutdown``)."""
        self.begin_stop()
        if self._stop_messages < 2:
            self._stop_messages = 2
            for index in self.procs:
                self._tell(index)

    async def wait_stopped(self, timeout_s: float) -> None:
        """Once the processes are gone (SIGKILL for those still there after ``timeout_s``)."""
        self.finish()
        procs = [p for p in self.procs.values() if p.returncode is None]
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout_s)
            if pending:
                for p in procs:
                    if p.returncode is None:
                        log.warning("frontend process %d did not stop in time; killing it", p.pid)
                        try:
                            os.kill(p.pid, 9)
                        except ProcessLookupError:
                            pass
                await asyncio.wait(pending)
        for task in list(self._watchers):
            task.cancel()
        for index in self.procs:
            self.channel.unregister(self.identity(index))
