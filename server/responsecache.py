"""Triton's response cache, the ``local`` implementation (``--cache-config local,size=N`` on
the server, ``response_cache { enable: true }`` on a model): finished responses kept in the
router, least recently used evicted first, bounded by the bytes of their tensors.

A request's key is a digest of the model name and version, each input's name, datatype,
shape and bytes (Triton hashes names and bytes only: two shapes of the same bytes would share
an entry there), the requested outputs with their parameters, and the request's own
parameters except those that only steer scheduling (``priority``, ``timeout``). Requests whose
inputs or outputs are in client shared memory skip the cache (neither hit nor miss): their
bytes are not the router's to read or write. Owned by the router's event loop."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson

from shoal.server.types import InferRequest, InferResult, OutputTensor

_SCHEDULING_PARAMETERS = frozenset({"priority", "timeout"})
_ENTRY_OVERHEAD = 128
"""Bytes counted per entry beyond its tensors (key, names, shapes), so that many empty
responses cannot grow the cache without bound."""


@dataclass(frozen=True, slots=True)
class Entry:
    outputs: tuple[tuple[str, str, tuple[int, ...], bytes], ...]
    parameters: dict[str, Any]
    nbytes: int

    def result(self, request: InferRequest) -> InferResult:
        return InferResult(
            model_name=request.model_name,
            model_version=request.model_version,
            outputs=[OutputTensor(name=n, datatype=d, shape=s, data=b) for n, d, s, b in self.outputs],
            id=request.id,
            parameters=dict(self.parameters),
        )


def cacheable(request: InferRequest) -> bool:
    if request.uses_shm or request.null:
        return False
    return request.outputs is None or all(o.shm is None for o in request.outputs)


def key(request: InferRequest) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{request.model_name}\0{request.model_version}\0".encode())
    for t in sorted(request.inputs, key=lambda t: t.name):
        h.update(f"{t.name}\0{t.datatype}\0{t.shape}\0{len(t.data)}\0".encode())
        h.update(t.data)
    if request.outputs is None:
        h.update(b"\0all outputs")
    else:
        for o in sorted(request.outputs, key=lambda o: o.name):
            h.update(f"\0out {o.name}\0".encode())
            h.update(orjson.dumps(o.parameters, option=orjson.OPT_SORT_KEYS, default=str))
    params = {k: v for k, v in request.parameters.items() if k not in _SCHEDULING_PARAMETERS}
    h.update(orjson.dumps(params, option=orjson.OPT_SORT_KEYS, default=str))
    return h.digest()


class ResponseCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.lookups = self.hits = self.misses = self.inserts = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, k: bytes) -> Entry | None:
        self.lookups += 1
        entry = self._entries.get(k)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(k)
        self.hits += 1
        return entry

    def put(self, k: bytes, result: InferResult) -> None:
        """Keep a copy of ``result``'s outputs (they may view a worker's shared memory). An
        entry larger than the whole cache is not kept."""
        outputs = tuple((o.name, o.datatype, tuple(o.shape), bytes(o.data)) for o in result.outputs)
        nbytes = _ENTRY_OVERHEAD + sum(len(b) for *_, b in outputs)
        if nbytes > self.max_bytes or k in self._entries:
            return
        while self.bytes + nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.nbytes
            self.evictions += 1
        self._entries[k] = Entry(outputs, dict(result.parameters), nbytes)
        self.bytes += nbytes
        self.inserts += 1
