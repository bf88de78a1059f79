"""``frontproc.shmregions``: a frontend's copy of the client regions, its bounds checks (it says
yes only to what the router would accept) and its answers to a drop (idle at once, or once
the last request naming the region is answered)."""

from __future__ import annotations

from shoal.proto import wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.frontproc.shmregions import ShmRegions
from shoal.server.peers import Peer
from shoal.server.types import ShmRef


def _table(*entries: tuple[str, str, int, int], reset: bool = False) -> wpb.ShmRegions:
    env = wire.envelope(0)
    msg = env.shm_regions
    msg.reset = reset
    for owner, name, region_id, size in entries:
        e = msg.add.add()
        e.owner, e.name = owner, name
        e.region.region_id, e.region.region_bytes, e.region.key, e.region.device = region_id, size, f"k{region_id}", -1
    return msg


def _drop(call_id: int, *ids: int) -> wpb.ShmRegions:
    msg = wire.envelope(0).shm_regions
    msg.drop.extend(ids)
    msg.call_id = call_id
    return msg


def test_find_checks_owner_name_and_bounds() -> None:
    t = ShmRegions(lambda env: None)
    t.update(_table(("uid:1", "a", 7, 100)))
    assert t.find("uid:1", ShmRef("a", 0, 100)) is not None
    assert t.find("uid:1", ShmRef("a", 60, 40)) is not None
    assert t.find("uid:2", ShmRef("a", 0, 4)) is None  # another client's namespace
    assert t.find("uid:1", ShmRef("b", 0, 4)) is None
    assert t.find("uid:1", ShmRef("a", 100, 0)) is None  # the router's "offset" error
    assert t.find("uid:1", ShmRef("a", 60, 41)) is None  # the router's "range" error
    region = t.find("uid:1", ShmRef("a", 8, 16))
    assert region is not None
    out = wpb.ClientShm()
    region.describe(ShmRef("a", 8, 16), out)
    assert (out.region_id, out.key, out.region_bytes, out.offset, out.nbytes) == (7, "k7", 100, 8, 16)


def test_owner_follows_the_access_mode() -> None:
    peer = Peer("10.0.0.9", 5000, 8000)  # remote: its namespace is its address
    local = ShmRegions(lambda env: None)
    assert local.owner(peer) == "host:10.0.0.9"
    assert local.owner(None) is None
    shared = ShmRegions(lambda env: None, any_owner=True)
    shared.update(_drop(1, 9))  # news from the router never change the server's setting
    assert shared.owner(peer) == "" and shared.owner(None) == ""


def test_a_drop_is_answered_at_once_and_idle_when_unused() -> None:
    sent: list[wpb.Envelope] = []
    t = ShmRegions(sent.append)
    t.update(_table(("", "a", 1, 8), ("", "b", 2, 8)))
    busy = t.find("", ShmRef("b", 0, 8))
    assert busy is not None
    t.use([busy, busy])  # one request naming it twice (an input and an output)
    t.update(_drop(5, 1, 2, 3))
    assert t.find("", ShmRef("a", 0, 8)) is None and t.find("", ShmRef("b", 0, 8)) is None
    assert len(t) == 0
    (answer,) = sent
    assert answer.shm_dropped.call_id == 5
    assert sorted(answer.shm_dropped.idle) == [1, 3]  # 3: never known here; 2 is still used
    t.done([busy, busy])
    assert len(sent) == 2
    assert sent[1].shm_dropped.call_id == 0 and list(sent[1].shm_dropped.idle) == [2]


def test_a_reset_replaces_the_table() -> None:
    t = ShmRegions(lambda env: None)
    t.update(_table(("", "a", 1, 8)))
    t.update(_table(("", "b", 2, 8), reset=True))
    assert t.find("", ShmRef("a", 0, 8)) is None
    assert t.find("", ShmRef("b", 0, 8)) is not None
