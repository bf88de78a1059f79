"""BLS calls from models (``pb_utils.InferenceRequest.exec``): a worker's ``BlsCall`` becomes an
ordinary request to the target model through the data plane (its version policy, validation
and scheduler, so it batches with client traffic, and reaches ensembles and other BLS
models alike); the responses go back as ``BlsReply``.

No tensor bytes are copied here: inputs in the caller's arena are read in place by the target
worker; outputs in the target's arena are passed by reference and the result is held until
the caller says ``BlsDone`` (or goes away). Any failure is a reply with an error.

A model that calls itself while it has no other ready instance would wait for itself
forever: such a call fails at once, naming the model (a documented rule of Shoal; Triton
deadlocks).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from typing import Any

from shoal.proto import wire
from shoal.proto.errors import ErrorCode, ServingError, detach, from_exception
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server import ensemble
from shoal.server.callerinputs import CallerInputs
from shoal.server.dataplane import DataPlane
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.frontproc.calls import FrontendCalls
from shoal.server.types import ArenaRef, InferRequest, InferResult, InputTensor, Lease, RequestedOutput
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper

log = logging.getLogger("shoal.bls")


class BlsRouter:
    def __init__(
        self,
        dataplane: DataPlane,
        channel: WorkerChannel,
        mapper: Mapper,
        cuda_segments: dict[str, tuple[int, bytes, int]] | None = None,
    ) -> None:
        self.dp = dataplane
        self.channel = channel
        self.mapper = mapper
        self.cuda_segments = cuda_segments if cuda_segments is not None else {}
        """Workers' CUDA arena segments (``DispatchContext.cuda_segments``): a BLS output left
        on the GPU goes to its caller with its segment's handle."""
        self._holds: dict[tuple[bytes, int], InferResult] = {}
        self._hold_ids = itertools.count(1)
        self._tasks: dict[bytes, set[asyncio.Task[None]]] = {}
        self._calls: dict[tuple[bytes, int], asyncio.Task[None]] = {}
        """Decoupled calls in flight, by caller and call id (to cancel one)."""
        self.frontends = FrontendCalls(dataplane, mapper, self._reply, self._send)
        channel.services["bls_call"] = channel.services["bls_done"] = self.on_message
        channel.services["model_control"] = self.on_message
        channel.on_disconnect.append(self.forget)

    def on_message(self, identity: bytes, env: wpb.Envelope, frames: list[bytes]) -> None:
        body = env.WhichOneof("body")
        if body == "bls_done":
            for hold_id in env.bls_done.hold_ids:
                result = self._holds.pop((identity, hold_id), None)
                if result is not None:
                    result.done()
            done = env.bls_done
            for call_id in done.cancel_calls:  # ResponseIterator.cancel()
                running = self._calls.get((identity, call_id))
                if running is not None:
                    running.cancel()
            self.frontends.ack(identity, done)
        elif body == "bls_call":
            call = env.bls_call
            call_id = call.call_id
            inputs = CallerInputs(lambda: self.inputs_free(identity, call_id))
            serve = self.frontends.serve if call.frontend else self._serve
            task = asyncio.get_running_loop().create_task(serve(identity, call, frames, inputs))
            tasks = self._tasks.setdefault(identity, set())
            tasks.add(task)
            key = (identity, call_id)
            cancellable = call.decoupled or bool(call.frontend)
            if cancellable:
                # the caller cancels a call nobody waits for any more (ResponseIterator.cancel,
                # a frontend's client that went away)
                self._calls[key] = task

            def ended(_: object) -> None:
                tasks.discard(task)
                if cancellable:
                    self._calls.pop(key, None)
                if not inputs.settled and any(ref.WhichOneof("location") == "shm" for ref in call.request.inputs):
                    inputs.never_ran()

            task.add_done_callback(ended)
        elif body == "model_control":
            task = asyncio.get_running_loop().create_task(self._control(identity, env.model_control))
            tasks = self._tasks.setdefault(identity, set())
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    def inputs_free(self, identity: bytes, call_id: int) -> None:
        """The caller may reuse a call's inputs in its arena now (``server.callerinputs``)."""
        env = wire.envelope(0)
        env.bls_reply.call_id, env.bls_reply.inputs_free = call_id, True
        self._send(identity, env, [])

    def forget(self, identity: bytes) -> None:
        """The worker went away: its calls stop, the outputs it held go back."""
        for task in self._tasks.pop(identity, set()):
            task.cancel()
        for key in [k for k in self._holds if k[0] == identity]:
            self._holds.pop(key).done()

    def close(self) -> None:
        for identity in list(self._tasks):
            self.forget(identity)
        for result in self._holds.values():
            result.done()
        self._holds.clear()

    async def _serve(self, identity: bytes, call: wpb.BlsCall, frames: list[bytes], held: CallerInputs) -> None:
        """A model's BLS call. Its inputs in the caller's arena stay the caller's to free
        after the final reply, or after ``inputs_free`` when the reply says ``inputs_held``
        (the call ended, by its timeout say, while the target worker still reads them)."""
        call_id = call.call_id
        item: InferResult | ServingError | None = None
        try:
            request = self._request(identity, call, frames, held.lease)
            if call.decoupled and self.dp.is_decoupled(request.model_name, request.model_version):
                # at most STREAM_WINDOW replies ahead of what the model took (BlsDone.ack_calls)
                item = await self.frontends.relay(identity, call_id, self.dp.infer_stream(request))
            else:
                item = await self.dp.infer(
                    request,
                    decoupled_error=f"model '{call.model_name}' uses the decoupled transaction policy: "
                    "call exec(decoupled=True)",
                )
        except asyncio.CancelledError:
            held.cancelled()
            raise
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the calling model
            item = exc if isinstance(exc, ServingError) else from_exception(exc)
            if not isinstance(exc, ServingError):
                log.exception("BLS call to model '%s' failed", call.model_name)
        self._reply(identity, call_id, item, True, inputs_held=held.answered())

    def _send(self, identity: bytes, env: wpb.Envelope, frames: list[Any]) -> None:
        try:
            self.channel.send(identity, env, frames)
        except ServingError:
            pass

    async def _control(self, identity: bytes, m: wpb.ModelControl) -> None:
        """pb_utils.load_model / unload_model / is_model_ready from a model."""
        reply = wire.envelope(0)
        out = reply.control_reply
        out.call_id = m.call_id
        try:
            if m.action == 0:
                params: dict[str, Any] = {"config": m.config_json} if m.config_json else {}
                params.update(m.files.items())
                await asyncio.shield(self.dp.load_model(m.model_name, params))
                out.ok = True
            elif m.action == 1:
                await asyncio.shield(self.dp.unload_model(m.model_name, {"unload_dependents": m.unload_dependents}))
                out.ok = True
            else:
                try:
                    out.ok = await self.dp.model_ready(m.model_name, int(m.model_version))
                except ServingError:
                    out.ok = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the calling model gets the error
            out.error = (exc if isinstance(exc, ServingError) else from_exception(exc)).message
        self._send(identity, reply, [])

    def _request(
        self, identity: bytes, call: wpb.BlsCall, frames: list[bytes], lease: Callable[[], Lease]
    ) -> InferRequest:
        """``lease()``: the lease the dispatcher holds while a worker reads the call's inputs
        in the caller's arena (asked only when there are some)."""
        r = call.request
        inputs = []
        for ref in r.inputs:
            where = ref.WhichOneof("location")
            if where == "frame":
                if ref.frame >= len(frames):
                    raise ServingError(f"BLS input '{ref.name}' names a missing frame", code=ErrorCode.INTERNAL)
                inputs.append(InputTensor(ref.name, ref.datatype, tuple(ref.shape), frames[ref.frame]))
                continue
            if where != "shm":
                raise ServingError(f"BLS input '{ref.name}' carries no data", code=ErrorCode.INTERNAL)
            s = ref.shm
            block = Block(s.region, s.offset, s.nbytes, s.device)
            t = InputTensor(ref.name, ref.datatype, tuple(ref.shape), self.mapper.view(block))
            t.arena = ArenaRef(block, lease())
            inputs.append(t)
        params = json.loads(r.parameters_json) if r.parameters_json else {}
        if call.timeout_us:
            params["timeout"] = int(call.timeout_us)
        names = r.outputs
        outputs = [RequestedOutput(name) for name in names] if names else None
        if r.device_outputs:  # the caller takes GPU outputs (preferred_memory GPU)
            outputs = self._on_gpu(call, outputs)
        request = InferRequest(
            model_name=call.model_name,
            model_version=int(call.model_version),
            inputs=inputs,
            outputs=outputs,
            id=r.request_id,
            parameters=params,
            correlation_id=r.correlation_id_str or r.correlation_id,
            flags=r.flags,
        )
        if r.trace_id:  # InferenceRequest(trace=request.trace()) of a traced request
            request.trace = self.dp.tracer.child_of(r.trace_id)
        if self.channel.models.get(identity) == request.model_name:  # only a model calling itself can wait for itself
            self._refuse_self_wait(identity, request)
        return request

    def _on_gpu(self, call: wpb.BlsCall, outputs: list[RequestedOutput] | None) -> list[RequestedOutput] | None:
        """The requested outputs (every output of the model when none are named), each asked to
        stay on the GPU, when the target can leave them there; else ``outputs`` unchanged."""
        try:
            config = self.dp.registry.get(call.model_name, int(call.model_version)).config
        except ServingError:
            return outputs  # the request fails as usual, with its own error
        if not ensemble.reads_on_gpu(config):
            return outputs
        if outputs is None:
            outputs = [RequestedOutput(o.name) for o in config.output]
        for o in outputs:
            o.on_gpu = True
        return outputs

    def _refuse_self_wait(self, identity: bytes, request: InferRequest) -> None:
        try:
            mv = self.dp.registry.get(request.model_name, request.model_version)
        except ServingError:
            return  # the data plane answers with the lookup's error
        if mv.pool is None or not any(w.identity == identity for w in mv.pool.workers):
            return
        if not any(w.ready and w.identity != identity for w in mv.pool.workers):
            raise ServingError(
                f"model '{mv.name}' version {mv.version} calls itself through BLS but has no other ready "
                "instance: the call would wait for the instance making it",
                code=ErrorCode.UNAVAILABLE,
            )

    def _reply(
        self,
        identity: bytes,
        call_id: int,
        item: InferResult | ServingError | None,
        final: bool,
        *,
        inputs_held: bool = False,
    ) -> None:
        env = wire.envelope(0)
        reply = env.bls_reply
        reply.call_id = call_id
        reply.final = final
        reply.inputs_held = inputs_held
        frames: list[Any] = []
        held: InferResult | None = None
        if isinstance(item, InferResult) and any(
            t.arena is not None and t.arena.device >= 0 and t.arena.region not in self.cuda_segments
            for t in item.outputs
        ):  # its GPU outputs went with the target's process (forget_cuda)
            item.done()
            item = ServingError(f"model '{item.model_name}': its instance exited before the outputs were read")
        if isinstance(item, ServingError):
            wire.failed(item, reply.result.error)
            detach(item)  # answered: nothing it passed through stays alive with it
        elif item is not None:
            res = reply.result
            res.model_name, res.model_version, res.request_id = item.model_name, item.model_version, item.id
            if item.parameters:
                res.parameters_json = json.dumps(item.parameters)
            for t in item.outputs:
                ref = res.outputs.add()
                ref.name, ref.datatype = t.name, t.datatype
                ref.shape.extend(t.shape)
                if t.in_shm:  # written into the client's region (a frontend's request)
                    ref.named.nbytes = t.written
                elif t.arena is not None:  # in the target's arena: the caller reads it there
                    s = ref.shm
                    s.region, s.offset, s.nbytes, s.device = (
                        t.arena.region,
                        t.arena.offset,
                        t.arena.nbytes,
                        t.arena.device,
                    )
                    if s.device >= 0:  # its CUDA arena: the caller opens the segment's handle
                        _, s.cuda_handle, s.segment_bytes = self.cuda_segments[s.region]
                    held = item
                else:
                    ref.frame = len(frames)
                    frames.append(t.data)
            if held is not None:
                reply.hold_id = next(self._hold_ids)
                self._holds[(identity, reply.hold_id)] = held
                log.debug("BLS reply to call %d: outputs held in shared memory (hold %d)", call_id, reply.hold_id)
        try:
            self.channel.send(identity, env, frames)
        except ServingError:
            if held is not None:
                self._holds.pop((identity, reply.hold_id), None)
        finally:
            if isinstance(item, InferResult) and held is None:
                item.done()
            elif held is not None and (identity, reply.hold_id) not in self._holds:
                held.done()
