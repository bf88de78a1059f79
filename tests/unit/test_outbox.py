"""``workers.outbox.Outbox``: a worker's messages from many threads at once arrive whole, in
each thread's order, also when the reader falls behind (partial and blocking writes), and a
broken connection fails the senders instead of hanging them."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from shoal.proto import framing
from shoal.workers import outbox as outbox_mod
from shoal.workers.outbox import JOIN_MAX, Outbox, encode, encode_joined

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=[True, False], ids=["gil-send", "socket-send"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Outbox, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # small: writes go partial soon
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    yield Outbox(a, gil_send=request.param), b
    a.close()
    b.close()


def _read_messages(sock: socket.socket, count: int, pause_every: int = 0) -> list[list[bytes]]:
    """``count`` messages off ``sock``; sleeps now and then so that the writers find the
    socket full."""
    decoder = framing.Decoder()
    got: list[list[bytes]] = []
    reads = 0
    while len(got) < count:
        data = sock.recv(1 << 16)
        if not data:
            break
        got.extend(decoder.feed(data))
        reads += 1
        if pause_every and reads % pause_every == 0:
            time.sleep(0.002)
    return got


def test_encode_frames_as_the_router_reads_them() -> None:
    frames = [b"header", b"", memoryview(b"abcdef").cast("B"), bytearray(b"xyz")]
    (one,) = encode(frames)  # small: one buffer
    assert one == b"".join(bytes(b) for b in framing.encode(frames))
    assert framing.Decoder().feed(one) == [[b"header", b"", b"abcdef", b"xyz"]]
    big = [b"h", memoryview(bytes(JOIN_MAX)).cast("B")]
    bufs = encode(big)  # large: the frames themselves, not copied
    assert len(bufs) == 3 and bufs[2] is big[1]
    assert b"".join(bytes(b) for b in bufs) == b"".join(bytes(b) for b in framing.encode(big))


def test_a_large_message_written_ahead_goes_whole(pair: tuple[Outbox, socket.socket]) -> None:
    """``before`` (a message written ahead of another) over ``JOIN_MAX`` reaches the reader
    whole, then the message after it: ``encode_joined`` keeps the body ``encode`` leaves apart."""
    out, peer = pair
    ahead = [b"stats", bytes(range(256)) * (JOIN_MAX // 128)]
    done = threading.Thread(target=out.send, args=([b"answer", b"x"], encode_joined(ahead)))
    done.start()
    assert _read_messages(peer, 2) == [ahead, [b"answer", b"x"]]
    done.join()


def test_many_threads_each_in_order_messages_whole(pair: tuple[Outbox, socket.socket]) -> None:
    box, peer = pair
    threads, per_thread = 8, 300

    def size_of(t: int, i: int) -> int:  # some bigger than the socket buffer takes at once, a few large
        return JOIN_MAX + 5000 if i % 97 == 13 else (i * 37 + t * 101) % 3000

    def sender(t: int) -> None:
        for i in range(per_thread):
            box.send([struct.pack("<II", t, i), bytes([t]) * size_of(t, i)])

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    got = _read_messages(peer, threads * per_thread, pause_every=7)
    for w in workers:
        w.join()
    assert len(got) == threads * per_thread
    seen: dict[int, list[int]] = {t: [] for t in range(threads)}
    for header, body in got:
        t, i = struct.unpack("<II", header)
        assert body == bytes([t]) * size_of(t, i)
        seen[t].append(i)
    assert all(seen[t] == list(range(per_thread)) for t in range(threads))


def test_send_returns_once_written(pair: tuple[Outbox, socket.socket]) -> None:
    """A sender blocked by a full socket returns only after its whole message is in it."""
    box, peer = pair
    big = b"x" * 200_000
    done = threading.Event()
    t = threading.Thread(target=lambda: (box.send([b"h", big]), done.set()))
    t.start()
    assert not done.wait(0.2)  # the reader has not read: the message is not all written
    (msg,) = _read_messages(peer, 1)
    t.join(5)
    assert done.is_set() and msg == [b"h", big]


def test_queued_senders_are_written_by_the_writer(pair: tuple[Outbox, socket.socket]) -> None:
    """While one sender waits for a full socket, others queue; all arrive once it drains."""
    box, peer = pair
    blocker = threading.Thread(target=box.send, args=([b"first", b"y" * 100_000],))
    blocker.start()
    time.sleep(0.1)  # the socket is full: the first sender writes the rest, blocking
    others = [threading.Thread(target=box.send, args=([b"q%d" % k],)) for k in range(5)]
    for o in others:
        o.start()
    time.sleep(0.1)
    got = _read_messages(peer, 6)
    for o in [blocker, *others]:
        o.join(5)
        assert not o.is_alive()
    assert got[0][0] == b"first"
    assert sorted(m[0] for m in got[1:]) == [b"q%d" % k for k in range(5)]
    assert box.queued == 5 and box.writes >= 1


def test_broken_connection_fails_every_sender(pair: tuple[Outbox, socket.socket]) -> None:
    box, peer = pair
    peer.close()
    with pytest.raises(OSError):
        box.send([b"lost"])
    with pytest.raises(OSError):
        box.send([b"lost too"])


def test_send_from_inside_a_write_is_queued_not_deadlocked(
    pair: tuple[Outbox, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send the garbage collector runs (a finalizer) while this thread writes is written
    right after, on the same thread."""
    box, peer = pair
    original = outbox_mod.Outbox._write
    nested = []

    def write(self: Outbox, data: bytes) -> None:
        if not nested:
            nested.append(1)
            self.send([b"nested"])  # as a finalizer would, mid-write
        original(self, data)

    monkeypatch.setattr(outbox_mod.Outbox, "_write", write)
    box.send([b"outer"])
    assert _read_messages(peer, 2) == [[b"outer"], [b"nested"]]


def test_send_after_the_socket_closed_fails(pair: tuple[Outbox, socket.socket]) -> None:
    """A model thread sending after the worker closed its connection gets an error (the
    closed socket's descriptor is never written, whatever file took its number)."""
    box, _ = pair
    box._sock.close()
    with pytest.raises(OSError):
        box.send([b"too late"])


def test_a_large_array_frame_goes_whole(pair: tuple[Outbox, socket.socket]) -> None:
    """A tensor's frame of several MiB (a memoryview of format "f": an output its arena had
    no room for) through a socket that takes 4 KiB at a time: the rest goes buffer by
    buffer (``framing.send_rest``), and the reader gets the array's bytes."""
    import numpy as np

    out, peer = pair
    floats = np.arange(1 << 20, dtype=np.float32)
    done = threading.Thread(target=out.send, args=([b"answer", floats.data],))
    done.start()
    assert _read_messages(peer, 1) == [[b"answer", floats.tobytes()]]
    done.join()
