"""Lanes (``workers.lanes``): a real worker process (``python -m shoal.workers``) driven by a
fake router over the channel socket, with fake frontends on the worker's lane socket
(``Ready.lane``): lane requests are answered on their lane, beside the router's; output
blocks are freed by a lane's ``Release`` or when its client goes; ``Cancel`` reaches the
model; the worker says ``LaneBye`` on every lane before it exits; a lane that sends garbage is
dropped and the router's connection never notices."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.proto import framing, wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper
from tests.unit.test_worker_stream import FakeRouter as StreamRouter

pytestmark = pytest.mark.timeout(60)

MODELS = Path(__file__).resolve().parents[1] / "models"
RID_BIT = 1 << 63
INLINE_MAX = 32768
ARENA_BYTES = 1 << 20  # a worker's arena may grow to 16 times it
BIG = 65536  # float32 elements: 256 KiB, in the arena (above INLINE_MAX)


def _recv_more(sock: socket.socket, decoder: framing.Decoder, ready: list[list[Any]]) -> None:
    try:
        data = sock.recv(1 << 16)
    except ConnectionResetError:
        data = b""
    if not data:
        raise EOFError
    ready.extend(decoder.feed(data))


def _nothing_for(sock: socket.socket, decoder: framing.Decoder, ready: list[list[Any]], seconds: float) -> bool:
    if ready:
        return False
    sock.settimeout(seconds)
    try:
        _recv_more(sock, decoder, ready)
    except TimeoutError:
        return True
    finally:
        sock.settimeout(30)
    return False


class FakeRouter(StreamRouter):
    """``test_worker_stream``'s fake router, with the worker's lane and clients of it."""

    def __init__(self, model: str, folder: str | None = None, lanes: bool = True) -> None:
        super().__init__(model, folder, arena_bytes=ARENA_BYTES, inline_max=INLINE_MAX, lanes=lanes)
        self.lanes: list[LaneClient] = []

    def connect(self) -> LaneClient:
        lane = LaneClient(self.lane)
        self.lanes.append(lane)
        return lane

    def nothing_for(self, seconds: float) -> bool:  # a read bringing part of a message is kept
        return _nothing_for(self.sock, self.decoder, self.ready, seconds)

    def shutdown(self) -> None:
        env = wire.envelope(0)
        env.shutdown.SetInParent()
        self.send(env)

    def close(self) -> None:
        try:
            self.shutdown()
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        for lane in self.lanes:
            lane.close()
        self.sock.close()
        self.listener.close()
        left = bool(self.lane) and os.path.exists(self.lane)
        if left:
            os.unlink(self.lane)
        self.tmp.cleanup()
        assert not left, "the lane socket outlived its worker"


class LaneClient:
    """A frontend's connection to a worker's lane."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.decoder = framing.Decoder()
        self.ready: list[list[Any]] = []

    def send(self, env: wpb.Envelope, frames: list[bytes] | None = None) -> None:
        self.sock.sendall(encoded(env, frames))

    def recv(self) -> list[Any]:
        while not self.ready:
            _recv_more(self.sock, self.decoder, self.ready)
        return self.ready.pop(0)

    def next_env(self) -> wpb.Envelope:
        return wire.parse(self.recv()[0])

    def nothing_for(self, seconds: float) -> bool:
        return _nothing_for(self.sock, self.decoder, self.ready, seconds)

    def at_eof(self) -> bool:
        try:
            self.recv()
        except EOFError:
            return True
        return False

    def release(self, blocks: list[wpb.ShmSlice]) -> None:
        env = wire.envelope(0)
        env.release.blocks.extend(blocks)
        self.send(env)

    def close(self) -> None:
        self.sock.close()


def encoded(env: wpb.Envelope, frames: list[bytes] | None = None) -> bytes:
    return b"".join(bytes(b) for b in framing.encode([env.SerializeToString(), *(frames or [])]))


def infer_env(rid: int, values: np.ndarray, name: str = "INPUT0", params: dict[str, Any] | None = None) -> tuple[
    wpb.Envelope, list[bytes]
]:  # fmt: skip
    env = wire.envelope(rid)
    r = env.infer.requests.add()
    r.id = 0
    if params:
        r.parameters_json = json.dumps(params)
    ref = r.inputs.add()
    ref.name, ref.frame = name, 0
    ref.datatype = "FP32" if values.dtype == np.float32 else "INT32"
    ref.shape.extend(values.shape)
    return env, [values.tobytes()]


def output(frames: list[Any], mapper: Mapper | None = None) -> np.ndarray:
    """OUTPUT0 of the one result of an ``InferDone`` (read from the arena when it is there)."""
    env = wire.parse(frames[0])
    assert env.WhichOneof("body") == "infer_done", env
    res = env.infer_done.results[0]
    assert not res.HasField("error"), res.error
    ref = res.outputs[0]
    if ref.WhichOneof("location") == "shm":
        assert mapper is not None
        s = ref.shm
        view = mapper.view(Block(s.region, s.offset, s.nbytes, s.device))
        try:
            return np.frombuffer(bytes(view), dtype=np.float32)
        finally:
            view.release()
    return np.frombuffer(frames[1 + ref.frame], dtype=np.float32)


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    r = FakeRouter("gate")
    yield r
    r.close()


@pytest.fixture
def mapper() -> Iterator[Mapper]:
    m = Mapper()
    yield m
    m.close()


def test_loaded_ready_carries_the_lane_socket(router: FakeRouter) -> None:
    path = router.lane
    assert path == os.path.join(router.folder, f"lane-{router.proc.pid}.sock")
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_a_lane_request_is_answered_on_its_lane(router: FakeRouter) -> None:
    lane = router.connect()
    values = np.arange(5, dtype=np.float32)
    lane.send(*infer_env(RID_BIT | 1, values))
    frames = lane.recv()
    assert wire.parse(frames[0]).request_id == RID_BIT | 1
    np.testing.assert_array_equal(output(frames), values)
    assert router.nothing_for(0.3)  # nothing on the router's socket


def test_router_and_lane_requests_interleaved(router: FakeRouter) -> None:
    lanes = [router.connect(), router.connect()]
    n = 30
    for i in range(n):  # sent without waiting: several messages per read on every socket
        router.send(*infer_env(i + 1, np.full(3, i, dtype=np.float32)))
        for k, lane in enumerate(lanes):
            lane.send(*infer_env(RID_BIT | (k << 32) | (i + 1), np.full(4, 1000 * (k + 1) + i, dtype=np.float32)))
    for i in range(n):
        frames = router.recv()
        assert wire.parse(frames[0]).request_id == i + 1
        np.testing.assert_array_equal(output(frames), np.full(3, i, dtype=np.float32))
        for k, lane in enumerate(lanes):
            frames = lane.recv()
            assert wire.parse(frames[0]).request_id == RID_BIT | (k << 32) | (i + 1)
            np.testing.assert_array_equal(output(frames), np.full(4, 1000 * (k + 1) + i, dtype=np.float32))
    assert router.nothing_for(0.2)
    assert all(lane.nothing_for(0.05) for lane in lanes)


def _big_request(lane: LaneClient, rid: int, mapper: Mapper) -> wpb.ShmSlice:
    """A request with a large output; checks it and returns its block (not released)."""
    values = np.arange(BIG, dtype=np.float32) + rid % 1000
    lane.send(*infer_env(rid, values))
    frames = lane.recv()
    env = wire.parse(frames[0])
    assert env.request_id == rid
    np.testing.assert_array_equal(output(frames, mapper), values)
    ref = env.infer_done.results[0].outputs[0]
    assert ref.WhichOneof("location") == "shm" and ref.shm.region.startswith(f"shoal_{os.getpid()}_wt")
    return ref.shm


def test_a_large_output_is_a_block_that_release_on_the_lane_frees(router: FakeRouter, mapper: Mapper) -> None:
    """100 outputs of 256 KiB: 25 MiB, more than the arena's 16 MiB unless each is freed;
    each comes in the block the last one freed."""
    lane = router.connect()
    seen = set()
    for i in range(100):
        block = _big_request(lane, RID_BIT | (i + 1), mapper)
        seen.add((block.region, block.offset))
        lane.release([block])
    assert len(seen) == 1


def test_a_lane_closed_without_release_gets_its_blocks_freed(router: FakeRouter, mapper: Mapper) -> None:
    """40 blocks of 256 KiB held by a lane that goes away, then 40 more by another: 20 MiB
    unless the first ones were freed."""
    first = router.connect()
    held = {(b.region, b.offset) for b in (_big_request(first, RID_BIT | (i + 1), mapper) for i in range(40))}
    assert len(held) == 40
    first.close()
    second = router.connect()
    again = {(b.region, b.offset) for b in (_big_request(second, RID_BIT | (i + 100), mapper) for i in range(40))}
    assert again == held  # the same blocks, freed when the first lane closed


def test_a_release_of_blocks_another_lane_holds_is_ignored(router: FakeRouter, mapper: Mapper) -> None:
    owner, other = router.connect(), router.connect()
    block = _big_request(owner, RID_BIT | 1, mapper)
    other.release([block])  # not its own: ignored
    second = _big_request(owner, RID_BIT | 2, mapper)
    assert (second.region, second.offset) != (block.region, block.offset)
    owner.release([block, second])
    third = _big_request(other, RID_BIT | 3, mapper)
    assert (third.region, third.offset) == (block.region, block.offset)


@pytest.mark.parametrize("form", ["frontend", "router"])
def test_cancel_on_the_lane_reaches_the_model(form: str, tmp_path: Path) -> None:
    """``cancellable`` polls ``request.is_cancelled()`` from inside ``execute`` (the inbox reads
    the lane from that thread). The frontend names the request in ``Cancel.request_id``; the
    router's form (in the envelope) works too."""
    r = FakeRouter("cancellable")
    try:
        lane = r.connect()
        marker = tmp_path / "cancelled"
        rid = RID_BIT | 7
        lane.send(*infer_env(rid, np.ones(1, dtype=np.float32), params={"marker": str(marker)}))
        time.sleep(0.3)
        env = wire.envelope(0 if form == "frontend" else rid)
        if form == "frontend":
            env.cancel.request_id = rid
        env.cancel.indexes.append(0)
        t0 = time.monotonic()
        lane.send(env)
        reply = lane.next_env()
        assert time.monotonic() - t0 < 5
        assert reply.request_id == rid and reply.WhichOneof("body") == "infer_done"
        assert reply.infer_done.results[0].error.message == "cancelled"
        assert marker.exists()
    finally:
        r.close()


def _assert_bye_then_eof(lane: LaneClient) -> None:
    env = lane.next_env()
    assert env.WhichOneof("body") == "lane_bye" and env.request_id == 0, env
    assert lane.at_eof()


def test_shutdown_says_bye_on_every_lane(router: FakeRouter) -> None:
    used, idle = router.connect(), router.connect()
    used.send(*infer_env(RID_BIT | 1, np.ones(2, dtype=np.float32)))
    output(used.recv())
    router.shutdown()
    assert router.proc.wait(10) == 0
    _assert_bye_then_eof(used)
    _assert_bye_then_eof(idle)  # never read by the worker before: accepted at exit
    assert not os.path.exists(router.lane)


def test_router_gone_says_bye(router: FakeRouter) -> None:
    lane = router.connect()
    lane.send(*infer_env(RID_BIT | 1, np.ones(2, dtype=np.float32)))
    output(lane.recv())
    router.sock.shutdown(socket.SHUT_RDWR)
    assert router.proc.wait(10) == 0
    _assert_bye_then_eof(lane)
    assert not os.path.exists(router.lane)


def test_sigterm_says_bye(router: FakeRouter) -> None:
    lane = router.connect()
    lane.send(*infer_env(RID_BIT | 1, np.ones(2, dtype=np.float32)))
    output(lane.recv())
    router.proc.send_signal(signal.SIGTERM)
    router.proc.wait(10)
    _assert_bye_then_eof(lane)
    assert not os.path.exists(router.lane)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 8,  # a head of no frames
        encoded(wire.envelope(1))[:8] + b"\xff" * 60,  # frame lengths that do not add up
        b"".join(framing.encode([b"\xff\xff\xff\xff"])),  # a frame that is not an Envelope
    ],
    ids=["no-frames", "bad-lengths", "not-an-envelope"],
)
def test_a_garbage_lane_is_dropped_and_nothing_else_notices(router: FakeRouter, garbage: bytes) -> None:
    good = router.connect()
    bad = router.connect()
    good.send(*infer_env(RID_BIT | 1, np.ones(2, dtype=np.float32)))
    output(good.recv())
    bad.sock.sendall(garbage)
    assert bad.at_eof()
    router.send(*infer_env(5, np.full(2, 5, dtype=np.float32)))
    np.testing.assert_array_equal(output(router.recv()), np.full(2, 5, dtype=np.float32))
    good.send(*infer_env(RID_BIT | 2, np.full(3, 2, dtype=np.float32)))
    np.testing.assert_array_equal(output(good.recv()), np.full(3, 2, dtype=np.float32))
    assert router.proc.poll() is None


def test_half_a_lane_message_never_stalls_the_router(router: FakeRouter) -> None:
    lane = router.connect()
    data = encoded(*infer_env(RID_BIT | 1, np.arange(100, dtype=np.float32)))
    lane.sock.sendall(data[:5])
    time.sleep(0.1)
    lane.sock.sendall(data[5:200])
    router.send(*infer_env(9, np.full(2, 9, dtype=np.float32)))
    np.testing.assert_array_equal(output(router.recv()), np.full(2, 9, dtype=np.float32))
    assert lane.nothing_for(0.2)
    lane.sock.sendall(data[200:])
    np.testing.assert_array_equal(output(lane.recv()), np.arange(100, dtype=np.float32))


def test_other_lane_messages_are_ignored(router: FakeRouter) -> None:
    lane = router.connect()
    probe = wire.envelope(3)
    probe.shutdown.SetInParent()  # not a lane's to send: ignored
    lane.send(probe)
    lane.send(*infer_env(RID_BIT | 1, np.ones(2, dtype=np.float32)))
    np.testing.assert_array_equal(output(lane.recv()), np.ones(2, dtype=np.float32))
    assert router.proc.poll() is None


def test_a_decoupled_model_streams_on_the_lane_within_its_window() -> None:
    """A decoupled model's responses to a lane request go back on the lane; past 64
    unacknowledged ones its sender waits for the lane's ``StreamAck`` (not the router's);
    then the rest, the last one final, and the answer of ``execute``; the router sees none."""
    r = FakeRouter("repeat")
    try:
        lane = r.connect()
        rid = RID_BIT | 1
        lane.send(*infer_env(rid, np.arange(100, dtype=np.int32), name="IN", params={"mode": "execute"}))
        first = [lane.next_env() for _ in range(64)]
        assert [(e.request_id, e.WhichOneof("body"), e.streamed.final) for e in first] == [
            (rid, "streamed", False)
        ] * 64
        assert lane.nothing_for(0.3), "the sender went past its window without an acknowledgement"
        ack = wire.envelope(rid)
        ack.stream_ack.count = 64
        lane.send(ack)
        rest = [lane.next_env() for _ in range(37)]
        assert [e.WhichOneof("body") for e in rest] == ["streamed"] * 36 + ["infer_done"]
        assert [e.streamed.final for e in rest[:36]] == [False] * 35 + [True]
        assert not rest[-1].infer_done.results
        assert r.nothing_for(0.2)
    finally:
        r.close()


def test_no_lane_where_its_path_would_be_too_long() -> None:
    """A channel socket path of 107 bytes: the lane's beside it would not fit in ``sun_path``;
    the model loads all the same, with no lane, and serves the router."""
    with tempfile.TemporaryDirectory(prefix="shoal-wl-") as top:
        folder = os.path.join(top, "d" * (99 - len(top) - 1))
        os.mkdir(folder)
        assert len(os.path.join(folder, "ch.sock")) == 107
        r = FakeRouter("gate", folder)
        try:
            assert r.lane == ""
            assert os.listdir(folder) == ["ch.sock"]
            r.send(*infer_env(3, np.full(2, 3, dtype=np.float32)))
            np.testing.assert_array_equal(output(r.recv()), np.full(2, 3, dtype=np.float32))
        finally:
            r.close()


def test_no_lane_unless_the_load_asks_for_one() -> None:
    """Without frontend processes (``Load.lanes`` false) a worker opens no lane socket: its
    router requests keep the path without a poll."""
    r = FakeRouter("gate", lanes=False)
    try:
        assert r.lane == ""
        assert not [n for n in os.listdir(r.folder) if n.startswith("lane-")]
        r.send(*infer_env(4, np.full(2, 4, dtype=np.float32)))
        np.testing.assert_array_equal(output(r.recv()), np.full(2, 4, dtype=np.float32))
    finally:
        r.close()
