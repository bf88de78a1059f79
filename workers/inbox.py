"""``Inbox``: a worker's connection to the router (and its lanes), read by whichever thread
needs a message.

The main loop reads router messages (``next``); a thread waiting for the reply to a BLS call
(``reply``) may be the main thread itself, inside the model's ``execute``, so it cannot wait
for the main loop to read for it. Whoever holds the read lock reads one message and files
it: a reply (BLS, custom metric) goes to the queue of its call, anything else to the main loop's backlog.

Once the model has a lane socket (``workers.lanes``, ``attach``), the reader waits on the
router's socket, the lane listener and every lane at once, and files what each brings: a
lane's ``Infer`` and ``Release`` go to the backlog with their lane, its ``Cancel`` is noted at
once as the router's are, a lane that ended is filed as ``lanes.CLOSED``.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from shoal.proto import framing, streamflow, wire
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.lanecalls import LaneCalls
from shoal.workers.lanes import CLOSED, NO_FRAMES, READABLE, Lane, LaneServer

log = logging.getLogger("shoal.worker")

Message = tuple[wpb.Envelope, list[bytes]]
Incoming = tuple[wpb.Envelope, list[bytes], Lane | None]
"""A message for the main loop and the lane it came from (None: the router)."""
_T = TypeVar("_T")
_LANE_BACKLOG = frozenset({"infer", "release"})
"""A lane's messages for the main loop (a release only when nobody takes it at once: ``on_release``)."""
_POLL_ROUNDS = 64
_MAX_ARRIVALS = 4096
"""Rounds of reads ``is_cancelled`` does at most (every connection that has data, each)."""
_REPLIES = frozenset({"bls_reply", "metric_reply", "control_reply"})
"""Answers to a call a thread waits for (by ``call_id``)."""


def take_from(backlog: deque[_T], pick: Callable[[_T], bool], full: Callable[[], bool]) -> list[_T]:
    """Remove and return, in order, the items of ``backlog`` that ``pick`` accepts until
    ``full()``, in one pass (the others keep their order)."""
    if not backlog:
        return []
    taken: list[_T] = []
    kept: list[_T] = []
    for i, item in enumerate(backlog):
        if full():
            kept.extend(itertools.islice(backlog, i, None))
            break
        (taken if pick(item) else kept).append(item)
    if taken:
        backlog.clear()
        backlog.extend(kept)
    return taken


_OWN_POOLS = ("shoal-read", "shoal-ready")
"""Name prefixes of the worker's own thread pools (``clientshm``, ``runtime``)."""


def _busy_poll_ns() -> int:
    try:
        return max(0, int(os.environ.get("SHOAL_BUSY_POLL_US", "0"))) * 1000
    except ValueError:
        return 0


class Inbox:
    def __init__(self, conn: framing.Connection) -> None:
        self.conn = conn
        self._read = threading.Lock()
        self._cond = threading.Condition()
        self._backlog: deque[Incoming] = deque()
        self._replies: dict[int, deque[Message]] = {}
        self.orphans: deque[Message] = deque()
        """Replies to calls nobody waits for any more (their held outputs must be given back)."""
        self._eof = False
        self._ids = itertools.count(1)
        self.cancelled: set[tuple[int, int]] = set()
        """(batch request id, index) of requests whose clients went away (``Cancel``)."""
        self.acked: dict[tuple[int, int], int] = {}
        """(batch request id, index) -> a decoupled request's responses the router passed on."""
        self.unread: dict[tuple[int, int], deque[tuple[int, int]]] = {}
        """(batch request id, index) -> (number, arena bytes) of a decoupled request's
        responses that hold arena blocks, sent and not yet acknowledged (``note_sent``)."""
        self.on_release: Callable[[wpb.Release, Lane | None], None] | None = None
        """Takes a ``Release`` (the router's, or a lane's with its lane) as soon as it is read,
        by whichever thread reads it; None: it goes to the main loop's backlog."""
        self.on_ready_check: Callable[[int], None] | None = None
        """Takes a ``ReadyCheck``'s request id as soon as it is read (the model's own
        readiness check runs on a thread of its own, beside ``execute``)."""
        self.lanes: LaneServer | None = None
        """The model's lane socket and its connections (``attach``); None: the router alone."""
        self._router_fd = -1
        self.calls: LaneCalls | None = None
        """Lanes this worker's BLS calls go over (``workers.lanecalls``): read here too."""
        self.services: dict[str, Callable[[wpb.Envelope], None]] = {}
        """Router messages taken at once by the reading thread, by body (``lane_routes``),
        outside the inbox's locks but the read lock."""
        self._wake_r = self._wake_w = -1
        self.spin_ns = _busy_poll_ns()
        """``--busy-poll-us`` (``SHOAL_BUSY_POLL_US``): a wait for the lanes polls without
        sleeping this long first, while no thread but the worker's own may want the GIL
        (``_may_spin``)."""
        self._threads_seen = 0
        self._spin_ok = False
        self.arrivals: dict[int, int] | None = None
        """When each lane request was read, by ``id`` of its envelope (a worker that batches
        lane requests waits its queue delay from the first one's arrival, ``workers.lanebatch``)."""

    def attach(self, lanes: LaneServer) -> None:
        """Read ``lanes`` too from now on (beside the router's connection)."""
        self._router_fd = fd = self.conn.sock.fileno()
        lanes.poller.register(fd, READABLE)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        lanes.poller.register(self._wake_r, READABLE)
        self.lanes = lanes

    def watch(self, fd: int) -> None:
        """Read ``fd`` (a lane this worker calls over) too, from any thread: the thread waiting
        in ``poll`` is woken so that it waits on it from now on."""
        assert self.lanes is not None
        self.lanes.poller.register(fd, READABLE)
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:
            pass  # woken already

    def unwatch(self, fd: int) -> None:
        if self.lanes is not None:
            try:
                self.lanes.poller.unregister(fd)
            except (KeyError, ValueError):
                pass

    def deliver(self, call_id: int, message: Message) -> bool:
        """File a reply that came another way than the router's (a lane's answer to a call);
        False when nobody waits for ``call_id`` any more."""
        with self._cond:
            queue = self._replies.get(call_id)
            if queue is None:
                return False
            queue.append(message)
            self._cond.notify_all()
        return True

    @property
    def backlog(self) -> bool:
        """Whether messages for the main loop are waiting (a look, without the lock)."""
        return bool(self._backlog)

    def take_all(self, pick: Callable[[Incoming], bool], full: Callable[[], bool]) -> list[Incoming]:
        """Remove and return, in order, every message for the main loop that ``pick``
        accepts, until ``full()`` (``take_from``, under the lock)."""
        with self._cond:
            return take_from(self._backlog, pick, full)

    def take_first(self, pick: Callable[[Incoming], bool]) -> Incoming | None:
        """Remove and return the first message for the main loop if ``pick`` accepts it."""
        with self._cond:
            if self._backlog and pick(self._backlog[0]):
                return self._backlog.popleft()
        return None

    def read_now(self, timeout_ms: int) -> None:
        """File what has arrived, waiting up to ``timeout_ms`` for something, unless another
        thread reads (then wait that long for it to file something)."""
        if self._read.acquire(blocking=False):
            try:
                if self.lanes is not None:
                    self._pump_all(timeout_ms)
                elif self.conn.poll(timeout_ms):
                    self._pump()
            except EOFError:
                pass  # the main loop meets it in ``next``
            finally:
                self._read.release()
        elif timeout_ms > 0:
            with self._cond:
                self._cond.wait(timeout_ms / 1000)

    def drop(self, call_id: int) -> list[Message]:
        """Stop waiting for ``call_id``: the replies filed but not read (later ones are not
        delivered, ``deliver`` says so)."""
        with self._cond:
            return list(self._replies.pop(call_id, ()))

    def new_call(self) -> int:
        """A call id no other waiting call has; replies to it will be kept (``expect``)."""
        call_id = next(self._ids)
        self.expect(call_id)
        return call_id

    def _pump(self) -> None:
        """Read one message (the read lock is held) and file it; with lanes, wait for any
        of the connections and file what it brings (any number of messages)."""
        if self.lanes is not None:
            self._pump_all(None)
            return
        try:
            frames = self.conn.recv()
        except EOFError:
            self._at_eof()
            raise
        self._file(frames)

    def _at_eof(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _file(self, frames: list[bytes]) -> None:
        """File a router message."""
        env = wire.parse(frames[0])
        body = env.WhichOneof("body")
        service = self.services.get(body) if self.services and body is not None else None
        if service is not None:
            service(env)
            return
        if body == "release" and self.on_release is not None:
            self.on_release(env.release, None)
            return
        with self._cond:
            if body == "cancel":  # filed at once: a model may be polling is_cancelled()
                rid = env.request_id
                self.cancelled.update((rid, i) for i in env.cancel.indexes)
            elif body == "ready_check" and self.on_ready_check is not None:
                self.on_ready_check(env.request_id)
            elif body == "stream_ack":  # filed at once: a response sender may be waiting for it
                self._acked((env.request_id, env.stream_ack.index), env.stream_ack.count)
            elif body in _REPLIES:
                queue = self._replies.get(getattr(env, body).call_id)
                (queue if queue is not None else self.orphans).append((env, frames[1:]))
            else:
                self._backlog.append((env, frames[1:], None))
            self._cond.notify_all()

    def _pump_all(self, timeout_ms: int | None) -> bool:
        """(the read lock held; lanes attached) Wait up to ``timeout_ms`` (None: for ever)
        for the router's connection, the lane listener or a lane, and file what one read of
        each ready one brings. Whether anything was ready; ``EOFError`` when the router
        closed its connection."""
        conn = self.conn
        ready = conn.decoded  # messages of the router's already decoded (a read brings several)
        if ready:
            while ready:
                self._file(ready.pop(0))
            return True
        lanes = self.lanes
        assert lanes is not None
        if self.spin_ns and timeout_ms != 0 and self._may_spin():
            events = self._spin(lanes.poller, timeout_ms)
        else:
            events = lanes.poller.poll(timeout_ms)
        if not events:
            return False
        router_fd, listen_fd, by_fd = self._router_fd, lanes.listen_fd, lanes.lanes
        for fd, _ in events:
            if fd == router_fd:
                if not conn.fill():
                    self._at_eof()
                    raise EOFError("the router closed the connection")
                while ready:
                    self._file(ready.pop(0))
            elif fd == listen_fd:
                lanes.accept()
            elif fd == self._wake_r:
                try:
                    while os.read(fd, 64):
                        pass
                except BlockingIOError:
                    pass
            elif (calls := self.calls) is not None and fd in calls.by_fd:
                calls.readable(fd)
            else:
                lane = by_fd.get(fd)
                if lane is None:
                    continue  # dropped meanwhile
                messages = lanes.read(lane)
                if messages is None:
                    self._lane_ended(lanes, lane)
                elif messages:
                    self._file_lane(lanes, lane, messages)
        return True

    def _may_spin(self) -> bool:
        """Whether every other thread is one of the worker's own (the heartbeat, the pools
        that read client regions or run readiness checks, whose work the main thread waits
        for or which rarely run): a thread of a model or a backend that wants the GIL would
        wait a whole switch interval (5 ms) for each turn while the main thread spins, since
        it takes the GIL back at once after each poll. Looked at again when the count changes."""
        count = threading.active_count()
        if count != self._threads_seen:
            self._threads_seen = count
            main = threading.main_thread()
            self._spin_ok = all(
                t is main or t.name == "heartbeat" or t.name.startswith(_OWN_POOLS) for t in threading.enumerate()
            )
        return self._spin_ok

    def _spin(self, poller: select.poll, timeout_ms: int | None) -> list[tuple[int, int]]:
        """``poller.poll(timeout_ms)``, polling without sleeping for the first ``spin_ns``."""
        end = time.monotonic_ns() + self.spin_ns
        poll = poller.poll
        events = poll(0)
        while not events:
            if time.monotonic_ns() >= end:
                return poll(timeout_ms)
            os.sched_yield()  # a process that has work on this core runs first
            events = poll(0)
        return events

    def _file_lane(self, lanes: LaneServer, lane: Lane, messages: list[list[Any]]) -> None:
        """File the messages of a lane: ``Infer`` for the main loop, ``Release`` given to
        ``on_release`` (else the main loop), ``Cancel`` and ``StreamAck`` (a decoupled
        model's sender may wait for it) noted at once; anything else is logged and ignored."""
        arrivals = self.arrivals
        now = time.monotonic_ns() if arrivals is not None else 0
        parsed: list[tuple[wpb.Envelope, list[Any], str | None]] = []
        broken = False
        on_release = self.on_release
        for frames in messages:
            try:
                env = wire.parse(frames[0])
            except ServingError as exc:
                log.error("lane %d: %s; closing it", lane.fd, exc.message)
                broken = True
                break
            kind = env.WhichOneof("body")
            if kind == "release" and on_release is not None:
                on_release(env.release, lane)  # outside the inbox's lock (it takes the worker's)
            else:
                parsed.append((env, frames, kind))
        with self._cond:  # one lock and one wake-up for the read's messages (a read brings many)
            filed = False
            for env, frames, body in parsed:
                if body in _LANE_BACKLOG:
                    self._backlog.append((env, frames[1:], lane))
                    if arrivals is not None and body == "infer":
                        if len(arrivals) > _MAX_ARRIVALS:  # stamps of requests nobody batched (dead lanes)
                            arrivals.clear()
                        arrivals[id(env)] = now
                elif body == "cancel":  # the frontend names the request in the body; the router in the envelope
                    rid = env.cancel.request_id or env.request_id
                    self.cancelled.update((rid, i) for i in env.cancel.indexes)
                elif body == "stream_ack":
                    self._acked((env.request_id, env.stream_ack.index), env.stream_ack.count)
                else:
                    log.error("lane %d: unexpected message %s; ignored", lane.fd, body)
                    continue
                filed = True
            if filed:
                self._cond.notify_all()
        if broken:
            self._lane_ended(lanes, lane)

    def _lane_ended(self, lanes: LaneServer, lane: Lane) -> None:
        """Stop reading ``lane``; the main loop drops it (``CLOSED``)."""
        lanes.stop_reading(lane)
        with self._cond:
            self._backlog.append((CLOSED, NO_FRAMES, lane))
            self._cond.notify_all()

    def _wait_for(self, ready: deque[_T], timeout_s: float | None) -> _T:
        while True:
            with self._cond:
                if ready:
                    return ready.popleft()
                if self._eof:
                    raise EOFError("the router closed the connection")
            if self._read.acquire(blocking=False):
                try:
                    with self._cond:
                        if ready:
                            return ready.popleft()
                    self._pump()
                finally:
                    self._read.release()
            else:
                with self._cond:
                    if not ready and not self._eof:
                        self._cond.wait(timeout_s if timeout_s is not None else 0.1)

    def is_cancelled(self, rid: int, index: int) -> bool:
        """Whether request ``index`` of batch ``rid`` was cancelled; reads what has arrived
        if no other thread is reading (a model polling from inside ``execute``)."""
        if (rid, index) in self.cancelled:
            return True
        if self._read.acquire(blocking=False):
            try:
                if self.lanes is not None:
                    for _ in range(_POLL_ROUNDS):
                        if not self._pump_all(0):
                            break
                else:
                    while self.conn.poll(0):
                        self._pump()
            except EOFError:
                pass
            finally:
                self._read.release()
        return (rid, index) in self.cancelled

    def note_sent(self, rid: int, index: int, number: int, nbytes: int) -> None:
        """(any thread, before the response is written) Response ``number`` (0, 1, ...) of
        request ``index`` of batch ``rid`` holds ``nbytes`` of the arena."""
        k = (rid, index)
        sizes = self.unread.get(k)
        if sizes is None:
            sizes = self.unread.setdefault(k, deque())
        sizes.append((number, nbytes))

    def _acked(self, k: tuple[int, int], count: int) -> None:
        """(``_cond`` held) ``count`` more responses of ``k`` were taken by their consumer."""
        self.acked[k] = acked = self.acked.get(k, 0) + count
        sizes = self.unread.get(k)
        while sizes and sizes[0][0] < acked:
            sizes.popleft()

    def _must_wait(self, k: tuple[int, int], number: int) -> bool:
        """Whether response ``number`` of ``k`` waits (``proto.streamflow``)."""
        acked = self.acked.get(k, 0)
        unacked = number - acked
        if unacked >= streamflow.WINDOW:
            return True
        if unacked < streamflow.ACK_EVERY:
            return False
        sizes = self.unread.get(k)
        if not sizes:
            return False
        return sum([n for i, n in list(sizes) if i >= acked]) >= streamflow.BYTES

    def wait_credit(self, rid: int, index: int, sent: int, gone: Callable[[], bool] | None = None) -> None:
        """Block while the ``sent`` responses of request ``index`` of batch ``rid`` already
        sent hold too much unacknowledged (``proto.streamflow``: ``WINDOW`` responses, or
        ``BYTES`` of the arena in ``ACK_EVERY`` or more), or until the request is cancelled, the
        router is gone, or ``gone()`` (a lane's client left); reads messages meanwhile if no
        other thread does (a model sending from inside ``execute``)."""
        k = (rid, index)
        if not self._must_wait(k, sent):  # no lock: acknowledgements only free credit meanwhile
            return
        while True:
            with self._cond:
                if not self._must_wait(k, sent) or k in self.cancelled or self._eof:
                    return
                if gone is not None and gone():
                    return
            if self._read.acquire(blocking=False):
                try:
                    with self._cond:
                        if not self._must_wait(k, sent) or k in self.cancelled:
                            return
                    self._pump()
                except EOFError:
                    return
                finally:
                    self._read.release()
            else:
                with self._cond:
                    if self._must_wait(k, sent) and k not in self.cancelled and not self._eof:
                        self._cond.wait(0.05)

    def forget_stream(self, rid: int, index: int) -> None:
        """A decoupled request sent its final response: its acknowledgements no longer matter."""
        with self._cond:
            self.acked.pop((rid, index), None)
            self.unread.pop((rid, index), None)

    def forget_cancelled(self, rid: int, index: int | None = None) -> None:
        """The batch (or one request of it) is answered: its cancellation no longer matters."""
        with self._cond:
            if index is not None:
                self.cancelled.discard((rid, index))
            elif self.cancelled:
                self.cancelled = {c for c in self.cancelled if c[0] != rid}

    def next(self) -> Incoming:
        """The next message for the main loop and the lane it came from (None: the router;
        ``lanes.CLOSED`` with a lane: it ended); blocks; ``EOFError`` at the router's end."""
        return self._wait_for(self._backlog, None)

    def expect(self, call_id: int) -> None:
        """Replies to ``call_id`` will be waited for (call before sending the call)."""
        with self._cond:
            self._replies[call_id] = deque()

    def reply(self, call_id: int) -> Message:
        """The next reply to ``call_id`` (blocks)."""
        queue = self._replies[call_id]
        return self._wait_for(queue, 0.05)

    def forget(self, call_id: int) -> None:
        """No more replies to ``call_id`` are wanted; late ones become orphans."""
        with self._cond:
            left = self._replies.pop(call_id, None)
            if left:
                self.orphans.extend(left)
