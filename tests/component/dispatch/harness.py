"""The router side of the dispatch component tests: a real ``WorkerChannel``, ``Worker``s and an
``InstancePool`` over fake worker processes (``fake_worker.py``) that follow a script."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.pool import DispatchContext, InstancePool
from shoal.server.dispatch.worker import Worker, WorkerSpec
from shoal.server.sharedmem import SharedMemoryRegistry
from shoal.server.types import InferRequest, InferResult, InputTensor
from shoal.shm import region
from shoal.shm.arena import Arena
from shoal.shm.mapper import Mapper

ROOT = Path(__file__).resolve().parents[3]
INLINE_MAX = 64
"""Inputs larger than this go through the router's input arena."""
MODEL = "m"
Plan = dict[str, Any]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``check`` every 10 ms until it holds; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def request(*inputs: bytes, rid: str = "") -> InferRequest:
    """A request whose inputs ``IN0``, ``IN1``, ... carry these bytes (the fake echoes them
    joined as output ``OUT``)."""
    tensors = [InputTensor(f"IN{i}", "UINT8", (len(d),), d) for i, d in enumerate(inputs)]
    return InferRequest(model_name=MODEL, model_version=1, inputs=tensors, id=rid)


def out_bytes(result: InferResult | Exception) -> bytes:
    assert isinstance(result, InferResult), f"expected a result, got {result!r}"
    return bytes(result.outputs[0].data)


def answered_by(result: InferResult | Exception) -> int:
    """The pid of the fake process that answered (it puts it in the result's parameters)."""
    assert isinstance(result, InferResult), f"expected a result, got {result!r}"
    pid: int = result.parameters["pid"]
    return pid


class Fake:
    """One ``Worker`` over fake processes, and what they logged."""

    def __init__(self, worker: Worker, events_path: Path) -> None:
        self.worker = worker
        self.events_path = events_path
        self.exits: list[tuple[int, str]] = []
        """``on_exit`` calls: (generation, arena prefix) of the process that exited."""

    def events(self, kind: str | None = None, gen: int | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = [json.loads(line) for line in lines if line]
        return [e for e in out if (kind is None or e["event"] == kind) and (gen is None or e["gen"] == gen)]

    async def event(self, kind: str, gen: int | None = None, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """The ``count``-th event of this kind, once it has happened."""
        await eventually(lambda: len(self.events(kind, gen)) >= count, f"{count} '{kind}' event(s)", timeout)
        return self.events(kind, gen)[count - 1]

    def pids(self) -> list[int]:
        return [e["pid"] for e in self.events("start")]

    def segments(self, gen: int | None = None) -> list[str]:
        """/dev/shm names of this worker's output arenas (of one generation, or all)."""
        prefix = self.worker.arena_prefix_base + (f"_g{gen}_" if gen is not None else "")
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix))


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.prefix = f"shoal_{os.getpid()}_{secrets.token_hex(6)}"
        self.channel = WorkerChannel(f"ipc://{tmp}/w.sock")
        self.arena = Arena(f"{self.prefix}_in", segment_bytes=1 << 16, max_bytes=1 << 20)
        self.mapper = Mapper()
        self.ctx = DispatchContext(
            arena=self.arena, mapper=self.mapper, inline_max_bytes=INLINE_MAX, shm=SharedMemoryRegistry()
        )
        self.fakes: list[Fake] = []
        self.launcher = tmp / "fake-python"
        self.launcher.write_text(
            "#!/bin/sh\n"
            f'PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
            f'exec "{sys.executable}" -m tests.component.dispatch.fake_worker "$@"\n'
        )
        self.launcher.chmod(self.launcher.stat().st_mode | stat.S_IXUSR)
        self._gates = 0

    def start(self) -> None:
        self.channel.start()

    def add(
        self,
        *plans: Plan,
        instance: str = "",
        python: str | None = None,
        on_exit: Callable[[Worker], None] | None = None,
        **limits: Any,
    ) -> Fake:
        """A ``Worker`` (not started) whose process of generation n follows ``plans[n - 1]``
        (the last plan for later ones). ``limits``: ``WorkerSpec`` fields."""
        n = len(self.fakes)
        instance = instance or f"{MODEL}_{n}"
        events = self.tmp / f"events_{instance}.jsonl"
        load = wpb.Load(
            model_name=MODEL, model_version=1, instance_name=instance, arena_bytes=1 << 16, inline_max_bytes=INLINE_MAX
        )
        fields: dict[str, Any] = {"load_timeout_s": 5.0, "restart_backoff_max_s": 0.2, "heartbeat_timeout_s": 5.0}
        fields.update(limits)
        script = json.dumps({"plans": list(plans) or [{}]})
        spec = WorkerSpec(
            model_name=MODEL,
            model_version=1,
            instance_name=instance,
            load=load,
            env=(("FAKE_WORKER_SCRIPT", script), ("FAKE_WORKER_EVENTS", str(events))),
            python=str(self.launcher) if python is None else python,
            **fields,
        )
        fake: Fake

        def exited(w: Worker) -> None:
            # as the model manager does: the dead process's outputs are unreadable now
            fake.exits.append((w.generation, w.arena_prefix))
            self.mapper.forget_prefix(w.arena_prefix)
            if on_exit is not None:
                on_exit(w)

        worker = Worker(spec, channel=self.channel, arena_prefix=f"{self.prefix}_w{n}", on_exit=exited)
        fake = Fake(worker, events)
        self.fakes.append(fake)
        return fake

    async def started(self, *plans: Plan, **kw: Any) -> Fake:
        fake = self.add(*plans, **kw)
        await fake.worker.start()
        return fake

    def pool(self, *fakes: Fake) -> InstancePool:
        return InstancePool([f.worker for f in fakes], self.ctx)

    def gate(self) -> str:
        """A file path for a ``hold`` action: the fake answers once ``open_gate`` made it."""
        self._gates += 1
        return str(self.tmp / f"gate{self._gates}")

    @staticmethod
    def open_gate(path: str) -> None:
        Path(path).touch()

    async def close(self) -> list[str]:
        """Stop everything; returns what was left behind (processes, segments), cleaned up."""
        problems: list[str] = []
        stops: list[Awaitable[None]] = [f.worker.stop(timeout_s=2.0) for f in self.fakes]
        for res in await asyncio.gather(*stops, return_exceptions=True):
            if isinstance(res, BaseException):
                problems.append(f"stop raised {res!r}")
        self.channel.close()
        for fake in self.fakes:
            for pid in fake.pids():
                if alive(pid):
                    problems.append(f"worker process {pid} still running")
                    os.kill(pid, signal.SIGKILL)
        live = self.arena.stats().live_blocks
        if live:
            problems.append(f"{live} input blocks still allocated")
        self.mapper.close()
        self.arena.close()
        left = region.unlink_prefix(self.prefix)
        if left:
            problems.append(f"segments left in /dev/shm: {sorted(left)}")
        return problems
