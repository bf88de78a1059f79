"""A client's inference request and its answer on the worker channel, between a frontend
process and the router: ``InferRequest`` <-> ``BlsCall``, ``InferResult`` <- ``BlsReply``.

Small inputs travel as frames (copied into the message); larger ones are written into the
frontend's own arena and read in place by the worker (``ShmSlice``; the frontend frees them
when the call ends). Outputs in a worker's arena are passed by reference and read in place
by the frontend, which says ``BlsDone`` when its response is written."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from shoal.proto import wire
from shoal.proto.errors import ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.peers import parse_peer, peer_value
from shoal.server.types import (
    ArenaRef,
    Buffer,
    InferRequest,
    InferResult,
    InputTensor,
    Lease,
    OutputTensor,
    RequestedOutput,
    ShmRef,
)
from shoal.shm.block import Block


def _named(ref: ShmRef, out: wpb.NamedRegion) -> None:
    out.name, out.offset, out.nbytes = ref.region_name, ref.offset, ref.byte_size


def pack_call(
    call_id: int, req: InferRequest, frontend: str, place: Callable[[Buffer], Block | None] | None = None
) -> tuple[wpb.Envelope, list[Any], list[Block]]:
    """The call's message and frames, and the blocks ``place`` put inputs in (``place``:
    copies a large input into shared memory; ``None`` for a small one)."""
    env = wire.envelope(0)
    call = env.bls_call
    call.call_id = call_id
    call.model_name = req.model_name
    call.model_version = req.model_version
    call.frontend = frontend
    if req.peer is not None:
        call.peer = peer_value(req.peer)
    r = call.request
    if req.id:
        r.request_id = req.id
    if req.parameters:
        r.parameters_json = json.dumps(req.parameters)
    frames: list[Any] = []
    blocks: list[Block] = []
    pack_inputs(req, r, frames, blocks, place, parameters=True)
    for o in req.outputs or ():
        r.outputs.append(o.name)
        # binary_data is how the frontend writes the output: the router need not know it
        params = {k: v for k, v in o.parameters.items() if k != "binary_data"} if o.parameters else None
        if params or o.shm is not None:
            spec = r.output_specs.add()
            spec.name = o.name
            if params:
                spec.parameters_json = json.dumps(params)
            if o.shm is not None:
                _named(o.shm, spec.region)
    return env, frames, blocks


def pack_inputs(
    req: InferRequest,
    r: wpb.Request,
    frames: list[Any],
    blocks: list[Block],
    place: Callable[[Buffer], Block | None] | None,
    *,
    parameters: bool,
    client: Callable[[ShmRef, wpb.ClientShm], None] | None = None,
) -> None:
    """``req``'s inputs into ``r``: in a client's region (named, or described by ``client``
    for a worker), in a block ``place`` gave (a large one), else as a frame; ``parameters``:
    with each input's parameters (the router reads them; a worker does not)."""
    for t in req.inputs:
        ref = r.inputs.add()
        ref.name, ref.datatype = t.name, t.datatype
        ref.shape.extend(t.shape)
        if parameters and t.parameters:
            ref.parameters_json = json.dumps(t.parameters)
        if t.shm is not None:
            if client is not None:
                client(t.shm, ref.client)
            else:
                _named(t.shm, ref.named)
            continue
        block = place(t.data) if place is not None else None
        if block is not None:
            blocks.append(block)
            sl = ref.shm
            sl.region, sl.offset, sl.nbytes, sl.device = block.region, block.offset, block.nbytes, block.device
        else:
            ref.frame = len(frames)
            frames.append(t.data)


def _shm_ref(n: wpb.NamedRegion) -> ShmRef:
    return ShmRef(n.name, int(n.offset), int(n.nbytes))


def unpack_call(
    call: wpb.BlsCall, frames: list[bytes], view: Callable[[Block], memoryview], lease: Callable[[], Lease]
) -> InferRequest:
    """The router's ``InferRequest`` of a frontend's call (the data plane validates it);
    ``view`` maps a block of the frontend's arena; ``lease()`` gives the lease the dispatcher
    holds while a worker reads such blocks (asked only when there are some)."""
    r = call.request
    inputs = []
    for ref in r.inputs:
        params = json.loads(ref.parameters_json) if ref.parameters_json else {}
        where = ref.WhichOneof("location")
        if where == "named":
            t = InputTensor(ref.name, ref.datatype, tuple(ref.shape), b"", params, shm=_shm_ref(ref.named))
        elif where == "frame" and ref.frame < len(frames):
            t = InputTensor(ref.name, ref.datatype, tuple(ref.shape), frames[ref.frame], params)
        elif where == "shm":  # the worker reads it in place; the frontend frees it after the answer
            sl = ref.shm
            block = Block(sl.region, sl.offset, sl.nbytes, sl.device)
            t = InputTensor(ref.name, ref.datatype, tuple(ref.shape), view(block), params)
            t.arena = ArenaRef(block, lease())
        else:
            raise ServingError(f"input '{ref.name}' carries no data")
        inputs.append(t)
    outputs = None
    if r.outputs:
        outputs = [RequestedOutput(name) for name in r.outputs]
        if r.output_specs:
            by_name = {o.name: o for o in outputs}
            for s in r.output_specs:
                o = by_name[s.name]  # a name the frontend listed
                if s.parameters_json:
                    o.parameters = json.loads(s.parameters_json)
                if s.HasField("region"):
                    o.shm = _shm_ref(s.region)
    request = InferRequest(
        model_name=call.model_name,
        model_version=int(call.model_version),
        inputs=inputs,
        outputs=outputs,
        id=r.request_id,
        parameters=json.loads(r.parameters_json) if r.parameters_json else {},
    )
    request.peer = parse_peer(call.peer)  # a client's request: never the server's own caller
    return request


def unpack_result(
    res: wpb.Result, frames: list[Any], view: Callable[[Block], memoryview], release: Callable[[], None] | None
) -> InferResult | ServingError:
    """A frontend's ``InferResult`` of a reply; ``release`` (when the reply holds outputs in
    shared memory) runs when the result is done."""
    if res.HasField("error"):
        return wire.to_error(res.error)
    outputs = []
    for ref in res.outputs:
        where = ref.WhichOneof("location")
        shape = tuple(ref.shape)
        if where == "named" or where == "client":  # named: from the router; client: from a worker (a lane)
            written = int(ref.named.nbytes if where == "named" else ref.client.nbytes)
            outputs.append(OutputTensor(ref.name, ref.datatype, shape, b"", in_shm=True, written=written))
            continue
        if where == "shm":
            s = ref.shm
            data: Any = view(Block(s.region, s.offset, s.nbytes, s.device))
        else:
            data = frames[ref.frame]
        outputs.append(OutputTensor(ref.name, ref.datatype, shape, data))
    return InferResult(
        model_name=res.model_name,
        model_version=int(res.model_version),
        outputs=outputs,
        id=res.request_id,
        parameters=json.loads(res.parameters_json) if res.parameters_json else {},
        release=release,
    )
