"""gRPC ``ModelStreamInfer``: a bidirectional stream of requests, answered as responses are
ready (one per request of a model that is not decoupled, any number for a decoupled model's),
with Triton's ``triton_final_response`` parameter and its empty-final-response rule."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import grpc

from shoal.proto.errors import InvalidInput, ServingError, detach, from_exception
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.server.dataplane import GRPC_DECOUPLED_ERROR
from shoal.server.frontends.grpc import codec
from shoal.server.frontends.grpc.common import MALFORMED, MALFORMED_MESSAGE, restricted
from shoal.server.logthrottle import client_error

if TYPE_CHECKING:
    from shoal.server.frontends.grpc.service import InferenceService
    from shoal.server.tracing import Trace

log = logging.getLogger("shoal.grpc")

FINAL_PARAMETER = "triton_final_response"
"""Set on every streamed response: true on the last one of its request (as Triton)."""
UNWRITTEN = 64
"""Responses of one streamed request waiting to be written to the client at most."""
Entry = tuple[pb.ModelStreamInferResponse | None, bool, Callable[[], None] | None]
"""A message for the stream's writer, whether it is its request's last, what to call once
it is written."""


def _stream_error(req: Any, exc: BaseException) -> pb.ModelStreamInferResponse:
    """A streamed request's failure: ``error_message``, and the request's id, model and
    version (as Triton fills them), with ``triton_final_response`` true."""
    err = from_exception(exc)
    if not isinstance(exc, ServingError):
        log.exception("unhandled error in a streamed request", exc_info=exc)
    else:
        client_error(log, exc, "ModelStreamInfer")
    msg = pb.ModelStreamInferResponse(error_message=err.message)
    if req is not MALFORMED:
        msg.infer_response.id = req.id
        msg.infer_response.model_name = req.model_name
        msg.infer_response.model_version = req.model_version
    msg.infer_response.parameters[FINAL_PARAMETER].bool_param = True
    detach(exc)
    return msg


async def model_stream_infer(
    service: InferenceService, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
) -> AsyncIterator[pb.ModelStreamInferResponse]:
    """Responses as they are ready, possibly out of order across requests: one per request
    of a model that is not decoupled, any number (in order) for a decoupled model's request,
    each with the ``triton_final_response`` parameter (true on a request's last). A failed
    request answers with ``error_message`` and the stream goes on. At most
    ``stream_max_pending`` requests are in flight or answered and not yet taken by the
    client: past that the stream's next request is not read (so a client that never reads
    cannot grow the router through new requests)."""
    denied = restricted(service, "inference", context)
    if denied is not None:
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(denied)
        return
    # (message or None, whether it is its request's last, what to call once it is written);
    # None after the last request
    queue: asyncio.Queue[Entry | None] = asyncio.Queue()
    running: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(service.stream_max_pending)

    async def handle(req: pb.ModelInferRequest) -> None:
        trace = None
        if service.dp.tracer.active and req is not MALFORMED:
            trace = service.sample_trace(req, context)
        try:
            if req is MALFORMED:
                raise InvalidInput(MALFORMED_MESSAGE)
            await service.stream_request(req, context, queue.put_nowait, trace)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported on the stream
            msg = _stream_error(req, exc)
        finally:
            if trace is not None:  # handed to the stream's writer: Triton's GRPC_SEND_START
                trace.stamp("GRPC_SEND_START")
                trace.finish()
        queue.put_nowait((msg, True, None))

    async def read() -> None:
        try:
            async for req in request_iterator:
                await slots.acquire()
                task = asyncio.create_task(handle(req))
                running.add(task)
                task.add_done_callback(running.discard)
                del req
            while running:
                await asyncio.wait(set(running))
        finally:
            queue.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (entry := await queue.get()) is not None:
            msg, last, written = entry
            if msg is not None:
                yield msg
            if written is not None:
                written()
            if last:
                slots.release()
        await reader  # re-raise a broken request stream
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()


async def stream_request(
    service: InferenceService,
    request: pb.ModelInferRequest,
    context: Any,
    put: Callable[[Entry], None],
    trace: Trace | None = None,
) -> None:
    """One streamed request's responses, each as it comes (``DataPlane.responses``: any
    number for a decoupled model, one for another model; a failure before the first raises).
    A decoupled model's last is only sent when it carries a response, or when the request
    set ``triton_enable_empty_final_response`` (Triton's rule). At most ``UNWRITTEN`` of them
    wait to be written to the client: past that the model's responses are not taken (and
    its response sender waits), so a slow reader slows the model instead of filling memory.
    A frontend process runs the same code with its ``RemoteDataPlane``."""
    unwritten = asyncio.Semaphore(UNWRITTEN)
    held = request.ByteSize()
    service.budget.take(held)  # grpc has the whole message in memory already: refuse to keep it
    try:
        req = codec.decode_request(request)
        if req.uses_shm:
            req.peer = service.peer(context)
        if service.forward:
            service.forward.apply(context.invocation_metadata() or (), req.parameters)
        empty_final = req.parameters.get("triton_enable_empty_final_response") is True
        req.trace = trace
        async with aclosing(service.dp.responses(req, decoupled_error=GRPC_DECOUPLED_ERROR)) as items:
            async for item, final in items:
                msg = pb.ModelStreamInferResponse()
                if item is None:
                    if not (final and empty_final):
                        put((None, final, None))
                        continue
                    msg.infer_response.id = request.id
                    msg.infer_response.model_name = request.model_name
                    msg.infer_response.model_version = request.model_version
                elif isinstance(item, ServingError):
                    msg = _stream_error(request, item)
                else:
                    try:
                        codec.encode_response(item, msg.infer_response)
                    finally:
                        item.done()
                msg.infer_response.parameters[FINAL_PARAMETER].bool_param = final
                await unwritten.acquire()
                put((msg, final, unwritten.release))
    finally:
        service.budget.give(held)
