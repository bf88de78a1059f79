"""``SharedMemoryRegistry``: the client shared-memory regions (Triton's system and CUDA
shared-memory extensions); system and CUDA regions share each client's namespace.

The router never maps a client region: it checks the key at registration (``shmkeys``: a
regular file, large enough, not one of the server's own), checks every tensor's offset and
size against the registration, and hands workers a descriptor (``ClientShm``); the worker
that executes the request opens the region and reads or writes the bytes there.

A region is reference counted by the requests that use it. Unregistering removes the name
at once (it can be registered again); the registration itself lives until the last request
using it has finished, and only then are workers told to unmap it (``on_forget``).

Access (``access="local"``, the default; ``"any"`` is Triton's behaviour): only clients on
this host (loopback) may register regions, or remote ones that passed the shared-memory
restricted-API check; a local client may only register objects its own user owns (the
kernel tells its uid, ``server.peers``); every client sees, uses and unregisters only its own
regions (its namespace: its user, else its address). ``key_prefixes`` optionally limits the
keys any client may register. The number of regions is bounded per client and overall.

Errors sent to clients never contain keys (so a malformed or reserved key keeps Shoal's
texts: Triton's quote the key), and a failed registration says the same thing (Triton's
"invalid args", naming the client's region) whether the key does not exist, may not be used
or is too small (no existence or size oracle; a leaked name was the first step of
CVE-2025-23320); the server log has details. The other errors Triton also has use its texts
(``proto.errortexts``), which name the client's own region.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.proto import errortexts as T
from shoal.proto.errors import ErrorCode, InvalidInput, PermissionDenied, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.peers import Peer
from shoal.server.shmkeys import normalize_key, open_checked, u64, unusable
from shoal.server.types import InferRequest, ShmRef

log = logging.getLogger("shoal.shm")

CUDA_IPC_HANDLE_SIZE = 64
MAX_REGIONS = 4096
MAX_REGIONS_PER_CLIENT = 1024
ACCESS_MODES = ("local", "any")
_NAME_MAX = 255
DISABLED_MESSAGE = T.SHM_DISABLED.template
REMOTE_MESSAGE = (
    "shared memory regions can only be registered by clients on the server's host "
    "(start the server with --client-shm-access=any to allow any client, as Triton does)"
)


@dataclass(eq=False, slots=True)
class Region:
    name: str
    id: int
    byte_size: int
    key: str = ""  # system: POSIX object name without the leading slash
    key_given: str = ""  # system: the key as the client spelled it (status echoes it)
    offset: int = 0  # system: where the region starts in the object
    device_id: int = -1  # CUDA: the client's device ordinal
    raw_handle: bytes = b""  # CUDA: cudaIpcMemHandle_t
    owner: str = ""  # the namespace of the client that registered it
    object_device: int = 0  # system: st_dev and st_ino of the object checked at registration
    object_inode: int = 0
    users: int = 0
    registered: bool = True

    @property
    def cuda(self) -> bool:
        return self.device_id >= 0

    def descriptor(self, offset: int, nbytes: int, out: wpb.ClientShm) -> None:
        out.region_id = self.id
        out.region_bytes = self.byte_size
        out.offset = offset
        out.nbytes = nbytes
        if self.cuda:
            out.cuda_handle = self.raw_handle
            out.device = self.device_id
        else:
            out.key = self.key
            out.region_offset = self.offset
            out.object_device = self.object_device
            out.object_inode = self.object_inode
            out.device = -1


class SharedMemoryRegistry:
    """The registered regions of every client. Owned by the router's event loop.

    ``peer``: the client calling (``None``: a caller inside the server, trusted, in the one
    shared namespace); ``trusted``: it passed the shared-memory restricted-API check."""

    def __init__(
        self,
        *,
        allowed: bool = True,
        gpu_count: Callable[[], int] = lambda: 0,
        access: str = "local",
        key_prefixes: Sequence[str] = (),
        max_regions: int = MAX_REGIONS,
        max_regions_per_client: int = MAX_REGIONS_PER_CLIENT,
    ) -> None:
        if access not in ACCESS_MODES:
            raise ValueError(f"access must be one of {ACCESS_MODES}")
        self.allowed = allowed
        self.access = access
        self.key_prefixes = tuple(p.lstrip("/") for p in key_prefixes)
        self.max_regions = max_regions
        self.max_regions_per_client = max_regions_per_client
        self._gpu_count = gpu_count
        self._regions: dict[tuple[str, str], Region] = {}
        self._per_owner: Counter[str] = Counter()
        self._ids = itertools.count(1)
        self.on_forget: Callable[[Sequence[int]], None] | None = None
        self.prober: Callable[[Region], Awaitable[None]] | None = None
        """Opens a new CUDA region in a worker (the router has no CUDA); raises if it fails."""

    def owner(self, peer: Peer | None) -> str:
        """The namespace of ``peer``'s regions ("" for everyone under ``access="any"``)."""
        if peer is None or self.access == "any":
            return ""
        return peer.owner

    def _check_allowed(self) -> None:
        if not self.allowed:
            raise T.SHM_DISABLED()

    def _check_new(self, name: str, peer: Peer | None, trusted: bool) -> str:
        """Checks before a registration; returns the owner namespace of the new region."""
        self._check_allowed()
        if self.access == "local" and peer is not None and not (peer.local or trusted):
            log.info("shared memory registration from remote peer %s refused", peer.host)
            raise PermissionDenied(REMOTE_MESSAGE)
        if not name or len(name) > _NAME_MAX or "\x00" in name:
            raise InvalidInput(f"shared memory region name must be 1 to {_NAME_MAX} characters")
        owner = self.owner(peer)
        if (owner, name) in self._regions:
            raise T.SHM_EXISTS(region=name)
        if self._per_owner[owner] >= self.max_regions_per_client:
            raise ServingError(
                f"too many shared memory regions registered by this client (limit {self.max_regions_per_client}, "
                "--client-shm-max-regions-per-client); unregister some first",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )
        if len(self._regions) >= self.max_regions:
            raise ServingError(
                f"too many shared memory regions registered on this server (limit {self.max_regions}, "
                "--client-shm-max-regions)",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )
        return owner

    def _add(self, region: Region) -> Region:
        self._regions[(region.owner, region.name)] = region
        self._per_owner[region.owner] += 1
        return region

    # ---- system regions -----------------------------------------------------------------------

    def register_system(
        self, name: str, key: Any, offset: Any, byte_size: Any, peer: Peer | None = None, *, trusted: bool = False
    ) -> Region:
        owner = self._check_new(name, peer, trusted)
        if not isinstance(key, str):
            raise InvalidInput("system shared memory registration needs a string 'key'")
        offset = u64(offset, "'offset'")
        byte_size = u64(byte_size, "'byte_size'")
        if byte_size == 0:
            raise InvalidInput("'byte_size' of a shared memory region must be greater than 0")
        obj = normalize_key(key)
        if self.key_prefixes and not obj.startswith(self.key_prefixes):
            log.info("register %r: key %r is not under an allowed prefix", name, obj)
            raise unusable(name)
        ident = open_checked(obj, name)
        uid = peer.uid if peer is not None and self.access == "local" else None
        if uid not in (None, 0) and ident.uid != uid:
            log.info("register %r: key %r belongs to uid %d, not to the client's uid %d", name, obj, ident.uid, uid)
            raise unusable(name)
        if offset + byte_size > ident.size:
            log.info("register %r: key %r offset %d + %d exceeds %d", name, obj, offset, byte_size, ident.size)
            raise unusable(name)
        region = Region(
            name=name,
            id=next(self._ids),
            byte_size=byte_size,
            key=obj,
            key_given=key,
            offset=offset,
            owner=owner,
            object_device=ident.device,
            object_inode=ident.inode,
        )
        log.info("registered system shared memory region %r (key %r, %d bytes at %d)", name, obj, byte_size, offset)
        return self._add(region)

    # ---- CUDA regions -------------------------------------------------------------------------

    def register_cuda(
        self,
        name: str,
        raw_handle: Any,
        device_id: Any,
        byte_size: Any,
        peer: Peer | None = None,
        *,
        trusted: bool = False,
    ) -> Region:
        """``raw_handle``: the 64 handle bytes (gRPC) or their base64 text (HTTP)."""
        owner = self._check_new(name, peer, trusted)
        if isinstance(raw_handle, str):
            try:
                # perf_analyzer's libb64 breaks its base64 into lines; whitespace is not data
                raw_handle = base64.b64decode("".join(raw_handle.split()), validate=True)
            except (binascii.Error, ValueError):
                raw_handle = b""
        if not isinstance(raw_handle, bytes) or len(raw_handle) != CUDA_IPC_HANDLE_SIZE:
            raise T.SHM_CUDA_HANDLE()
        device_id = u64(device_id, "'device_id'")
        byte_size = u64(byte_size, "'byte_size'")
        if byte_size == 0:
            raise InvalidInput("'byte_size' of a shared memory region must be greater than 0")
        gpus = self._gpu_count()
        if gpus == 0:
            raise T.SHM_CUDA_NO_GPUS(region=name)
        if device_id >= gpus:
            raise InvalidInput(
                f"failed to register CUDA shared memory region: device_id {device_id} is not one of "
                f"the server's {gpus} GPUs"
            )
        region = Region(
            name=name, id=next(self._ids), byte_size=byte_size, device_id=device_id, raw_handle=raw_handle, owner=owner
        )
        log.info("registered CUDA shared memory region %r (device %d, %d bytes)", name, device_id, byte_size)
        return self._add(region)

    async def register_cuda_checked(
        self,
        name: str,
        raw_handle: Any,
        device_id: Any,
        byte_size: Any,
        peer: Peer | None = None,
        *,
        trusted: bool = False,
    ) -> Region:
        """``register_cuda``, then have a worker open the handle, as Triton opens it at
        registration; a handle that does not open is not registered (Triton's texts: one that
        opens but is smaller than ``byte_size`` is "invalid args" naming the region). With no
        worker running the check happens at first use."""
        region = self.register_cuda(name, raw_handle, device_id, byte_size, peer, trusted=trusted)
        if self.prober is not None:
            try:
                await self.prober(region)
            except BaseException as exc:
                if self._regions.get((region.owner, name)) is region:
                    self._remove([region])
                if (
                    isinstance(exc, ServingError)
                    and exc.code is ErrorCode.INVALID_ARGUMENT
                    and exc.message != T.SHM_CUDA_OPEN.template
                ):
                    log.info("register CUDA region %r refused: %s", name, exc.message)
                    raise T.SHM_INVALID_ARGS(region=name) from None
                raise
        return region

    # ---- status and unregister ----------------------------------------------------------------

    def status(self, name: str | None, *, cuda: bool, peer: Peer | None = None) -> list[Region]:
        """The calling client's regions of one kind (or the one named)."""
        self._check_allowed()
        owner = self.owner(peer)
        if name:
            region = self._regions.get((owner, name))
            if region is None:
                raise T.SHM_STATUS_UNKNOWN(kind="cuda" if cuda else "system", region=name)
            if region.cuda != cuda:
                kinds = ("CUDA", "system") if region.cuda else ("system", "CUDA")
                raise T.SHM_WRONG_KIND(region=name, is_kind=kinds[0], asked=kinds[1])
            return [region]
        return [r for r in self._regions.values() if r.cuda == cuda and r.owner == owner]

    def regions(self) -> list[Region]:
        """Every registered region."""
        return list(self._regions.values())

    def unregister(self, name: str | None, *, cuda: bool, peer: Peer | None = None) -> list[Region]:
        """Unregister one of the client's regions or, with no name, every region of the kind
        it registered; returns them. Unknown names succeed (as Triton). Requests already using
        a region keep it until they finish."""
        self._check_allowed()
        owner = self.owner(peer)
        if name:
            region = self._regions.get((owner, name))
            targets = [region] if region is not None and region.cuda == cuda else []
        else:
            targets = [r for r in self._regions.values() if r.cuda == cuda and r.owner == owner]
        self._remove(targets)
        return targets

    def _remove(self, targets: list[Region]) -> None:
        gone = []
        for region in targets:
            del self._regions[(region.owner, region.name)]
            self._per_owner[region.owner] -= 1
            if not self._per_owner[region.owner]:
                del self._per_owner[region.owner]
            region.registered = False
            log.info("unregistered %s shared memory region %r", "CUDA" if region.cuda else "system", region.name)
            if region.users == 0:
                gone.append(region.id)
            else:
                log.info("region %r unregistered; unmapped after %d requests finish", region.name, region.users)
        if gone:
            self._forget(gone)

    def _forget(self, ids: Sequence[int]) -> None:
        log.debug("workers unmap regions %s", list(ids))
        if self.on_forget is not None:
            self.on_forget(ids)

    # ---- use by requests ----------------------------------------------------------------------

    def resolve(self, ref: ShmRef, what: str, owner: str = "") -> Region:
        """The region ``ref`` names in ``owner``'s namespace, bounds-checked, with a use
        counted (give it back with ``release``). ``what``: the tensor, for callers' logs."""
        if not self.allowed:
            raise T.SHM_DISABLED()
        region = self._regions.get((owner, ref.region_name))
        if region is None:
            raise T.SHM_NOT_FOUND(region=ref.region_name)
        if ref.offset >= region.byte_size:
            raise T.SHM_BAD_OFFSET(region=ref.region_name)
        if ref.offset + ref.byte_size > region.byte_size:
            raise T.SHM_BAD_RANGE(region=ref.region_name)
        region.users += 1
        ref.region = region
        return region

    def hold(self, region: Region) -> None:
        """One more use of a region already resolved (the dispatcher's, until the worker
        is done with it); given back with ``release``."""
        region.users += 1

    def release(self, region: Region) -> None:
        region.users -= 1
        if region.users == 0 and not region.registered:
            self._forget([region.id])

    def bind(self, request: InferRequest) -> None:
        """Resolve every shared-memory reference of ``request`` in its client's namespace;
        on failure nothing stays counted."""
        owner = self.owner(request.peer)
        bound: list[Region] = []
        try:
            for t in request.inputs:
                if t.shm is not None:
                    bound.append(self.resolve(t.shm, f"input '{t.name}'", owner))
            for o in request.outputs or ():
                if o.shm is not None:
                    region = self.resolve(o.shm, f"output '{o.name}'", owner)
                    bound.append(region)
        except BaseException:
            for r in bound:
                self.release(r)
            raise
        request.shm_regions = bound

    def unbind(self, request: InferRequest) -> None:
        regions, request.shm_regions = request.shm_regions, []
        for r in regions:
            self.release(r)
