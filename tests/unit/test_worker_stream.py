"""A real worker process (``python -m shoal.workers``) running the decoupled test model
``repeat``, driven by a fake router over the channel socket: responses sent by several model
threads at once arrive whole, each request's in order with one final flag after them, and the
flow-control window still holds a sender back until the router acknowledges."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto import framing, wire
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.proto.streamflow import WINDOW as STREAM_WINDOW

pytestmark = pytest.mark.timeout(60)
MODELS = Path(__file__).resolve().parents[1] / "models"


class FakeRouter:
    """Listens on a channel socket in ``folder`` (a new temporary one when None), starts one
    worker for ``model`` and loads it (``lanes``: asking for a lane socket, ``Ready.lane``)."""

    def __init__(
        self,
        model: str,
        folder: str | None = None,
        *,
        arena_bytes: int = 1 << 20,
        inline_max: int = 32768,
        lanes: bool = False,
    ) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="shoal-wt-")
        self.folder = folder or self.tmp.name
        path = os.path.join(self.folder, "ch.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "shoal.workers", "--endpoint", path, "--identity", "w1",
             "--parent-pid", str(os.getpid()), "--heartbeat-ms", "0"],
        )  # fmt: skip
        self.sock, _ = self.listener.accept()
        self.sock.settimeout(30)
        self.decoder = framing.Decoder()
        self.ready: list[list[Any]] = []
        assert self.recv()[0] == framing.HELLO
        assert self.next_env().WhichOneof("body") == "ready"
        config = text_format.Parse((MODELS / model / "config.pbtxt").read_text(), mc.ModelConfig())
        load = wire.envelope(0)
        ld = load.load
        ld.model_config = config.SerializeToString()
        ld.repository = str(MODELS)
        ld.model_name = model
        ld.model_version = 1
        ld.instance_name = f"{model}_0"
        ld.device_kind = "CPU"
        ld.arena_prefix = f"shoal_{os.getpid()}_wt{id(self)}"  # the owner pid where the leak check reads it
        ld.arena_bytes = arena_bytes
        ld.inline_max_bytes = inline_max
        ld.lanes = lanes
        self.send(load)
        loaded = self.next_env()
        assert loaded.WhichOneof("body") == "ready" and loaded.ready.loaded, loaded
        self.lane = loaded.ready.lane

    def send(self, env: wpb.Envelope, frames: list[bytes] | None = None) -> None:
        self.sock.sendall(b"".join(bytes(b) for b in framing.encode([env.SerializeToString(), *(frames or [])])))

    def recv(self) -> list[Any]:
        while not self.ready:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError
            self.ready.extend(self.decoder.feed(data))
        return self.ready.pop(0)

    def next_env(self) -> wpb.Envelope:
        return wire.parse(self.recv()[0])

    def nothing_for(self, seconds: float) -> bool:
        """No message arrives within ``seconds``."""
        if self.ready:
            return False
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return True
        finally:
            self.sock.settimeout(30)
        self.ready.extend(self.decoder.feed(data))
        return False

    def infer(self, rid: int, values: list[int], mode: str) -> None:
        env = wire.envelope(rid)
        r = env.infer.requests.add()
        r.id = 0
        r.parameters_json = json.dumps({"mode": mode})
        ref = r.inputs.add()
        ref.name, ref.datatype, ref.frame = "IN", "INT32", 0
        ref.shape.append(len(values))
        self.send(env, [np.array(values, dtype=np.int32).tobytes()])

    def ack(self, rid: int, count: int) -> None:
        env = wire.envelope(rid)
        env.stream_ack.index = 0
        env.stream_ack.count = count
        self.send(env)

    def close(self) -> None:
        env = wire.envelope(0)
        env.shutdown.SetInParent()
        try:
            self.send(env)
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.sock.close()
        self.listener.close()
        self.tmp.cleanup()


@pytest.fixture
def router() -> Iterator[FakeRouter]:
    r = FakeRouter("repeat")
    yield r
    r.close()


def _collect(router: FakeRouter, rids: list[int], *, ack_every: int = 16) -> dict[int, list[tuple[Any, bool]]]:
    """Every streamed message of ``rids`` until each has its final flag and its InferDone,
    acknowledged as the router does: (OUT, IDX) or an error message or None, and final."""
    got: dict[int, list[tuple[Any, bool]]] = {rid: [] for rid in rids}
    unacked = dict.fromkeys(rids, 0)
    open_, executing = set(rids), set(rids)
    while open_ or executing:
        frames = router.recv()
        env = wire.parse(frames[0])
        body = env.WhichOneof("body")
        rid = env.request_id
        if body == "infer_done":
            executing.discard(rid)
            continue
        assert body == "streamed", env
        assert rid in open_, f"a message for request {rid} after its final one"
        msg = env.streamed
        item: Any = None
        if msg.HasField("result"):
            res = msg.result
            if res.HasField("error"):
                item = res.error.message
            else:
                out = {r.name: np.frombuffer(frames[1 + r.frame], dtype=r.datatype.lower()) for r in res.outputs}
                item = (int(out["OUT"][0]), int(out["IDX"][0]))
                unacked[rid] += 1
                if unacked[rid] == ack_every:
                    router.ack(rid, ack_every)
                    unacked[rid] = 0
        got[rid].append((item, msg.final))
        if msg.final:
            open_.discard(rid)
    return got


def test_threads_sending_at_once_each_request_in_order(router: FakeRouter) -> None:
    """Four requests in "thread" mode: four model threads send 1000 responses each at once."""
    rids = [1, 2, 3, 4]
    for rid in rids:
        router.infer(rid, [rid * 10_000 + i for i in range(1000)], "thread")
    got = _collect(router, rids)
    for rid in rids:
        items = got[rid]
        assert items[-1] == (None, True)  # the final flag alone, after every response
        assert [final for _, final in items[:-1]] == [False] * 1000
        assert [item for item, _ in items[:-1]] == [(rid * 10_000 + i, i) for i in range(1000)]


def test_responses_sent_from_execute_carry_the_final_flag(router: FakeRouter) -> None:
    router.infer(7, list(range(300)), "execute")
    items = _collect(router, [7])[7]
    assert [item for item, _ in items] == [(i, i) for i in range(300)]
    assert [final for _, final in items] == [False] * 299 + [True]


def test_error_mid_stream_ends_it(router: FakeRouter) -> None:
    router.infer(3, [5, 6, 7, 8], "error_after_two")
    items = _collect(router, [3])[3]
    assert items[:2] == [((5, 0), False), ((6, 1), False)]
    assert items[2][1] is True and "failed at element 2" in items[2][0]
    assert len(items) == 3


def _streamed(router: FakeRouter, count: int) -> list[wpb.Envelope]:
    """The next ``count`` streamed responses, passing over the worker's other messages (its
    ``infer_done`` for the batch, which the main thread sends when ``execute`` returns: on a
    loaded machine after the model's thread has sent many responses)."""
    got: list[wpb.Envelope] = []
    deadline = time.monotonic() + 10
    while len(got) < count and time.monotonic() < deadline:
        env = router.next_env()
        if env.WhichOneof("body") == "streamed":
            got.append(env)
    return got


def _no_streamed_for(router: FakeRouter, seconds: float) -> bool:
    """No streamed response arrives within ``seconds`` (other messages are passed over)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        if router.nothing_for(left):
            return True
        if router.next_env().WhichOneof("body") == "streamed":
            return False
    return True


def test_the_window_holds_a_sender_until_acknowledged(router: FakeRouter) -> None:
    router.infer(9, list(range(STREAM_WINDOW + 40)), "thread")
    assert len(_streamed(router, STREAM_WINDOW)) == STREAM_WINDOW
    assert _no_streamed_for(router, 0.3)  # no acknowledgement: the sender waits
    router.ack(9, 16)
    assert len(_streamed(router, 16)) == 16
    assert _no_streamed_for(router, 0.3)
    router.ack(9, STREAM_WINDOW)  # the rest: 24 responses and the final flag
    rest = _streamed(router, 25)
    assert [e.streamed.final for e in rest] == [False] * 24 + [True]
