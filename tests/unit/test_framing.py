"""``proto.framing``: messages survive any split of the stream; malformed heads are refused."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.proto import framing

messages = st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=5), min_size=1, max_size=6)


@given(messages, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=20))
def test_any_split_of_the_stream_gives_back_the_messages(msgs: list[list[bytes]], cuts: list[int]) -> None:
    stream = b"".join(b"".join(framing.encode(m)) for m in msgs)
    dec = framing.Decoder()
    got: list[list[bytes]] = []
    pos, i = 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        got.extend(dec.feed(stream[pos : pos + step]))
        pos += step
        i += 1
    assert got == msgs


def test_memoryview_frames_are_measured_in_bytes() -> None:
    import numpy as np

    arr = np.arange(4, dtype=np.float32)
    (msg,) = framing.Decoder().feed(b"".join(bytes(b) for b in framing.encode([b"h", memoryview(arr)])))
    assert msg == [b"h", arr.tobytes()]


@pytest.mark.parametrize(
    "head",
    [
        struct.pack("<II", 8, 0),  # no frames
        struct.pack("<II", 4, 2),  # lengths do not fit
        struct.pack("<II", (1 << 31) + 1, 1),  # too big
        struct.pack("<II", 4, framing.MAX_FRAMES + 1),
    ],
)
def test_bad_heads_are_refused(head: bytes) -> None:
    with pytest.raises(framing.FramingError):
        framing.Decoder().feed(head + b"\0" * 16)


def test_frame_lengths_must_add_up_to_the_size() -> None:
    bad = struct.pack("<III", 4 + 3, 1, 5) + b"abc"  # says 5 bytes of frame, carries 3
    with pytest.raises(framing.FramingError):
        framing.Decoder().feed(bad + b"\0" * 8)


def test_writable_frames_for_workers() -> None:
    """A worker's frames become numpy arrays handed to models; DLPack refuses read-only ones."""
    data = b"".join(framing.encode([b"head", b"\x01\x02\x03\x04"]))
    (msg,) = framing.Decoder(writable=True).feed(data)
    assert all(isinstance(f, bytearray) for f in msg)
    (msg,) = framing.Decoder().feed(data)
    assert all(isinstance(f, bytes) for f in msg)


def test_fits_inline_keeps_a_message_under_its_limit() -> None:
    """A tensor an arena has no room for goes in the message only while the message stays a
    MiB under ``MAX_MESSAGE_BYTES`` (a peer closes the connection past it)."""
    from shoal.proto.framing import MAX_MESSAGE_BYTES, fits_inline

    assert fits_inline([], 300 << 20)
    assert fits_inline([b"x" * 10], MAX_MESSAGE_BYTES - (2 << 20))
    assert not fits_inline([memoryview(bytes(2 << 20))], MAX_MESSAGE_BYTES - (2 << 20))
    assert not fits_inline([], MAX_MESSAGE_BYTES)


def test_a_message_larger_than_the_socket_takes_goes_whole(tmp_path: Path) -> None:
    """``Connection.send`` of a message the kernel takes only part of at once (a large frame
    the arena had no room for): the rest follows buffer by buffer, frames of any memoryview
    format included, and the reader decodes the message intact."""
    import socket
    import threading

    import numpy as np

    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got: list[list[bytes]] = []

    def read() -> None:
        peer, _ = listener.accept()
        decoder = framing.Decoder()
        with peer:
            while len(got) < 2:
                data = peer.recv(1 << 16)
                if not data:
                    break
                got.extend(decoder.feed(data))

    reader = threading.Thread(target=read)
    reader.start()
    floats = np.arange(3 << 20, dtype=np.float32)  # 12 MiB, format "f"
    conn = framing.Connection(path, b"me")
    try:
        conn.send([b"head", floats.data, b"tail" * 1000])
        reader.join(30)
    finally:
        conn.sock.close()
        listener.close()
    assert got[0] == [framing.HELLO, b"me"]
    assert got[1][0] == b"head" and got[1][2] == b"tail" * 1000
    assert got[1][1] == floats.tobytes()


@pytest.mark.parametrize("writable", [False, True])
def test_a_message_in_many_reads_is_joined_once_it_is_whole(writable: bool) -> None:
    """A large message arriving in many reads (then a small one in the same read as its
    tail) gives back its frames, of the decoder's type, once its last byte is there; the
    reads handed in may be reused at once."""
    big = bytes(range(256)) * 4096  # 1 MiB
    stream = b"".join(framing.encode([b"head", big])) + b"".join(framing.encode([b"next"]))
    dec = framing.Decoder(writable=writable)
    buf = bytearray(4096)
    got: list[list[Any]] = []
    for pos in range(0, len(stream), len(buf)):
        piece = stream[pos : pos + len(buf)]
        buf[: len(piece)] = piece
        got.extend(dec.feed(memoryview(buf)[: len(piece)]))
        buf[:] = b"\xff" * len(buf)  # reused: the decoder must have copied what it keeps
        if pos + len(buf) < len(stream) - 20:
            assert not got
    assert got == [[b"head", big], [b"next"]]
    assert all(type(f) is (bytearray if writable else bytes) for m in got for f in m)
