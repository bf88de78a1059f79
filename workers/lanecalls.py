"""A worker's BLS calls over lanes: a call to a model version the router publishes goes
straight to one of its workers' lane sockets (``workers.lanes``), as a frontend process sends
a client's request (``server.frontproc.lanes_client``), instead of through the router.

DESIGN (issue 16: a BLS hop at most 1.5x a client request's server-side time). Through the
router a call crosses four process wake-ups (caller -> router -> target -> router -> caller)
where a client's request crosses two (router -> worker -> router): on the 2-core dev box
``bls_identity``'s ``exec()`` took 0.46 ms against a direct request's 0.21 ms (2.15x). Over a
lane it crosses two. The router publishes its lane table (``LaneRoutes``, the versions that
need nothing of it per request: ``server.frontproc.lanes.eligible``) to the workers of Python
models as it does to frontend processes; a call goes over a lane when its target has a route
and the call uses nothing only the router has (a timeout, sequence ids and flags, a trace,
reserved parameters, ``decoupled=True``). The caller checks it with the router's own
``proto.validation`` (same errors), reports it for the target's statistics (``LaneStats``,
sent at once; the router's statistics reads wait for them with ``LaneFlush``), and reads the
answer on the inbox's poll (``workers.inbox``), so router messages keep being read while the
model waits. A model never calls its own instance over a lane (it would wait for itself): with
no other instance the call goes through the router, which refuses it.

A target that exits says ``LaneBye``: calls it had not answered were not executed and go
through the router (which knows the model's state now). A target that dies without it fails
its calls as the router fails a dead worker's requests.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any, Final

from shoal.proto import framing, wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.validation import ConfigSignature, signature
from shoal.workers.outbox import Outbox

log = logging.getLogger("shoal.worker")

RID_BITS: Final = (1 << 63) | (1 << 62)
"""Set in the request ids of a worker's lane calls (a frontend's have bit 63 alone; a
worker's router never sets either): with the caller's pid above bit 32 they are unique among
every client of a target worker, whose cancellations are keyed by request id."""
SEND_TIMEOUT_S: Final = 10
LOST: Final = wpb.Envelope()
"""Filed for a call whose lane ended before its answer (compared by identity)."""
_NOWAIT: Final = socket.MSG_DONTWAIT


class OutLane:
    """This worker's connection to another worker's lane socket."""

    __slots__ = ("path", "label", "pid", "sock", "fd", "decoder", "outbox", "pending", "bye", "broken")

    def __init__(self, path: str, label: str, pid: int, sock: socket.socket) -> None:
        self.path = path
        self.label = label
        self.pid = pid
        self.sock = sock
        self.fd = sock.fileno()
        self.decoder = framing.Decoder()
        self.outbox = Outbox(sock)
        self.pending: dict[int, int] = {}
        """Request id -> call id of the calls sent and not answered."""
        self.bye = False
        self.broken = False
        """No new calls (its worker said bye, or the connection ended)."""

    @property
    def load(self) -> int:
        return len(self.pending)


class Route:
    __slots__ = ("sig", "targets", "turn")

    def __init__(self, sig: ConfigSignature, targets: list[wpb.Lane]) -> None:
        self.sig = sig
        self.targets = targets
        self.turn = 0


class LaneCalls:
    """The lanes a worker calls other models over. ``update`` and ``readable`` run on the
    thread reading the inbox (its read lock held); calls on any thread."""

    def __init__(
        self,
        own_path: str,
        watch: Callable[[int], None],
        unwatch: Callable[[int], None],
        deliver: Callable[[int, tuple[wpb.Envelope, list[Any]]], bool],
        orphan: Callable[[OutLane, int, wpb.Envelope | None], None],
    ) -> None:
        self.own_path = own_path
        self._watch = watch
        self._unwatch = unwatch
        self._deliver = deliver
        self._orphan = orphan
        """Takes the answer of a call nobody waits for any more (None: its lane ended)."""
        self.routes: dict[tuple[str, int], Route] = {}
        self.by_path: dict[str, OutLane] = {}
        self.by_fd: dict[int, OutLane] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count((os.getpid() & 0x3FFFFFFF) << 32 | 1)
        self._view = memoryview(bytearray(framing.RECV_BYTES))

    # ---- the table (the reading thread) ------------------------------------------------------

    def update(self, table: wpb.LaneRoutes) -> None:
        """The router's current routes (replace the last ones)."""
        old = {(r.sig.name, r.sig.version): r.sig for r in self.routes.values()}
        routes: dict[tuple[str, int], Route] = {}
        listed: set[str] = set()
        for r in table.routes:
            key = (r.model_name, int(r.model_version))
            sig = old.get(key)
            if sig is None or sig.config_bytes != r.model_config:
                sig = signature(r.model_name, int(r.model_version), r.model_config)
            if sig.config.model_transaction_policy.decoupled:
                continue  # streams come from frontends; a call to one goes through the router (its errors)
            targets = [t for t in r.lanes if t.path != self.own_path]
            listed.update(t.path for t in targets)
            if not targets:
                continue
            route = Route(sig, targets)
            routes[key] = route
            if r.latest:
                routes[(r.model_name, -1)] = route
        self.routes = routes
        with self._lock:
            gone = [o for p, o in self.by_path.items() if p not in listed and not o.pending]
        for out in gone:  # no longer published (its worker stops, or restarted)
            self._close(out)

    # ---- calls (any thread) ------------------------------------------------------------------

    def route(self, model: str, version: int, parameters_json: str) -> Route | None:
        """Where a call may go over a lane (None: through the router)."""
        route = self.routes.get((model, version)) if self.routes else None
        if route is None:
            return None
        if parameters_json and parameters_json != "{}":
            try:
                params = json.loads(parameters_json)
            except ValueError:
                return None  # the router answers it
            if not isinstance(params, dict) or any(k in wire.RESERVED_PARAMETERS for k in params):
                return None
        return route

    def pick(self, route: Route) -> OutLane | None:
        """The target with the fewest of this worker's calls, in turn among equals; None when
        none can be reached (the call goes through the router)."""
        targets = route.targets
        n = len(targets)
        start = route.turn
        route.turn = (start + 1) % n
        best: wpb.Lane | None = None
        best_load = 0
        by_path = self.by_path
        for i in range(n):
            t = targets[(start + i) % n]
            out = by_path.get(t.path)
            if out is not None and out.broken:
                continue
            load = out.load if out is not None else 0
            if best is None or load < best_load:
                best, best_load = t, load
        if best is None:
            return None
        return by_path.get(best.path) or self._connect(best)

    def _connect(self, t: wpb.Lane) -> OutLane | None:
        with self._lock:
            out = self.by_path.get(t.path)
            if out is not None:
                return None if out.broken else out
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(t.path)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            except OSError as exc:
                log.debug("no lane to %s: %s", t.label, exc)
                sock.close()
                return None
            out = OutLane(t.path, t.label, t.pid, sock)
            self.by_path[t.path] = out
            self.by_fd[out.fd] = out
        self._watch(out.fd)
        return out

    def new_id(self, out: OutLane, call_id: int) -> int:
        """A request id for ``call_id`` on ``out``, whose answer (or end) will be filed for
        it; 0 when ``out`` closed meanwhile."""
        rid = RID_BITS | next(self._ids)
        with self._lock:
            if out.broken or self.by_fd.get(out.fd) is not out:
                return 0
            out.pending[rid] = call_id
        return rid

    def send(self, out: OutLane, env: wpb.Envelope, frames: list[Any]) -> bool:
        """Whether the message was written (else the lane is broken)."""
        try:
            out.outbox.send([env.SerializeToString(), *frames])
        except OSError as exc:
            log.debug("lane to %s: %s", out.label, exc)
            out.broken = True
            return False
        return True

    def release(self, out: OutLane, blocks: list[wpb.ShmSlice]) -> None:
        """Output blocks read: the target may reuse them."""
        if out.broken and out.bye:
            return
        env = wire.envelope(0)
        env.release.blocks.extend(blocks)
        self.send(out, env, [])

    def cancel(self, out: OutLane, rid: int) -> None:
        env = wire.envelope(rid)
        env.cancel.request_id = rid
        env.cancel.indexes.append(0)
        self.send(out, env, [])

    # ---- answers (the reading thread) --------------------------------------------------------

    def readable(self, fd: int) -> None:
        out = self.by_fd.get(fd)
        if out is None:
            return
        view = self._view
        try:
            n = out.sock.recv_into(view, 0, _NOWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n = 0
        messages: list[list[Any]] = []
        if n:
            try:
                messages = out.decoder.feed(view[:n])
            except framing.FramingError as exc:
                log.error("lane to %s: %s; closing it", out.label, exc)
                n = 0
        for frames in messages:
            env = wire.parse(frames[0])
            if env.WhichOneof("body") == "lane_bye":
                out.bye = out.broken = True
                continue
            with self._lock:
                call_id = out.pending.pop(env.request_id, None)
            if call_id is not None and not self._deliver(call_id, (env, frames[1:])):
                self._orphan(out, call_id, env)
        if not n:
            self._close(out)

    def _close(self, out: OutLane) -> None:
        """The lane ended (or is no longer published): calls it had not answered are lost."""
        out.broken = True
        with self._lock:
            if self.by_path.get(out.path) is out:
                del self.by_path[out.path]
            self.by_fd.pop(out.fd, None)
            pending, out.pending = out.pending, {}
        self._unwatch(out.fd)
        out.sock.close()
        for call_id in pending.values():
            if not self._deliver(call_id, (LOST, [])):
                self._orphan(out, call_id, None)

    def close(self) -> None:
        for out in list(self.by_path.values()):
            self._close(out)
