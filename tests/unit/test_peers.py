"""Client peers: what a frontend process sends the router, and a client whose address cannot
be read (treated as remote, never as the server's own caller)."""

from __future__ import annotations

import pytest

from shoal.proto.errors import PermissionDenied
from shoal.server.peers import UNKNOWN, Peer, PeerCache, from_grpc, parse_peer, peer_value
from shoal.server.sharedmem import SharedMemoryRegistry


def test_peer_value_round_trip() -> None:
    p = Peer(host="127.0.0.1", port=40000, server_port=8001, _uid=1000, _uid_known=True)
    back = parse_peer(peer_value(p))
    assert (back.host, back.port, back.server_port, back.uid) == ("127.0.0.1", 40000, 8001, 1000)
    assert back.local and back.owner == "uid:1000"
    remote = parse_peer("10.1.2.3 5000 8000 -")
    assert remote.uid is None and not remote.local and remote.owner == "host:10.1.2.3"


@pytest.mark.parametrize("value", [None, "", "garbage", "1.2.3.4 x 8000 -", "1.2.3.4 1 8000 notauid"])
def test_unreadable_peer_is_unknown_and_remote(value: str | None) -> None:
    p = parse_peer(value)
    assert p is UNKNOWN
    assert not p.local and p.uid is None and p.owner == "host:unknown"


def test_grpc_peers() -> None:
    assert from_grpc("ipv4:127.0.0.1:5000", 8001) == Peer("127.0.0.1", 5000, 8001)
    assert from_grpc("ipv6:%5B::1%5D:5000", 8001) == Peer("::1", 5000, 8001)
    assert from_grpc("unix:/tmp/x.sock", 8001) is None
    assert PeerCache(8001).get("unix:/tmp/x.sock") is UNKNOWN


def test_unknown_peer_cannot_register_under_local_access() -> None:
    """``--client-shm-access local``: a client of unknown address is refused like a remote
    one (an internal caller, ``None``, is not checked)."""
    registry = SharedMemoryRegistry(access="local")
    with pytest.raises(PermissionDenied, match="only be registered by clients on the server's host"):
        registry.register_system("r", "/no-such-key", 0, 64, UNKNOWN)
