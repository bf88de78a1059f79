"""Client shared memory over lanes, the router's side: every frontend process is told the
registered client regions (``ShmRegions``), so that a request naming one of them goes straight
to a worker over a lane (``frontproc.shmregions``) instead of through the router, which every
shared-memory request crossed before (the local clients that use shared memory are the ones
that want speed most).

DESIGN. The registry (``server.sharedmem``) stays the one authority: registration and
unregistration still happen here, and a frontend uses only regions it was told of, after
the same bounds checks; anything it does not know (a region registered a moment ago, a bad
offset) goes through the router, which answers with its own texts.

- **Holds.** A region told to a frontend counts one use in the registry (``hold``) until that
  frontend says it is idle, so that workers are not told to unmap it (``Forget``) while a
  lane request of that frontend may still name it. A frontend that exits gives its holds up.
- **Unregister is a barrier.** It answers the client only once every frontend holding a
  dropped region has taken it out of its table (``ShmDropped.call_id``; at most
  ``DROP_TIMEOUT_S``): a request sent after the answer names a region no frontend knows and
  gets the router's "not found", as without frontends. Requests already in flight keep the
  region until they finish (``ShmDropped.idle``), as the router's own requests do.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Iterable

from shoal.proto import wire
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.sharedmem import Region, SharedMemoryRegistry

log = logging.getLogger("shoal.shm")

DROP_TIMEOUT_S = 5.0
"""How long an unregistration waits for a frontend to drop its regions at most (a frontend
that does not answer still holds them: they stay mapped in the workers until it does, or
exits)."""


class ShmMirror:
    def __init__(self, registry: SharedMemoryRegistry, channel: WorkerChannel, frontends: list[bytes]) -> None:
        self.registry = registry
        self.channel = channel
        self.frontends = frontends
        """The frontend processes' identities on the channel."""
        self._held: dict[bytes, dict[int, Region]] = {}
        """The regions held for each frontend (told, and not idle yet), by id."""
        self._drops: dict[int, tuple[asyncio.Future[None], set[bytes]]] = {}
        """Unregistrations waiting for frontends to drop regions, by call id."""
        self._ids = itertools.count(1)
        channel.services["shm_dropped"] = self.on_dropped
        channel.on_disconnect.append(self.forget)

    def _entry(self, region: Region, out: wpb.ShmEntry) -> None:
        out.owner, out.name = region.owner, region.name
        region.descriptor(0, 0, out.region)

    def _hold(self, identity: bytes, regions: Iterable[Region]) -> None:
        held = self._held.setdefault(identity, {})
        for region in regions:
            if region.id not in held:
                held[region.id] = region
                self.registry.hold(region)

    def _send(self, identity: bytes, env: wpb.Envelope) -> bool:
        try:
            self.channel.send(identity, env)
        except ServingError:  # not connected: it gets the whole table when it is ready
            return False
        return True

    def send(self, identity: bytes) -> None:
        """The whole table to a frontend (one that just started)."""
        regions = self.registry.regions()
        env = wire.envelope(0)
        table = env.shm_regions
        table.reset = True
        for region in regions:
            self._entry(region, table.add.add())
        if self._send(identity, env):
            self._hold(identity, regions)

    def added(self, region: Region) -> None:
        """A region was registered: every frontend may use it."""
        if not region.registered:  # unregistered while its registration was checked
            return
        env = wire.envelope(0)
        self._entry(region, env.shm_regions.add.add())
        for identity in self.frontends:
            if self._send(identity, env):
                self._hold(identity, (region,))

    async def dropped(self, regions: list[Region]) -> None:
        """Regions were unregistered: returns once no frontend takes a new request naming one
        of them (or after ``DROP_TIMEOUT_S``)."""
        ids = {r.id for r in regions}
        waiting: set[bytes] = set()
        call_id = next(self._ids)
        for identity in self.frontends:
            held = self._held.get(identity)
            drop = [i for i in ids if held and i in held]
            if not drop:
                continue
            env = wire.envelope(0)
            env.shm_regions.drop.extend(drop)
            env.shm_regions.call_id = call_id
            if self._send(identity, env):
                waiting.add(identity)
            else:  # gone: nothing of it uses them
                self._release(identity, drop)
        if not waiting:
            return
        fut = asyncio.get_running_loop().create_future()
        self._drops[call_id] = (fut, waiting)
        try:
            await asyncio.wait_for(asyncio.shield(fut), DROP_TIMEOUT_S)
        except TimeoutError:
            log.warning("frontend processes %s did not drop unregistered regions within %.0f s",
                        sorted(i.decode(errors="replace") for i in waiting), DROP_TIMEOUT_S)  # fmt: skip
        finally:
            self._drops.pop(call_id, None)

    def _release(self, identity: bytes, ids: Iterable[int]) -> None:
        held = self._held.get(identity)
        if not held:
            return
        for i in ids:
            region = held.pop(i, None)
            if region is not None:
                self.registry.release(region)

    def _answered(self, identity: bytes, call_id: int) -> None:
        pending = self._drops.get(call_id)
        if pending is None:
            return
        fut, waiting = pending
        waiting.discard(identity)
        if not waiting and not fut.done():
            fut.set_result(None)

    def on_dropped(self, identity: bytes, env: wpb.Envelope, frames: list[bytes]) -> None:
        msg = env.shm_dropped
        self._release(identity, msg.idle)
        if msg.call_id:
            self._answered(identity, msg.call_id)

    def forget(self, identity: bytes) -> None:
        """A frontend process is gone: its holds and its pending answers with it."""
        held = self._held.pop(identity, None)
        for region in (held or {}).values():
            self.registry.release(region)
        for call_id in list(self._drops):
            self._answered(identity, call_id)
