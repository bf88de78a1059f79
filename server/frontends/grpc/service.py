"""``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on grpc.aio: decode,
call ``DataPlane``, encode. One wrapper checks restricted groups, refuses messages that did
not parse, and maps every ``ServingError`` to a status."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from shoal.proto.errors import InvalidInput, ServingError, detach, from_exception
from shoal.proto.gen import grpc_service_pb2 as pb
from shoal.proto.gen import grpc_service_pb2_grpc as pb_grpc
from shoal.proto.gen import health_pb2, health_pb2_grpc
from shoal.server import restrict, tracing
from shoal.server.dataplane import GRPC_DECOUPLED_ERROR, DataPlane
from shoal.server.frontends.grpc import codec, stream
from shoal.server.frontends.grpc.common import MALFORMED, MALFORMED_MESSAGE, restricted
from shoal.server.frontends.grpc.errors import GRPC_STATUS
from shoal.server.headerforward import HeaderForwarder
from shoal.server.logthrottle import client_error
from shoal.server.peers import PEER_HEADER, Peer, PeerCache, parse_peer
from shoal.server.resources import RequestBudget
from shoal.server.tracing import Trace
from shoal.server.validation import version_number

log = logging.getLogger("shoal.grpc")


Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rpc(category: str) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Check the restricted group ``category``, then turn ``ServingError`` (and any bug)
    into a gRPC status with the error's message. The error is detached before the status is
    sent, so nothing it passed through (a request of hundreds of MB) outlives the call."""

    def wrap(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
        @functools.wraps(fn)
        async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
            denied = restricted(self, category, context)
            if denied is not None:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details(denied)
                return None  # type: ignore[return-value]
            if request is MALFORMED:
                context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
                context.set_details(MALFORMED_MESSAGE)
                return None  # type: ignore[return-value]
            try:
                return await fn(self, request, context)
            except asyncio.CancelledError:
                raise
            except ServingError as exc:
                status, message = GRPC_STATUS[exc.code], exc.message
                client_error(log, exc, fn.__name__)
                detach(exc)
            except Exception as exc:  # noqa: BLE001 - an RPC never takes the router down
                if isinstance(exc, grpc.aio.AbortError):
                    raise
                log.exception("unhandled error in %s", fn.__name__)
                err = from_exception(exc)
                status, message = GRPC_STATUS[err.code], err.message
                detach(exc)
            del request
            # not context.abort(): grpc keeps the AbortError it raises on the call's state, and
            # its traceback holds this frame and the context (a cycle per failed call)
            context.set_code(status)
            context.set_details(message)
            return None  # type: ignore[return-value]  # grpc sends no message with a non-OK status

        return wrapper

    return wrap


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        dataplane: DataPlane,
        *,
        restrictions: restrict.Restrictions | None = None,
        peers: PeerCache | None = None,
        stream_max_pending: int = 256,
        budget: RequestBudget | None = None,
        forward: HeaderForwarder | None = None,
    ) -> None:
        self.dp = dataplane
        self.forward = forward or HeaderForwarder("")
        self.budget = budget or RequestBudget(1 << 62)
        self.restrictions = restrictions or restrict.Restrictions()
        self.peers = peers or PeerCache(0)
        self.stream_max_pending = stream_max_pending

    def peer(self, context: Any) -> Peer:
        address = context.peer()
        if address.startswith("unix:"):  # the router's Unix socket: a frontend process forwards
            return parse_peer(dict(context.invocation_metadata() or ()).get(PEER_HEADER))
        return self.peers.get(address)

    def _trusted(self) -> bool:
        """The shared-memory group is restricted (so this caller passed the check)."""
        return "shared-memory" in self.restrictions.rules

    @rpc("health")
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dp.live())

    @rpc("health")
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self.dp.server_ready())

    @rpc("health")
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """``ready: false`` (OK status) for a model or version that is unknown, unloaded or not
        ready, as Triton answers (tritonclient's ``is_model_ready`` returns False then)."""
        version = version_number(request.version)
        try:
            ready = await self.dp.model_ready(request.name, version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=ready)

    @rpc("metadata")
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        meta = self.dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @rpc("metadata")
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dp.model_metadata(request.name, version_number(request.version))
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    @rpc("model-config")
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        resp = pb.ModelConfigResponse()
        resp.config.CopyFrom(self.dp.model_config_message(request.name, version_number(request.version)))
        return resp

    @rpc("inference")
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if self.dp.tracer.active:
            return await self._infer_traced(request, context)
        return await self.infer_message(request, context)

    def sample_trace(self, request: pb.ModelInferRequest, context: Any) -> Trace | None:
        """The request's trace if it is sampled, with Triton's GRPC_WAITREAD_* (both when the
        message is in: grpc.aio calls the handler once it has read it)."""
        now = time.monotonic_ns()
        trace = self.dp.tracer.sample(request.model_name, dict(context.invocation_metadata() or ()))
        if trace is not None:
            trace.stamp("GRPC_WAITREAD_START", now)
            trace.stamp("GRPC_WAITREAD_END", now)
        return trace

    async def _infer_traced(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        trace = self.sample_trace(request, context)
        if trace is None:
            return await self.infer_message(request, context)
        sent = False

        def done(_: Any) -> None:  # the response went out (or the call ended): write the trace
            if sent:
                trace.stamp("GRPC_SEND_END")
            trace.finish()

        context.add_done_callback(done)
        resp = await self.infer_message(request, context, trace)
        trace.stamp("INFER_RESPONSE_COMPLETE")
        trace.stamp("GRPC_SEND_START")
        sent = True
        return resp

    async def infer_message(
        self, request: pb.ModelInferRequest, context: Any, trace: Trace | None = None
    ) -> pb.ModelInferResponse:
        held = request.ByteSize()
        self.budget.take(held)  # grpc has the whole message in memory already: refuse to keep it
        try:
            req = codec.decode_request(request)
            if req.uses_shm:
                req.peer = self.peer(context)
            if self.forward:
                self.forward.apply(context.invocation_metadata() or (), req.parameters)
            req.trace = trace
            result = await self.dp.infer(req, decoupled_error=GRPC_DECOUPLED_ERROR)
        finally:
            self.budget.give(held)
        resp = pb.ModelInferResponse()
        try:
            codec.encode_response(result, resp)
        finally:
            result.done()
        return resp

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """``stream.model_stream_infer``: responses as they are ready, any number per
        request of a decoupled model."""
        async for msg in stream.model_stream_infer(self, request_iterator, context):
            yield msg

    async def stream_request(
        self,
        request: pb.ModelInferRequest,
        context: Any,
        put: Callable[[stream.Entry], None],
        trace: Trace | None = None,
    ) -> None:
        """One request of a ``ModelStreamInfer`` stream: its responses go to ``put``
        (``stream.stream_request``)."""
        await stream.stream_request(self, request, context, put, trace)

    @rpc("logging")
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        settings = self.dp.update_log_settings(codec.param_values(request.settings))
        resp = pb.LogSettingsResponse()
        for key, v in settings.items():
            entry = resp.settings[key]
            if isinstance(v, bool):
                entry.bool_param = v
            elif isinstance(v, int):
                entry.uint32_param = v
            else:
                entry.string_param = str(v)
        return resp

    @rpc("statistics")
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        stats = await self.dp.settled_statistics(request.name, version_number(request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @rpc("model-repository")
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for entry in self.dp.repository_index(request.ready):
            resp.models.add(**entry)
        return resp

    @rpc("model-repository")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        # shielded: a client that gives up does not stop a load half way
        await asyncio.shield(self.dp.load_model(request.model_name, codec.param_values(request.parameters)))
        return pb.RepositoryModelLoadResponse()

    @rpc("model-repository")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await asyncio.shield(self.dp.unload_model(request.model_name, codec.param_values(request.parameters)))
        return pb.RepositoryModelUnloadResponse()

    @rpc("shared-memory")
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self.dp.shm_status(request.name, cuda=False, peer=self.peer(context)):
            st = resp.regions[r.name]
            st.name, st.key, st.offset, st.byte_size = r.name, r.key_given, r.offset, r.byte_size
        return resp

    @rpc("shared-memory")
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.dp.register_system_shm(
            request.name, request.key, request.offset, request.byte_size, self.peer(context), trusted=self._trusted()
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc("shared-memory")
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        await self.dp.unregister_shm(request.name, cuda=False, peer=self.peer(context))
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc("shared-memory")
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        resp = pb.CudaSharedMemoryStatusResponse()
        for r in self.dp.shm_status(request.name, cuda=True, peer=self.peer(context)):
            st = resp.regions[r.name]
            st.name, st.device_id, st.byte_size = r.name, r.device_id, r.byte_size
        return resp

    @rpc("shared-memory")
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        if request.device_id < 0:
            raise InvalidInput("'device_id' must not be negative")
        await self.dp.register_cuda_shm(
            request.name,
            request.raw_handle,
            request.device_id,
            request.byte_size,
            self.peer(context),
            trusted=self._trusted(),
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc("shared-memory")
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self.dp.unregister_shm(request.name, cuda=True, peer=self.peer(context))
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc("trace")
    async def TraceSetting(self, request: pb.TraceSettingRequest, context: Any) -> pb.TraceSettingResponse:
        """Triton's trace extension: update (settings given) and read the global or a
        model's trace settings."""
        model = request.model_name
        self.dp.trace_settings(model)
        changes = None
        if request.settings:
            changes = tracing.from_grpc({k: list(v.value) for k, v in request.settings.items()})
        tracer = await self.dp.change_trace_settings(model, changes)
        resp = pb.TraceSettingResponse()
        for key, values in tracer.view_lists(model).items():
            resp.settings[key].value.extend(values)
        return resp


class HealthService(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: SERVING while the server is ready."""

    def __init__(
        self,
        dataplane: DataPlane,
        *,
        watch_interval_s: float = 1.0,
        restrictions: restrict.Restrictions | None = None,
    ) -> None:
        self.dp = dataplane
        self.watch_interval_s = watch_interval_s
        self.restrictions = restrictions or restrict.Restrictions()

    async def _status(self) -> int:
        ready = await self.dp.server_ready()
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    @rpc("health")
    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=await self._status())  # type: ignore[arg-type]

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        denied = restricted(self, "health", context)
        if denied is not None:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details(denied)
            return
        last = None
        while True:
            status = await self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
                last = status
            await asyncio.sleep(self.watch_interval_s)
