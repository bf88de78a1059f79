"""``WorkerChannel`` with plain DEALER sockets in the test process as the workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from shoal.proto import wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel
from tests.component.dispatch.harness import eventually

pytestmark = pytest.mark.timeout(30)

Got = list[tuple[int, list[bytes]]]


class Dealers:
    """DEALER sockets standing in for workers; all closed after the test."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []

    def __call__(self, endpoint: str, identity: bytes) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        self.socks.append(sock)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def dealer() -> Iterator[Dealers]:
    d = Dealers()
    yield d
    d.close()


def pong(rid: int) -> bytes:
    env = wire.envelope(rid)
    env.pong.SetInParent()
    return env.SerializeToString()


async def recv(sock: zmq.Socket[bytes], timeout: float = 5.0) -> list[bytes]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not sock.poll(0, zmq.POLLIN):
        assert loop.time() < deadline, "nothing received"
        await asyncio.sleep(0.005)
    return sock.recv_multipart()


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
        stranger.send(pong(99))  # nobody registered: dropped
        a.send(b"\x01not an envelope")  # garbage: dropped
        bad_version = wpb.Envelope(protocol_version=wire.PROTOCOL_VERSION + 1, request_id=98)
        a.send(bad_version.SerializeToString())  # another protocol: dropped
        a.send_multipart([pong(1), b"frame0", b"frame1"])
        b.send(pong(2))
        await eventually(lambda: bool(got_a and got_b), "both messages")
        assert got_a == [(1, [b"frame0", b"frame1"])]
        assert got_b == [(2, [])]
        # a message for an identity that unregistered is dropped too
        ch.unregister(b"b")
        b.send(pong(3))
        a.send(pong(4))
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
        a.send(pong(1))
        a.send(pong(2))
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
        a.send(pong(1))  # the router learns the route from the worker's first message
        await eventually(lambda: bool(got), "the hello")
        env = wire.envelope(7)
        env.infer.SetInParent()
        small, large = b"s" * 10, bytearray(b"L" * (1 << 17))  # large goes zero-copy
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
