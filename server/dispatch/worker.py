"""``Worker``: one worker process for one model instance, supervised by the router.

The worker is spawned with ``asyncio.create_subprocess_exec`` and awaited with
``proc.wait()``; when it exits unexpectedly its in-flight batches fail at once with a
retriable ``UNAVAILABLE`` naming model, instance and signal, and it is restarted with
exponential backoff (and its model reloaded). Owned by the router's event loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from shoal.proto import wire
from shoal.proto.errors import ErrorCode, ServingError, WorkerDied
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server import events
from shoal.server.dispatch import output, process
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.ratelimit import Needs
from shoal.server.dispatch.spec import Reply, StreamSink, WorkerSpec, WorkerState

__all__ = ["Reply", "StreamSink", "Worker", "WorkerSpec", "WorkerState", "shm_outputs"]
from shoal.shm import region

log = logging.getLogger("shoal.worker")
READY_CHECK_TIMEOUT_S = 5.0
"""How long a model's readiness check may take (python_backend's limit)."""


class Worker:
    """Lifecycle: ``await start()`` (raises ``ServingError`` when the model fails to load),
    ``submit()`` batches while ``ready``, ``await stop()``."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        channel: WorkerChannel,
        arena_prefix: str,
        on_exit: Callable[[Worker], None] | None = None,
    ) -> None:
        self.spec = spec
        self.channel = channel
        self.arena_prefix_base = arena_prefix
        self.on_exit = on_exit
        self.state = WorkerState.STARTING
        self.generation = 0
        self.pid = 0
        self.restarts = 0
        self.outstanding = 0
        self.identity = b""
        self.arena_prefix = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[Reply]] = {}
        self.rate: Needs | None = None
        """The resources this instance holds while it executes (``--rate-limit``)."""
        self._settle: dict[int, Callable[[], None]] = {}
        self._streams: dict[int, StreamSink] = {}
        """Decoupled batches whose requests are not all final yet."""
        self._next_id = 1
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.server_stopping = False
        """The server is shutting down (``App.stopping``): a process that exits now (it
        crashed, or took a process group's SIGTERM as its own when the router's stop mark came
        too late, ``proto.stopmark``) is not replaced, and its exit is logged at INFO."""
        self._planned = False
        """The current process exits because an operator asked for a restart."""
        self._first_load: asyncio.Future[None] | None = None
        self.has_ready_check = False
        """The loaded model has a readiness check of its own (``check_ready``)."""
        self._ready_check: asyncio.Future[tuple[bool, str]] | None = None
        self.lane_requests = 0
        """Requests frontend processes sent over its lane and not answered yet, as they report
        them (``server.frontproc.lanes``)."""
        self.lane = ""
        """The current process's lane socket (frontend processes send it requests there,
        ``server.frontproc.lanes``); "" when it has none."""
        self._loop = asyncio.get_running_loop()
        self.reason = ""
        """Why the instance is not READY (the last start failure), for the index and admin API."""
        self.last_beat = 0.0
        """``loop.time()`` of the last heartbeat of the current process."""
        self._sent: dict[int, float] = {}
        """``loop.time()`` each outstanding batch was sent (stall detection)."""
        self._hung = ""
        """Set when the watchdog killed the process: why (replaces "killed by SIGKILL")."""
        self.logs = output.LogRing()
        """The last lines its processes wrote on stdout and stderr (``shoal workers logs``)."""
        self._captures: list[output.Capture] = []
        """The output pipes of its processes that have not ended yet."""

    @property
    def ready(self) -> bool:
        return self.state is WorkerState.READY

    @property
    def load(self) -> int:
        """Batches not finished here: executing, or streaming a decoupled model's responses
        after its ``execute`` returned (the model's threads still work for them), and the
        requests frontends sent it over its lane."""
        streams = self._streams
        if not streams:
            return self.outstanding + self.lane_requests
        return self.outstanding + self.lane_requests + sum(1 for rid in streams if rid not in self._pending)

    @property
    def label(self) -> str:
        return f"model '{self.spec.model_name}' version {self.spec.model_version} instance '{self.spec.instance_name}'"

    async def start(self) -> None:
        self._first_load = self._loop.create_future()
        self._task = asyncio.create_task(self._supervise(), name=f"supervise {self.spec.instance_name}")
        await self._first_load

    def submit(
        self,
        infer: wpb.Envelope,
        buffers: Sequence[Any],
        on_settled: Callable[[], None] | None = None,
        stream: StreamSink | None = None,
    ) -> asyncio.Future[Reply]:
        """Send a batch; the future resolves with the worker's reply or fails with
        ``WorkerDied``. The caller has checked ``ready``.

        ``on_settled`` runs once the worker is done with the batch's inputs: when its reply
        arrives or the process dies, even if the caller cancelled the future meanwhile.
        """
        rid = self._next_id
        self._next_id += 1
        infer.request_id = rid
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self.channel.send(self.identity, infer, buffers)
        self._pending[rid] = fut
        if self.spec.stall_timeout_s:
            self._sent[rid] = self._loop.time()
        if on_settled is not None:
            self._settle[rid] = on_settled
        if stream is not None:
            # a decoupled batch: its inputs stay in use until every request is final
            self._streams[rid] = stream
        self.outstanding += 1
        return fut

    async def check_ready(self) -> tuple[bool, str]:
        """The model's own readiness check (python_backend's ``is_ready``): ``(ready, why
        not)``; ready without asking when the model has none. Callers while a check is in
        flight share its answer; no answer within ``READY_CHECK_TIMEOUT_S`` is "not ready"."""
        if not self.has_ready_check:
            return True, ""
        if not self.ready:
            return False, f"{self.label} is not ready"
        if self._ready_check is None or self._ready_check.done():
            self._ready_check = asyncio.ensure_future(self._ask_ready())
        return await asyncio.shield(self._ready_check)

    async def _ask_ready(self) -> tuple[bool, str]:
        env = wire.envelope(0)
        env.ready_check.SetInParent()
        try:
            reply, _ = await asyncio.wait_for(self.submit(env, []), READY_CHECK_TIMEOUT_S)
        except TimeoutError:
            return False, f"{self.label}: no answer from is_ready() within {READY_CHECK_TIMEOUT_S:g} s"
        except ServingError as exc:  # the process died meanwhile
            return False, exc.message
        if reply.WhichOneof("body") != "ready_answer":
            return False, f"{self.label}: unexpected answer to a readiness check"
        return reply.ready_answer.ready, reply.ready_answer.message

    def release(self, identity: bytes, blocks: list[wpb.ShmSlice]) -> None:
        """Hand output blocks back to the worker generation that wrote them."""
        if not blocks or identity != self.identity or not self.ready:
            return  # that process is gone, and its arena with it
        env = wire.envelope(0)
        env.release.blocks.extend(blocks)
        try:
            self.channel.send(identity, env)
        except ServingError:
            pass

    def cancel(self, rid: int, index: int) -> None:
        """Tell the worker that request ``index`` of batch ``rid`` lost its client (the model
        sees ``request.is_cancelled()``); nothing when the batch is already answered."""
        if rid not in self._pending and rid not in self._streams:
            return
        env = wire.envelope(rid)
        env.cancel.indexes.append(index)
        try:
            self.channel.send(self.identity, env)
        except ServingError:
            pass

    def ack(self, rid: int, index: int, count: int) -> None:
        """Tell the worker that ``count`` more responses of decoupled request ``index`` of
        batch ``rid`` were consumed (its response sender waits when too many are not)."""
        if rid not in self._streams:
            return
        env = wire.envelope(rid)
        env.stream_ack.index = index
        env.stream_ack.count = count
        try:
            self.channel.send(self.identity, env)
        except ServingError:
            pass

    def forget(self, region_ids: Sequence[int] = (), arena_prefixes: Sequence[str] = ()) -> None:
        """Tell the worker to unmap these client regions and the output arenas of these
        exited workers (it ignores what it never mapped)."""
        if not self.ready:
            return  # a restarting worker starts with no mappings
        env = wire.envelope(0)
        env.forget.region_ids.extend(region_ids)
        env.forget.arena_prefixes.extend(arena_prefixes)
        try:
            self.channel.send(self.identity, env)
        except ServingError:
            pass

    async def _supervise(self) -> None:
        """Run the process, and replace it whenever it exits, until ``stop``. Every failure
        here is caught, logged and retried with backoff (the first load's failure is
        reported to ``start`` instead): this task never dies."""
        backoff = 0.1
        while not self._stopping:
            started = time.monotonic()
            try:
                rc: int | None = await self._run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a spawn or load failure, or a bug
                err = exc if isinstance(exc, ServingError) else ServingError(f"{self.label}: {exc!r}")
                if not isinstance(exc, ServingError):
                    log.exception("%s: supervising the worker failed", self.label)
                self.reason = err.message
                if self._first_load is not None and not self._first_load.done():
                    self.state = WorkerState.FAILED
                    self._first_load.set_exception(err)
                    await self._reap()
                    return
                if self._stopping or self.server_stopping:  # stopped while it restarted
                    log.info("%s: stopped while restarting (%s)", self.label, err.message)
                    break
                log.error("%s: restart failed: %s", self.label, err.message)
                events.RECENT.add(events.RESTART_FAILED, self.spec.model_name, err.message, **self._where())
                rc = None
            if self._stopping or self.server_stopping:
                break
            if rc is not None and time.monotonic() - started > 30:
                backoff = 0.1
            self.state = WorkerState.RESTARTING
            self.restarts += 1
            if self.on_exit is not None:
                self.on_exit(self)
            if self._planned:
                self._planned = False
                log.info("%s: restarting on request", self.label)
                continue
            log.warning("%s: restarting in %.1f s", self.label, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.spec.restart_backoff_max_s)
        self.state = WorkerState.STOPPED

    async def _run_once(self) -> int:
        """Spawn, load, serve until the process exits; returns its exit status."""
        self.generation += 1
        self.identity = f"{self.spec.instance_name}#{self.generation}#{id(self)}".encode()
        self.arena_prefix = f"{self.arena_prefix_base}_g{self.generation}"
        self._hung = ""
        self.lane = ""
        self.lane_requests = 0
        hello: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[0] = hello
        self.channel.register(self.identity, self._on_message, self.spec.model_name)
        self.channel.register(self.identity + process.HEARTBEAT_SUFFIX, self._on_heartbeat)
        capture = output.Capture()
        try:
            out_fd, err_fd = capture.open()
            proc = await process.spawn(
                self.spec, endpoint=self.channel.endpoint, identity=self.identity, stdout=out_fd, stderr=err_fd
            )
        except BaseException as exc:
            capture.abort()
            self._pending.pop(0, None)
            self.channel.unregister(self.identity)
            self.channel.unregister(self.identity + process.HEARTBEAT_SUFFIX)
            if isinstance(exc, OSError):  # no descriptors left for its output pipes
                raise ServingError(
                    f"cannot start a worker process for {self.label}: {exc.strerror or exc}",
                    code=ErrorCode.UNAVAILABLE,
                ) from None
            raise
        self._proc = proc
        self.pid = proc.pid
        self._captures = [c for c in self._captures if not c.ended]
        try:
            await capture.start(self.logs, proc.pid)
            self._captures.append(capture)
        except Exception as exc:  # noqa: BLE001 - its output is lost; the worker still serves
            capture.close()
            log.warning("%s: cannot read the output of pid %d: %s", self.label, proc.pid, exc)
        self.last_beat = self._loop.time()
        exited = asyncio.ensure_future(proc.wait())
        watchdog: asyncio.Task[None] | None = None
        try:
            await self._handshake(hello, exited)
            self.state = WorkerState.READY
            self.reason = ""
            if self._first_load is not None and not self._first_load.done():
                self._first_load.set_result(None)
            log.info("%s: ready (pid %d)", self.label, proc.pid)
            if self.spec.heartbeat_timeout_s or self.spec.stall_timeout_s:
                watchdog = asyncio.create_task(self._watchdog(proc), name=f"watchdog {self.spec.instance_name}")
            rc = await exited
        except BaseException:
            exited.cancel()
            raise
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self.channel.unregister(self.identity)
            self.channel.unregister(self.identity + process.HEARTBEAT_SUFFIX)
        died = process.death_message(self._hung, rc)
        if self.server_stopping and not self._stopping:
            self.state = WorkerState.STOPPED  # not replaced: the server is shutting down
        elif not self._stopping:
            self.state = WorkerState.RESTARTING  # no new batches while its last output is read
        self._fail_pending(WorkerDied(f"{self.label} (pid {proc.pid}) {died}"))
        region.unlink_prefix(self.arena_prefix)
        await capture.wait_ended()  # its last lines (a traceback) before the line saying it died
        if self._planned:
            log.info("%s: pid %d exited for the requested restart", self.label, proc.pid)
        elif self.server_stopping and not self._stopping:
            log.info("%s: pid %d ended while the server stops (%s); not restarted", self.label, proc.pid, died)
        elif not self._stopping:
            log.error("%s: %s", self.label, died)
            events.RECENT.add(events.WORKER_EXITED, self.spec.model_name, f"pid {proc.pid} {died}", **self._where())
        return rc

    def _where(self) -> dict[str, Any]:
        return {"version": self.spec.model_version, "instance": self.spec.instance_name, "pid": self.pid}

    def _on_heartbeat(self, env: wpb.Envelope, frames: list[bytes]) -> None:
        self.last_beat = self._loop.time()

    async def _watchdog(self, proc: asyncio.subprocess.Process) -> None:
        """Kill the process when its heartbeats stop or a batch stays unanswered too long;
        the supervisor then fails its batches and starts a new one."""
        beat_timeout = self.spec.heartbeat_timeout_s
        stall = self.spec.stall_timeout_s
        step = min(t for t in (beat_timeout / 4, stall / 4, 1.0) if t > 0)
        while proc.returncode is None:
            expected = self._loop.time() + step
            await asyncio.sleep(step)
            now = self._loop.time()
            if now - expected > step:
                # the router's own loop was held up: heartbeats may be waiting unread in the
                # channel; judge on the next round, not on stale times
                self.last_beat = max(self.last_beat, now - step)
                continue
            why = ""
            if beat_timeout and now - self.last_beat > beat_timeout:
                why = f"stopped answering (no heartbeat for {now - self.last_beat:.0f} s)"
            elif stall and self._sent and now - min(self._sent.values()) > stall:
                why = f"stopped answering (a batch unanswered for {now - min(self._sent.values()):.0f} s)"
            if why and proc.returncode is None:
                self._hung = why
                log.error("%s (pid %d) %s; killing it", self.label, proc.pid, why)
                proc.kill()
                return

    async def _handshake(self, hello: asyncio.Future[Reply], exited: asyncio.Future[int]) -> None:
        timeout = self.spec.load_timeout_s
        await self._await_or_exit(hello, exited, timeout, "connect")
        load = wire.envelope(0)
        load.load.CopyFrom(self.spec.load)
        load.load.arena_prefix = self.arena_prefix
        loaded: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[0] = loaded
        self.channel.send(self.identity, load)
        env, _ = await self._await_or_exit(loaded, exited, timeout, "load")
        if env.WhichOneof("body") == "failed":
            err = wire.to_error(env.failed)
            await process.terminate(self._proc)
            raise ServingError(f"failed to load {self.label}: {err.message}", code=err.code)
        self.has_ready_check = env.ready.has_ready_check
        self.lane = env.ready.lane

    async def _await_or_exit(
        self, fut: asyncio.Future[Reply], exited: asyncio.Future[int], timeout: float, what: str
    ) -> Reply:
        waiting: set[asyncio.Future[Any]] = {fut, exited}
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        self._pending.pop(0, None)
        if exited in done:
            how = process.death_message(self._hung, exited.result())
            raise ServingError(f"failed to load {self.label}: worker {how} during {what}", code=ErrorCode.UNAVAILABLE)
        await process.terminate(self._proc)
        raise ServingError(
            f"failed to load {self.label}: no answer within {timeout:g} s during {what}", code=ErrorCode.UNAVAILABLE
        )

    def _on_message(self, env: wpb.Envelope, frames: list[bytes]) -> None:
        body = env.WhichOneof("body")
        rid = env.request_id
        if body == "streamed":
            self._on_streamed(rid, env.streamed, frames)
            return
        if body == "pong" and rid not in self._pending:
            return  # a keep-alive answer nobody waits for
        if body == "failed" and rid in self._streams:
            self._streams.pop(rid).fail(wire.to_error(env.failed))
        elif rid in self._streams and body == "infer_done" and env.infer_done.rescheduled:
            stream = self._streams[rid]
            stream.ended(env.infer_done.rescheduled)  # they run again in a later batch
            if stream.closed:
                del self._streams[rid]
        fut = self._pending.pop(rid, None)
        if rid and fut is not None:
            self._sent.pop(rid, None)
            self._settled(rid)
        if fut is not None and not fut.done():
            fut.set_result((env, frames))
        elif body == "infer_done":
            # the request was abandoned: give any output blocks straight back
            blocks = shm_outputs(env.infer_done)
            if blocks:
                self.release(self.identity, blocks)

    def _on_streamed(self, rid: int, msg: wpb.Streamed, frames: list[bytes]) -> None:
        stream = self._streams.get(rid)
        if stream is None:  # nobody listens (the batch failed): give its output blocks back
            if msg.HasField("result"):
                blocks = [ref.shm for ref in msg.result.outputs if ref.WhichOneof("location") == "shm"]
                self.release(self.identity, blocks)
            return
        stream.on(msg.index, msg.result if msg.HasField("result") else None, frames, msg.final)
        if stream.closed:
            del self._streams[rid]
            if rid not in self._pending:  # execute has returned too: the inputs are free
                settle = self._settle.pop(rid, None)
                if settle is not None:
                    settle()

    def _settled(self, rid: int) -> None:
        self.outstanding -= 1
        if rid in self._streams:
            return  # a decoupled batch still streaming: its inputs are given back at its end
        settle = self._settle.pop(rid, None)
        if settle is not None:
            settle()

    def _fail_pending(self, err: ServingError) -> None:
        pending, self._pending = self._pending, {}
        streams, self._streams = self._streams, {}
        self._sent.clear()
        for stream in streams.values():
            stream.fail(err)
        for rid, fut in pending.items():
            if rid:
                self._settled(rid)
            if fut.done():
                continue
            if rid:
                fut.set_exception(err)
            else:  # a handshake's: only the supervising task awaits it, and that one was cancelled
                fut.cancel()  # (an exception set here was logged as never retrieved)
        settles, self._settle = self._settle, {}
        for settle in settles.values():  # streams whose execute had returned
            settle()

    async def _reap(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            await process.terminate(self._proc)
        region.unlink_prefix(self.arena_prefix)

    async def restart(self, drain_timeout_s: float) -> None:
        """An operator's restart: no new work goes here, in-flight batches get up to
        ``drain_timeout_s`` to finish, then the process is replaced (its model loads
        again). Returns once the new process is READY; raises ``ServingError`` otherwise."""
        if self.state is not WorkerState.READY:
            raise ServingError(f"{self.label} is {self.state.value}, not READY", code=ErrorCode.FAILED_PRECONDITION)
        generation = self.generation
        self.state = WorkerState.DRAINING
        deadline = time.monotonic() + drain_timeout_s
        while self.outstanding > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._planned = True
        try:
            self.channel.send(self.identity, _shutdown())
        except ServingError:
            self.kill()
        # a busy backend gets the drain time again to finish and exit, then is killed
        kill_at = time.monotonic() + drain_timeout_s + 5.0
        give_up = kill_at + self.spec.load_timeout_s + 5.0
        while not (self.generation > generation and self.state is WorkerState.READY):
            if self.state in (WorkerState.FAILED, WorkerState.STOPPED) or time.monotonic() > give_up:
                raise ServingError(f"{self.label} did not come back after the restart", code=ErrorCode.UNAVAILABLE)
            if self.generation == generation and time.monotonic() > kill_at:
                self.kill()
            await asyncio.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal to the worker process (operators and tests)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(sig)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the worker to shut down (its backend finalizes), kill it after ``timeout_s``."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None and self.state is not WorkerState.READY:
            # starting or restarting: it may not be connected yet, so a Shutdown message
            # could be lost (and the worker would wait for work until killed): terminate it
            await process.terminate(self._proc, min(timeout_s, 5.0))
        if proc is not None and proc.returncode is None:
            try:
                self.channel.send(self.identity, _shutdown())
            except ServingError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), timeout_s)
            except TimeoutError:
                log.warning("%s: did not stop within %.0f s; killing it", self.label, timeout_s)
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, ServingError):
                pass
        self.state = WorkerState.STOPPED
        self._fail_pending(ServingError(f"{self.label} stopped", code=ErrorCode.UNAVAILABLE))
        for capture in self._captures:
            await capture.wait_ended()
            capture.close()  # a child of the model still holds its pipes: stop reading them
        self._captures = []
        region.unlink_prefix(self.arena_prefix_base)
        if self.on_exit is not None:
            self.on_exit(self)  # the router and other workers drop their mappings of its arena


def _shutdown() -> wpb.Envelope:
    env = wire.envelope(0)
    env.shutdown.SetInParent()
    return env


def shm_outputs(done: wpb.InferDone) -> list[wpb.ShmSlice]:
    """The output blocks a reply names in its worker's arena."""
    return [o.shm for r in done.results for o in r.outputs if o.WhichOneof("location") == "shm"]
