#!/usr/bin/env python3
"""The router <-> worker channel alone: ZeroMQ (ROUTER/DEALER over ipc://, as Shoal used
until issue 15) against a plain Unix-domain stream socket with length-prefixed frames (what
``server/dispatch/channel.py`` uses now), on the router's kind of loop (uvloop).

For each transport an echo worker process answers every message with a header and one
frame; the router side sends a ~100-byte header and a 64-byte frame. Reports:
  - c=1 round trip: p50 / p99 microseconds (one message in flight);
  - c=N throughput: messages/s with N in flight, and router CPU microseconds per message
    (process_time of the router process / messages).

Run: .venv/bin/python scripts/bench_channel.py [--seconds S] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

HEADER = b"h" * 100
FRAME = b"f" * 64
_HEAD = struct.Struct("<II")  # payload bytes, frame count


# ---- worker side (a child process: python bench_channel.py --worker KIND PATH) ----------------


def worker_zmq(path: str) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.ROUTING_ID, b"w")
    s.connect(f"ipc://{path}")
    s.send(b"hello")
    while True:
        frames = s.recv_multipart()
        if frames[0] == b"stop":
            return
        s.send_multipart([frames[0], FRAME])


def _recv_exact(sock: socket.socket, n: int, buf: bytearray) -> memoryview:
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError
        got += k
    return view


def worker_uds(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    buf = bytearray(1 << 20)
    while True:
        head = _recv_exact(s, _HEAD.size, buf)
        size, nframes = _HEAD.unpack(head)
        body = bytes(_recv_exact(s, size, buf))
        lens = struct.unpack_from(f"<{nframes}I", body)
        first = body[4 * nframes : 4 * nframes + lens[0]]
        if first == b"stop":
            return
        out = [first, FRAME]
        s.sendmsg([_HEAD.pack(8 + sum(map(len, out)), 2), struct.pack("<2I", *map(len, out)), *out])


# ---- router side -------------------------------------------------------------------------------


class ZmqRouter:
    def __init__(self, path: str) -> None:
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(f"ipc://{path}")
        self.waiters: list[asyncio.Future[None]] = []
        self.hello = asyncio.get_running_loop().create_future()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.getsockopt(self.zmq.FD), self._drain)

    def _drain(self) -> None:
        zmq = self.zmq
        while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if not self.hello.done():
                self.hello.set_result(None)
                continue
            self.waiters.pop(0).set_result(None)

    def send(self, payload: list[bytes]) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        zmq = self.zmq
        self.sock.send(b"w", zmq.SNDMORE)
        self.sock.send(payload[0], zmq.SNDMORE)
        self.sock.send(payload[1], 0)
        asyncio.get_running_loop().call_soon(self._drain)  # ZMQ_FD is edge-triggered
        return fut

    def close(self) -> None:
        self.sock.send_multipart([b"w", b"stop"])
        time.sleep(0.1)
        self.sock.close(0)
        self.ctx.term()


class UdsRouter(asyncio.Protocol):
    def __init__(self) -> None:
        self.waiters: list[asyncio.Future[None]] = []
        self.buf = bytearray()
        self.hello = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self.hello.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            size, _n = _HEAD.unpack_from(buf, pos)
            if len(buf) - pos - _HEAD.size < size:
                break
            pos += _HEAD.size + size
            self.waiters.pop(0).set_result(None)
        del buf[:pos]

    def send(self, payload: list[bytes]) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        assert self.transport is not None
        lens = struct.pack(f"<{len(payload)}I", *map(len, payload))
        self.transport.write(b"".join([_HEAD.pack(len(lens) + sum(map(len, payload)), len(payload)), lens, *payload]))
        return fut

    def close(self) -> None:
        if self.transport is not None:
            self.send([b"stop", b""])
            self.transport.close()


async def measure(kind: str, seconds: float, concurrency: int) -> dict[str, float]:
    tmp = tempfile.mkdtemp(prefix="shoal_bench_channel_")
    path = os.path.join(tmp, "s")
    loop = asyncio.get_running_loop()
    router: ZmqRouter | UdsRouter
    server = None
    if kind == "zmq":
        router = ZmqRouter(path)
        router.start()
    else:
        router = UdsRouter()
        proto = router
        server = await loop.create_unix_server(lambda: proto, path)
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, path])
    while not router.hello.done():
        if isinstance(router, ZmqRouter):
            router._drain()  # noqa: SLF001 - its FD is edge-triggered
        await asyncio.sleep(0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} worker exited with {proc.returncode}")
    payload = [HEADER, FRAME]
    for _ in range(2000):  # warm up
        await router.send(payload)
    lat: list[float] = []
    end = time.perf_counter() + seconds / 2
    while time.perf_counter() < end:
        t = time.perf_counter()
        await router.send(payload)
        lat.append(time.perf_counter() - t)
    lat.sort()
    count = 0
    stop_at = time.perf_counter() + seconds / 2

    async def client() -> None:
        nonlocal count
        while time.perf_counter() < stop_at:
            await router.send(payload)
            count += 1

    c0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    c1, t1 = time.process_time(), time.perf_counter()
    router.close()
    if server is not None:
        server.close()
    proc.wait(5)
    os.unlink(path) if os.path.exists(path) else None
    os.rmdir(tmp)
    return {
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
        "msg_per_s": count / (t1 - t0),
        "router_cpu_us": (c1 - c0) / count * 1e6,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        (worker_zmq if sys.argv[2] == "zmq" else worker_uds)(sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=4.0, help="per transport (half c=1, half c=N)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="alternate the transports this many times")
    args = p.parse_args()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    rows = []
    for r in range(args.rounds):
        for kind in ("zmq", "uds"):
            res = runner(measure(kind, args.seconds, args.concurrency))
            rows.append((r, kind, res))
    c = args.concurrency
    print(f"| round | transport | c=1 p50 us | c=1 p99 us | c={c} msg/s | router CPU us/msg (c={c}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r, kind, res in rows:
        print(
            f"| {r} | {kind} | {res['p50_us']:.1f} | {res['p99_us']:.1f} | {res['msg_per_s']:.0f} | "
            f"{res['router_cpu_us']:.1f} |"
        )


if __name__ == "__main__":
    main()
