"""``Peer``: who is on the other end of a client connection, as far as the kernel tells.

The shared-memory extensions need it: by default only clients on this host may register
regions, a client may only register objects its own user owns, and each client sees only
its own regions. For a TCP connection over loopback the client's user is read from the
kernel's socket table (``/proc/net/tcp``, ``/proc/net/tcp6``: the row of the client's end of
the connection carries the uid that owns it), once per connection (HTTP) or per peer address
for a short while (gRPC), never per request.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from dataclasses import dataclass, field

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_ESTABLISHED = "01"


@dataclass(slots=True)
class Peer:
    """A client connection. ``host``/``port``: its address; ``server_port``: the port it
    connected to."""

    host: str
    port: int
    server_port: int
    _uid: int | None = field(default=None, repr=False)
    _uid_known: bool = field(default=False, repr=False)

    @property
    def local(self) -> bool:
        """The client runs on this host (loopback)."""
        return is_loopback(self.host)

    @property
    def uid(self) -> int | None:
        """The uid of the client's socket (local peers only; ``None`` when unknown)."""
        if not self._uid_known:
            self._uid = socket_uid(self.host, self.port, self.server_port) if self.local else None
            self._uid_known = True
        return self._uid

    @property
    def owner(self) -> str:
        """The namespace of this client's shared-memory regions: its user on this host,
        else its address."""
        uid = self.uid
        return f"uid:{uid}" if uid is not None else f"host:{self.host}"


PEER_HEADER = "x-shoal-peer"
"""Set by a frontend process (``server.frontproc``) on what it forwards to the router: the
client's ``host port server_port``. The router believes it only on its Unix sockets (in the
run directory, which only the server's user can open)."""


UNKNOWN = Peer(host="unknown", port=0, server_port=0, _uid=None, _uid_known=True)
"""A client whose address could not be read: treated as remote (not on this host, no uid),
never as the server's own caller (``None``: a model's BLS call, an ensemble step), whose
requests skip the shared-memory checks."""


def peer_value(peer: Peer | None) -> str:
    """``host port server_port uid`` (``-``: no uid): the uid is read here, once per client
    connection, so that the router does not search the socket tables for every request."""
    if peer is None:
        return ""
    uid = peer.uid
    return f"{peer.host} {peer.port} {peer.server_port} {'-' if uid is None else uid}"


@functools.lru_cache(maxsize=4096)
def parse_peer(value: str | None) -> Peer:
    """The ``Peer`` of ``peer_value``'s text (``UNKNOWN`` if it is not one: a frontend
    process sends one for every client request). Cached: every request of a connection
    carries the same text, and the ``Peer`` is never changed (its uid is known)."""
    if not value:
        return UNKNOWN
    try:
        host, port, server_port, uid = value.rsplit(" ", 3)
        return Peer(
            host=host,
            port=int(port),
            server_port=int(server_port),
            _uid=None if uid == "-" else int(uid),
            _uid_known=True,
        )
    except ValueError:
        return UNKNOWN


def is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def from_grpc(peer: str, server_port: int) -> Peer | None:
    """A ``Peer`` from grpc's ``context.peer()`` (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``)."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit():
        return None
    from urllib.parse import unquote

    return Peer(host=unquote(host).strip("[]"), port=int(port), server_port=server_port)


def _hex_address(host: str, port: int) -> set[str]:
    """The spellings of ``host:port`` in /proc/net/tcp{,6} (IPv4 as itself and as a mapped
    IPv6 address)."""
    addr = ipaddress.ip_address(host.split("%", 1)[0])
    out = set()
    v4 = addr if isinstance(addr, ipaddress.IPv4Address) else addr.ipv4_mapped
    if v4 is not None:
        out.add(f"{int.from_bytes(v4.packed, 'little'):08X}:{port:04X}")
        addr = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + v4.packed)
    packed = addr.packed
    words = "".join(f"{int.from_bytes(packed[i : i + 4], 'little'):08X}" for i in range(0, 16, 4))
    out.add(f"{words}:{port:04X}")
    return out


def socket_uid(host: str, port: int, server_port: int) -> int | None:
    """The uid owning the loopback socket ``host:port`` connected to our ``server_port``."""
    try:
        local = _hex_address(host, port)
    except ValueError:
        return None
    suffix = f":{server_port:04X}"
    for table in _TABLES:
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 7 and cols[1] in local and cols[2].endswith(suffix) and cols[3] == _ESTABLISHED:
                        return int(cols[7])
        except OSError:
            continue
    return None


class PeerCache:
    """``Peer``s of gRPC clients by address for ``ttl_s`` (grpc.aio has no per-connection
    hook; a port reused by another process within the TTL is re-read after it)."""

    def __init__(self, server_port: int, *, ttl_s: float = 5.0, max_entries: int = 4096) -> None:
        self.server_port = server_port
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, tuple[float, Peer]] = {}

    def get(self, peer: str) -> Peer:
        now = time.monotonic()
        hit = self._entries.get(peer)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        p = from_grpc(peer, self.server_port)
        if p is None:
            return UNKNOWN
        if len(self._entries) >= self.max_entries:
            self._entries = {k: v for k, v in self._entries.items() if now - v[0] < self.ttl_s}
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
        self._entries[peer] = (now, p)
        return p
