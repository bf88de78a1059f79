"""``workers.lanecalls``: a worker's lanes to other workers, against a real Unix socket that
plays the target worker."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.proto import framing, wire
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.lanecalls import LOST, RID_BITS, LaneCalls, OutLane


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.path = str(tmp / "lane-1.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(4)
        self.watched: list[int] = []
        self.delivered: dict[int, list[tuple[wpb.Envelope, list[Any]]]] = {}
        self.waiting: set[int] = set()
        self.orphans: list[tuple[int, wpb.Envelope | None]] = []
        self.calls = LaneCalls(str(tmp / "lane-self.sock"), self.watched.append, self.watched.remove,
                               self.deliver, self.orphan)  # fmt: skip
        self.peer: socket.socket | None = None

    def deliver(self, call_id: int, message: tuple[wpb.Envelope, list[Any]]) -> bool:
        if call_id not in self.waiting:
            return False
        self.delivered.setdefault(call_id, []).append(message)
        return True

    def orphan(self, out: OutLane, call_id: int, env: wpb.Envelope | None) -> None:
        self.orphans.append((call_id, env))

    def table(self, *paths: str, model: str = "m") -> wpb.LaneRoutes:
        config = mc.ModelConfig(name=model)
        t = wpb.LaneRoutes()
        r = t.routes.add()
        r.model_name, r.model_version, r.latest = model, 1, True
        r.model_config = config.SerializeToString()
        for p in paths:
            lane = r.lanes.add()
            lane.path, lane.label, lane.pid = p, f"instance at {p}", 7
        return t

    def connected(self) -> OutLane:
        self.calls.update(self.table(self.path))
        route = self.calls.route("m", -1, "")
        assert route is not None
        out = self.calls.pick(route)
        assert out is not None
        self.peer, _ = self.listener.accept()
        return out

    def say(self, env: wpb.Envelope) -> None:
        assert self.peer is not None
        self.peer.sendall(b"".join(bytes(b) for b in framing.encode([env.SerializeToString()])))

    def read(self, out: OutLane) -> None:
        self.calls.readable(out.fd)


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.calls.close()
    harness.listener.close()
    if harness.peer is not None:
        harness.peer.close()


def _done(rid: int) -> wpb.Envelope:
    env = wire.envelope(rid)
    env.infer_done.results.add()
    return env


def test_an_answer_reaches_its_call(h: Harness) -> None:
    out = h.connected()
    assert out.fd in h.watched
    h.waiting.add(5)
    rid = h.calls.new_id(out, 5)
    assert rid & RID_BITS == RID_BITS
    assert out.load == 1
    h.say(_done(rid))
    h.read(out)
    assert h.delivered[5][0][0].request_id == rid
    assert out.load == 0


def test_bye_then_end_gives_back_what_was_not_answered(h: Harness) -> None:
    out = h.connected()
    h.waiting.update({1, 2})
    h.calls.new_id(out, 1)
    h.calls.new_id(out, 2)
    bye = wire.envelope(0)
    bye.lane_bye.SetInParent()
    h.say(bye)
    h.read(out)
    assert out.bye and out.broken
    assert h.calls.route("m", -1, "") is not None  # the table is the router's to change
    assert h.calls.pick(h.calls.routes[("m", -1)]) is None  # but the broken lane takes nothing
    assert h.peer is not None
    h.peer.close()
    h.read(out)
    assert [m[0][0] is LOST for m in h.delivered.values()] == [True, True]
    assert out.fd not in h.watched


def test_an_end_without_bye_is_a_death(h: Harness) -> None:
    out = h.connected()
    h.waiting.add(3)
    h.calls.new_id(out, 3)
    assert h.peer is not None
    h.peer.close()
    h.read(out)
    assert h.delivered[3][0][0] is LOST
    assert not out.bye
    assert h.calls.new_id(out, 4) == 0  # closed: no more calls on it


def test_answers_nobody_waits_for_are_orphans(h: Harness) -> None:
    out = h.connected()
    rid = h.calls.new_id(out, 9)  # not in ``waiting``: the caller left
    h.calls.new_id(out, 10)
    h.say(_done(rid))
    h.read(out)
    assert h.orphans == [(9, _done(rid))]
    assert h.peer is not None
    h.peer.close()
    h.read(out)
    assert h.orphans[1] == (10, None)


def test_routes_skip_own_lane_and_router_parameters(h: Harness, tmp_path: Path) -> None:
    h.calls.update(h.table(str(tmp_path / "lane-self.sock")))
    assert h.calls.route("m", 1, "") is None  # only itself: through the router (which refuses)
    h.calls.update(h.table(h.path))
    assert h.calls.route("m", 1, "") is not None
    assert h.calls.route("m", 2, "") is None
    assert h.calls.route("m", 1, '{"custom": 1}') is not None
    for reserved in ('{"timeout": 5}', '{"sequence_id": 1}', '{"priority": 1}', "not json"):
        assert h.calls.route("m", 1, reserved) is None


def test_a_lane_no_longer_published_closes_when_idle(h: Harness) -> None:
    out = h.connected()
    h.calls.new_id(out, 1)
    h.calls.update(h.table())  # unpublished with a call in flight: kept for its answer
    assert not out.broken
    h.waiting.add(1)
    rid = next(iter(out.pending))
    h.say(_done(rid))
    h.read(out)
    h.calls.update(h.table())
    assert out.broken
    assert out.fd not in h.watched


def test_unreachable_targets_leave_the_call_to_the_router(h: Harness, tmp_path: Path) -> None:
    h.calls.update(h.table(str(tmp_path / "nobody.sock")))
    route = h.calls.route("m", 1, "")
    assert route is not None
    assert h.calls.pick(route) is None
