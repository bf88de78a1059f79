"""A frontend's lane (``server/frontproc/lanelink.Lane``) at a worker's exit: the worker
sends ``LaneBye`` and closes; if the frontend writes before it has read the bye, the write
fails and the event loop's transport drops the connection without reading what was left.
The lane must still see the bye (its unanswered requests were never executed, so the router
takes them), not report the worker dead."""

from __future__ import annotations

import asyncio
import socket
import time
import types
from typing import Any

import pytest
import uvloop

from shoal.proto import framing, wire
from shoal.server.frontproc.lanelink import Lane


class _Lanes:
    """What a ``Lane`` calls back: every call recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def lost(self, lane: Lane, p: Any) -> None:
        self.calls.append(("lost", p))

    def closed(self, lane: Lane) -> None:
        self.calls.append(("closed", lane))

    def answered(self, lane: Lane, p: Any, env: Any, body: str, frames: list[Any]) -> None:
        self.calls.append(("answered", env.request_id))


def _framed(env: Any) -> bytes:
    return b"".join(framing.encode([env.SerializeToString()]))


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_a_bye_left_unread_before_a_failed_write_is_still_seen(run: Any) -> None:
    async def scenario() -> tuple[Lane, _Lanes]:
        frontend, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lanes = _Lanes()
        lane = Lane(lanes, "lane-test.sock", "model 'm' instance 'm_0'", 1234)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: lane, frontend)
        answer = wire.envelope(7)
        answer.infer_done.SetInParent()
        lane.pending[7] = types.SimpleNamespace(stream=None, group=None)  # type: ignore[assignment]  # answered just before the worker left
        bye = wire.envelope(0)
        bye.lane_bye.SetInParent()
        worker.sendall(_framed(answer) + _framed(bye))
        worker.close()  # the worker exits
        time.sleep(0.05)  # the frontend's loop was busy: nothing read yet
        request = wire.envelope(8)
        request.infer.SetInParent()
        lane.send(request)
        lane._flush()  # written now, to a closed peer: the transport fails and drops the connection
        for _ in range(100):
            if lane.broken and any(c[0] == "closed" for c in lanes.calls):
                break
            await asyncio.sleep(0.01)
        return lane, lanes

    lane, lanes = run(scenario())
    assert lane.bye, "the worker's LaneBye was not seen"
    assert ("answered", 7) in lanes.calls  # the answer sent before the bye still arrives
    assert not [c for c in lanes.calls if c[0] == "lost"]
