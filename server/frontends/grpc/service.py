"""``inference.GRPCInferenceService`` and ``grpc.health.v1.Health`` on grpc.aio: decode,
call ``DataPlane``, encode. One wrapper maps every ``ServingError`` to a status."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from proto.errors import InvalidInput, ServingError, Unsupported, from_exception
from proto.gen import grpc_service_pb2 as pb
from proto.gen import grpc_service_pb2_grpc as pb_grpc
from proto.gen import health_pb2, health_pb2_grpc
from server.dataplane import DataPlane
from server.frontends.grpc import codec
from server.frontends.grpc.errors import GRPC_STATUS

log = logging.getLogger("shoal.grpc")

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]


def rpc(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn ``ServingError`` (and any bug) into a gRPC status with the error's message."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await fn(self, request, context)
        except asyncio.CancelledError:
            raise
        except ServingError as exc:
            await context.abort(GRPC_STATUS[exc.code], exc.message)
        except Exception as exc:  # noqa: BLE001 - an RPC never takes the router down
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("unhandled error in %s", fn.__name__)
            err = from_exception(exc)
            await context.abort(GRPC_STATUS[err.code], err.message)
        raise AssertionError("unreachable")  # context.abort always raises

    return wrapper


def _version(v: str) -> int:
    return int(v) if v.isdigit() else -1


def _repo_params(params: Any) -> dict[str, Any]:
    out = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(p, which)
    return out


def _not_yet(what: str) -> Unsupported:
    return Unsupported(f"{what} is not supported yet by this server")


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    @rpc
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.dp.live())

    @rpc
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dp.ready())

    @rpc
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        self.dp.model_ready(request.name, _version(request.version))
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        meta = self.dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @rpc
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        meta = self.dp.model_metadata(request.name, _version(request.version))
        resp = pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(resp, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return resp

    @rpc
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        resp = pb.ModelConfigResponse()
        resp.config.CopyFrom(self.dp.model_config_message(request.name, _version(request.version)))
        return resp

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._infer(request)

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        req = codec.decode_request(request)
        result = await self.dp.infer(req)
        resp = pb.ModelInferResponse()
        try:
            codec.encode_response(result, resp)
        finally:
            result.done()
        return resp

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """One response per request, possibly out of order; a failed request answers with
        ``error_message`` and the stream goes on."""
        queue: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def handle(req: pb.ModelInferRequest) -> None:
            try:
                msg = pb.ModelStreamInferResponse(infer_response=await self._infer(req))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported on the stream
                err = from_exception(exc)
                if not isinstance(exc, ServingError):
                    log.exception("unhandled error in a streamed request")
                msg = pb.ModelStreamInferResponse(error_message=err.message)
                msg.infer_response.id = req.id
                msg.infer_response.model_name = req.model_name
                msg.infer_response.model_version = req.model_version
            queue.put_nowait(msg)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    task = asyncio.create_task(handle(req))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:
                    await asyncio.wait(set(running))
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (msg := await queue.get()) is not None:
                yield msg
            await reader  # re-raise a broken request stream
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    @rpc
    async def LogSettings(self, request: pb.LogSettingsRequest, context: Any) -> pb.LogSettingsResponse:
        changes = {}
        for key, value in request.settings.items():
            which = value.WhichOneof("parameter_choice")
            changes[key] = None if which is None else getattr(value, which)
        settings = self.dp.logs.update(changes) if changes else self.dp.logs.as_dict()
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

    @rpc
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.version and not request.version.isdigit():
            raise InvalidInput(f"model version '{request.version[:32]}' is not a number")
        stats = self.dp.statistics(request.name, _version(request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        resp = pb.RepositoryIndexResponse()
        for entry in self.dp.repository_index(request.ready):
            resp.models.add(**entry)
        return resp

    @rpc
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        await self.dp.load_model(request.model_name, _repo_params(request.parameters))
        return pb.RepositoryModelLoadResponse()

    @rpc
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        await self.dp.unload_model(request.model_name, _repo_params(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    @rpc
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Any
    ) -> pb.SystemSharedMemoryStatusResponse:
        resp = pb.SystemSharedMemoryStatusResponse()
        for r in self.dp.shm.status(request.name, cuda=False):
            st = resp.regions[r.name]
            st.name, st.key, st.offset, st.byte_size = r.name, r.key_given, r.offset, r.byte_size
        return resp

    @rpc
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Any
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.dp.shm.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Any
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.dp.shm.unregister(request.name, cuda=False)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Any
    ) -> pb.CudaSharedMemoryStatusResponse:
        resp = pb.CudaSharedMemoryStatusResponse()
        for r in self.dp.shm.status(request.name, cuda=True):
            st = resp.regions[r.name]
            st.name, st.device_id, st.byte_size = r.name, r.device_id, r.byte_size
        return resp

    @rpc
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Any
    ) -> pb.CudaSharedMemoryRegisterResponse:
        if request.device_id < 0:
            raise InvalidInput("'device_id' must not be negative")
        await self.dp.shm.register_cuda_checked(request.name, request.raw_handle, request.device_id, request.byte_size)
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Any
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        self.dp.shm.unregister(request.name, cuda=True)
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc
    async def TraceSetting(self, request: Any, context: Any) -> Any:
        raise _not_yet("the trace extension")


class HealthService(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1.Health``: SERVING while the server is ready."""

    def __init__(self, dataplane: DataPlane, *, watch_interval_s: float = 1.0) -> None:
        self.dp = dataplane
        self.watch_interval_s = watch_interval_s

    def _status(self) -> int:
        ready = self.dp.ready()
        return health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

    @rpc
    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=self._status())  # type: ignore[arg-type]

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)  # type: ignore[arg-type]
                last = status
            await asyncio.sleep(self.watch_interval_s)
