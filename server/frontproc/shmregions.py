"""Client shared memory over lanes, a frontend process's side: the registered client regions as
the router told them (``frontproc.shmmirror`` has the protocol), so that a lane request may
name one. A request whose region this process does not know, or whose offset and size do not
fit in it, goes through the router, which answers with its own texts: this table only ever
says yes to what the router would accept."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shoal.proto import wire
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.peers import Peer
from shoal.server.types import ShmRef


class FrontRegion:
    """One region told by the router."""

    __slots__ = ("id", "byte_size", "template", "uses", "dropped")

    def __init__(self, template: wpb.ClientShm) -> None:
        self.id = int(template.region_id)
        self.byte_size = int(template.region_bytes)
        self.template = template
        self.uses = 0
        """Lane requests of this process naming it, not answered yet."""
        self.dropped = False

    def describe(self, ref: ShmRef, out: wpb.ClientShm) -> None:
        """The worker's descriptor of the tensor ``ref`` places in this region."""
        out.CopyFrom(self.template)
        out.offset = ref.offset
        out.nbytes = ref.byte_size


Send = Callable[[wpb.Envelope], None]


class ShmRegions:
    def __init__(self, send: Send, *, any_owner: bool = False) -> None:
        self._send = send
        self._by_name: dict[tuple[str, str], FrontRegion] = {}
        self._by_id: dict[int, FrontRegion] = {}
        self.any_owner = any_owner
        """``--client-shm-access=any``: every client uses one namespace (the server's own
        setting, as the router's registry reads it)."""

    def __len__(self) -> int:
        return len(self._by_name)

    def update(self, msg: wpb.ShmRegions) -> None:
        """The router's news: regions added, dropped (answered with ``ShmDropped``)."""
        if msg.reset:
            self._by_name.clear()
            self._by_id.clear()
        for entry in msg.add:
            added = FrontRegion(entry.region)
            self._by_name[(entry.owner, entry.name)] = added
            self._by_id[added.id] = added
        if not msg.drop:
            return
        idle = []
        for region_id in msg.drop:
            region = self._by_id.pop(int(region_id), None)
            if region is None:
                idle.append(region_id)  # never had it: nothing here uses it
                continue
            region.dropped = True
            for key in [k for k, r in self._by_name.items() if r is region]:
                del self._by_name[key]
            if not region.uses:
                idle.append(region_id)
        self._answer(msg.call_id, idle)

    def _answer(self, call_id: int, idle: Iterable[int]) -> None:
        env = wire.envelope(0)
        env.shm_dropped.call_id = call_id
        env.shm_dropped.idle.extend(idle)
        self._send(env)

    def owner(self, peer: Peer | None) -> str | None:
        """The namespace of ``peer``'s regions, as the router's registry computes it
        (``None``: not known here)."""
        if self.any_owner:
            return ""
        if peer is None:
            return None
        return peer.owner

    def find(self, owner: str, ref: ShmRef) -> FrontRegion | None:
        """The region ``ref`` names when the router would accept the offset and size."""
        region = self._by_name.get((owner, ref.region_name))
        if region is None or ref.offset >= region.byte_size or ref.offset + ref.byte_size > region.byte_size:
            return None
        return region

    def use(self, regions: list[FrontRegion]) -> None:
        for region in regions:
            region.uses += 1

    def done(self, regions: list[FrontRegion]) -> None:
        """A lane request naming ``regions`` is answered (or lost)."""
        idle = []
        for region in regions:
            region.uses -= 1
            if region.dropped and not region.uses:
                idle.append(region.id)
        if idle:
            self._answer(0, idle)
