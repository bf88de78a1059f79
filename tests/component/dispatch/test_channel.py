"""``WorkerChannel`` with plain blocking connections in the test process as the workers."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.proto import framing, wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel
from tests.component.dispatch.harness import eventually

pytestmark = pytest.mark.timeout(30)

Got = list[tuple[int, list[bytes]]]


class Dealer(framing.Connection):
    """A worker's end, with the ZeroMQ-like calls the tests were first written with."""

    def send_multipart(self, frames: list[bytes]) -> None:
        self.send(frames)

    def send1(self, frame: bytes) -> None:
        self.send([frame])


class Dealers:
    """Worker connections; all closed after the test."""

    def __init__(self) -> None:
        self.conns: list[Dealer] = []

    def __call__(self, endpoint: str, identity: bytes) -> Dealer:
        conn = Dealer(endpoint, identity)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


@pytest.fixture
def dealer() -> Iterator[Dealers]:
    d = Dealers()
    yield d
    d.close()


def pong(rid: int) -> bytes:
    env = wire.envelope(rid)
    env.pong.SetInParent()
    return env.SerializeToString()


async def recv(conn: Dealer, timeout: float = 5.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not conn.poll(0):
        assert loop.time() < deadline, "nothing received"
        await asyncio.sleep(0.005)
    return conn.recv()


async def test_messages_go_to_the_handler_of_their_identity(tmp_path: Path, dealer: Dealers) -> None:
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        got_a: Got = []
        got_b: Got = []
        ch.register(b"a", lambda env, frames: got_a.append((env.request_id, frames)))
        ch.register(b"b", lambda env, frames: got_b.append((env.request_id, frames)))
        a = dealer(ch.endpoint, b"a")
        b = dealer(ch.endpoint, b"b")
        stranger = dealer(ch.endpoint, b"stranger")
        stranger.send1(pong(99))  # nobody registered: dropped
        a.send1(b"\x01not an envelope")  # garbage: dropped
        bad_version = wpb.Envelope(protocol_version=wire.PROTOCOL_VERSION + 1, request_id=98)
        a.send1(bad_version.SerializeToString())  # another protocol: dropped
        a.send_multipart([pong(1), b"frame0", b"frame1"])
        b.send1(pong(2))
        await eventually(lambda: bool(got_a and got_b), "both messages")
        assert got_a == [(1, [b"frame0", b"frame1"])]
        assert got_b == [(2, [])]
        # a message for an identity that unregistered is dropped too
        ch.unregister(b"b")
        b.send1(pong(3))
        a.send1(pong(4))
        await eventually(lambda: len(got_a) == 2, "the next message")
        assert got_a[1] == (4, []) and got_b == [(2, [])]
    finally:
        ch.close()


async def test_a_failing_handler_does_not_stop_the_channel(
    tmp_path: Path, dealer: Dealers, caplog: pytest.LogCaptureFixture
) -> None:
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        seen: list[int] = []

        def handle(env: wpb.Envelope, frames: list[bytes]) -> None:
            seen.append(env.request_id)
            if env.request_id == 1:
                raise RuntimeError("handler bug")

        ch.register(b"a", handle)
        a = dealer(ch.endpoint, b"a")
        a.send1(pong(1))
        a.send1(pong(2))
        await eventually(lambda: seen == [1, 2], "both messages handled")
        assert "handling a message from worker b'a' failed" in caplog.text
    finally:
        ch.close()


async def test_send_reaches_the_worker_with_its_buffers(tmp_path: Path, dealer: Dealers) -> None:
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        got: Got = []
        ch.register(b"a", lambda env, frames: got.append((env.request_id, frames)))
        a = dealer(ch.endpoint, b"a")
        a.send1(pong(1))  # the router learns the route from the worker's first message
        await eventually(lambda: bool(got), "the hello")
        env = wire.envelope(7)
        env.infer.SetInParent()
        small, large = b"s" * 10, bytearray(b"L" * (1 << 20))  # large: several socket writes
        ch.send(b"a", env, [small, memoryview(large)])
        frames = await recv(a)
        assert wire.parse(frames[0]).request_id == 7
        assert frames[1:] == [small, bytes(large)]
        shutdown = wire.envelope(8)
        shutdown.shutdown.SetInParent()
        ch.send(b"a", shutdown)
        (header,) = await recv(a)
        assert wire.parse(header).WhichOneof("body") == "shutdown"
    finally:
        ch.close()


async def test_send_to_an_unconnected_worker_is_unavailable(tmp_path: Path) -> None:
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        with pytest.raises(ServingError, match="not connected") as info:
            ch.send(b"nobody", wire.envelope(1))
        assert info.value.code is ErrorCode.UNAVAILABLE
    finally:
        ch.close()


def _send_junk(path: Path, data: bytes) -> bytes:
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        raw.connect(str(path))
        raw.sendall(data)
        raw.settimeout(5)
        return raw.recv(10)
    finally:
        raw.close()


async def test_a_connection_that_breaks_the_framing_is_closed(tmp_path: Path, dealer: Dealers) -> None:
    """No hello, a head that lies, or a bad frame count: that connection is dropped and the
    others go on."""
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        got: Got = []
        ch.register(b"a", lambda env, frames: got.append((env.request_id, frames)))
        for junk in (
            framing.encode([b"not a hello"]),  # first message is not a hello
            [struct.pack("<II", (1 << 31) + 1, 1)],  # too big
            [struct.pack("<II", 8, 0)],  # no frames
        ):
            assert await asyncio.to_thread(_send_junk, tmp_path / "c.sock", b"".join(junk)) == b"", (
                "the router should close this connection"
            )
        a = dealer(ch.endpoint, b"a")
        a.send1(pong(1))
        await eventually(lambda: got == [(1, [])], "the good worker's message")
    finally:
        ch.close()


async def test_a_new_connection_of_the_same_identity_replaces_the_old(tmp_path: Path, dealer: Dealers) -> None:
    ch = WorkerChannel(f"ipc://{tmp_path}/c.sock")
    ch.start()
    try:
        got: Got = []
        ch.register(b"a", lambda env, frames: got.append((env.request_id, frames)))
        first = dealer(ch.endpoint, b"a")
        first.send1(pong(1))
        await eventually(lambda: len(got) == 1, "the first connection's message")
        second = dealer(ch.endpoint, b"a")
        second.send1(pong(2))
        await eventually(lambda: len(got) == 2, "the second connection's message")
        ch.send(b"a", wire.envelope(3))
        assert wire.parse((await recv(second))[0]).request_id == 3
        assert await asyncio.to_thread(first.poll, 2000)  # closed by the router
        with pytest.raises(EOFError):
            first.recv()
    finally:
        ch.close()
