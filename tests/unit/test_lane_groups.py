"""A frontend's lane requests to a worker that batches them itself (``frontproc.lanes_client``):
the compatible requests of one loop turn go in one ``Infer`` (a group), up to the model's
``max_batch_size``; each gets its own result back from the worker's one ``InferDone``, its
own cancellation, its own failure when the worker dies. The worker here is a socket the test
answers by hand."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format

from shoal.proto import framing, wire
from shoal.proto.errors import WorkerDied
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.frontproc.lanes_client import Lanes
from shoal.server.types import InferRequest, InputTensor
from shoal.shm.mapper import Mapper

CONFIG = """name: "m" max_batch_size: 4 input [ { name: "I" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "O" data_type: TYPE_FP32 dims: [ -1 ] } ] dynamic_batching { }"""


class Worker:
    """The worker's end of a lane: reads what the frontend sends, answers by hand."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.sock: socket.socket | None = None
        self.decoder = framing.Decoder()
        self.ready: list[list[Any]] = []

    async def next(self) -> tuple[wpb.Envelope, list[Any]]:
        loop = asyncio.get_running_loop()
        if self.sock is None:
            self.sock, _ = await loop.sock_accept(self.listener)
        while not self.ready:
            data = await loop.sock_recv(self.sock, 1 << 16)
            assert data, "the frontend closed the lane"
            self.ready.extend(self.decoder.feed(data))
        frames = self.ready.pop(0)
        return wire.parse(frames[0]), frames[1:]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.listener.close()

    async def echo(self, env: wpb.Envelope, frames: list[Any]) -> None:
        """Answer an ``Infer``: each request's input back as its output, in one InferDone."""
        reply = wire.envelope(env.request_id)
        out: list[Any] = []
        for r in env.infer.requests:
            res = reply.infer_done.results.add()
            res.id = r.id
            ref = res.outputs.add()
            ref.name, ref.datatype, ref.frame = "O", "FP32", len(out)
            ref.shape.extend(r.inputs[0].shape)
            out.append(bytes(frames[r.inputs[0].frame]))
        reply.infer_done.counted = True
        assert self.sock is not None
        await asyncio.get_running_loop().sock_sendall(
            self.sock, b"".join(bytes(b) for b in framing.encode([reply.SerializeToString(), *out]))
        )


def _request(rows: int, cols: int, value: float) -> InferRequest:
    data = np.full((rows, cols), value, dtype=np.float32)
    return InferRequest(
        model_name="m", model_version=-1, inputs=[InputTensor("I", "FP32", (rows, cols), data.tobytes())]
    )


async def _setup(tmp: str, config: str = CONFIG) -> tuple[Lanes, Any, Worker, list[dict[str, Any]]]:
    path = os.path.join(tmp, "lane.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    listener.setblocking(False)
    reports: list[dict[str, Any]] = []
    lanes = Lanes(0, lambda data: None, lambda blocks: None, Mapper(), lambda **kw: reports.append(kw))
    table = wpb.LaneRoutes()
    route = table.routes.add(model_name="m", model_version=1, latest=True)
    route.model_config = text_format.Parse(config, mc.ModelConfig()).SerializeToString()
    route.lanes.add(path=path, label="model 'm' instance 'm_0'", pid=4321)
    lanes.update(table)
    return lanes, lanes.routes[("m", -1)], Worker(listener), reports


def _values(result: Any) -> list[float]:
    (out,) = result.outputs
    return np.frombuffer(bytes(out.data), dtype=np.float32).tolist()


def test_one_turns_compatible_requests_go_in_one_infer() -> None:
    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            lanes, route, worker, reports = await _setup(tmp)
            reqs = [_request(1, 2, 1.0), _request(1, 2, 2.0), _request(2, 2, 3.0), _request(1, 3, 4.0),
                    _request(1, 3, 5.0), _request(1, 3, 6.0), _request(1, 3, 7.0), _request(1, 3, 8.0)]  # fmt: skip
            calls = [asyncio.ensure_future(lanes.infer(route, r)) for r in reqs]
            envs = [await worker.next() for _ in range(3)]
            # 1 + 1 + 2 rows of [., 2] fill max_batch_size 4; four [., 3] requests, then a fifth
            assert [[tuple(r.inputs[0].shape) for r in e.infer.requests] for e, _ in envs] == [
                [(1, 2), (1, 2), (2, 2)],
                [(1, 3)] * 4,
                [(1, 3)],
            ]
            assert [[r.id for r in e.infer.requests] for e, _ in envs] == [[0, 1, 2], [0, 1, 2, 3], [0]]
            assert lanes.by_path[route.lanes[0].path].load == 8
            for e, f in reversed(envs):
                await worker.echo(e, f)
            results = await asyncio.gather(*calls)
            assert [_values(r) for r in results] == [[1.0] * 2, [2.0] * 2, [3.0] * 4] + [
                [v] * 3 for v in (4, 5, 6, 7, 8)
            ]
            assert lanes.inflight == 0 and route.lanes[0].load == 0
            assert sum(1 for r in reports if r.get("started")) == 8
            assert sum(1 for r in reports if r.get("ok")) == 8
            worker.close()

    asyncio.run(scenario())


def test_a_request_of_a_group_cancelled_alone() -> None:
    """The client of one request goes away: ``Cancel`` names its index; the others are answered."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            lanes, route, worker, _ = await _setup(tmp)
            calls = [asyncio.ensure_future(lanes.infer(route, _request(1, 2, float(v)))) for v in range(3)]
            env, frames = await worker.next()
            assert len(env.infer.requests) == 3
            calls[1].cancel()
            cancel, _ = await worker.next()
            assert cancel.request_id == env.request_id and list(cancel.cancel.indexes) == [1]
            await worker.echo(env, frames)
            assert [_values(r) for r in await asyncio.gather(calls[0], calls[2])] == [[0.0, 0.0], [2.0, 2.0]]
            with pytest.raises(asyncio.CancelledError):
                await calls[1]
            assert lanes.inflight == 0
            worker.close()

    asyncio.run(scenario())


def test_a_worker_that_dies_fails_every_request_of_a_group() -> None:
    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            lanes, route, worker, _ = await _setup(tmp)
            calls = [asyncio.ensure_future(lanes.infer(route, _request(1, 2, float(v)))) for v in range(3)]
            env, _ = await worker.next()
            assert len(env.infer.requests) == 3
            assert worker.sock is not None
            worker.sock.close()  # died without a LaneBye
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, WorkerDied) for r in results), results
            assert "died while executing the request" in str(results[0])
            assert lanes.inflight == 0
            worker.close()

    asyncio.run(scenario())


def test_preferred_batch_sizes_keep_requests_one_by_one() -> None:
    """A message cannot be split to make a preferred size: with ``preferred_batch_size`` each
    request is a message of its own, so the worker forms the batches Triton's batcher would."""

    async def scenario() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            config = CONFIG.replace("dynamic_batching { }", "dynamic_batching { preferred_batch_size: [ 2 ] }")
            lanes, route, worker, _ = await _setup(tmp, config)
            calls = [asyncio.ensure_future(lanes.infer(route, _request(1, 2, float(v)))) for v in range(3)]
            envs = [await worker.next() for _ in range(3)]
            assert [len(e.infer.requests) for e, _ in envs] == [1, 1, 1]
            for e, f in envs:
                await worker.echo(e, f)
            assert [_values(r) for r in await asyncio.gather(*calls)] == [[0.0] * 2, [1.0] * 2, [2.0] * 2]
            worker.close()

    asyncio.run(scenario())
