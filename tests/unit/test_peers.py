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


def test_forwarded_grpc_calls_read_a_clients_uid_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frontend process forwards gRPC calls with the client's ``peer_value``, whose uid is
    read from the kernel's socket tables: once per client, not per call (each read took
    8-12 ms on the 2-core box, and every forwarded call paid it)."""
    import os
    import socket

    from shoal.server import peers
    from shoal.server.frontproc.proxy import GrpcProxy

    reads: list[tuple[str, int]] = []
    real = peers.socket_uid

    def counted(host: str, port: int, server_port: int) -> int | None:
        reads.append((host, port))
        return real(host, port, server_port)

    monkeypatch.setattr(peers, "socket_uid", counted)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        server_port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", server_port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                client_port = client.getsockname()[1]

                class Context:
                    def peer(self) -> str:
                        return f"ipv4:127.0.0.1:{client_port}"

                proxy = GrpcProxy("unix:/nowhere", PeerCache(server_port))
                values = {proxy.peer_of(Context()) for _ in range(5)}
    assert values == {f"127.0.0.1 {client_port} {server_port} {os.getuid()}"}
    assert reads == [("127.0.0.1", client_port)]
