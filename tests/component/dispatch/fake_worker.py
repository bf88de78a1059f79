"""A scripted stand-in for ``python -m shoal.workers``: a real process that speaks the worker
protocol (``proto/worker.proto``) with behaviour chosen by the test.

The router spawns ``<python> -P -m shoal.workers --endpoint E --identity I --parent-pid P
--log-verbose V --heartbeat-ms H``; a launcher script turns that into ``python -m
tests.component.dispatch.fake_worker <same arguments>``. ``-P -m shoal.workers`` are parsed and
ignored.

Environment:

``FAKE_WORKER_SCRIPT``
    JSON ``{"plans": [plan, ...]}``: the plan of generation *n* (the ``#n#`` of the identity)
    is ``plans[n - 1]``, the last plan for later generations.
``FAKE_WORKER_EVENTS``
    A file the fake appends one JSON object a line to (``gen``, ``pid``, ``event`` and details),
    for the test to see what the worker received.

A plan::

    hello: bool = true          send Ready(loaded=false) on connect
    heartbeat: bool = true      send heartbeats when --heartbeat-ms > 0
    load: {do: ok|fail|hang|exit, code, message, status, delay_s}
    infer: [action, ...]        for the 1st, 2nd, ... Infer message
    infer_default: action       for the Infer messages after those
    on_shutdown: exit|ignore
    on_sigterm: exit|ignore

An action (every key optional; the default answers with the inputs echoed inline)::

    hold: path                  answer once this file exists (heartbeats go on; messages that
                                arrive meanwhile are logged as ``arrived`` and handled after)
    delay_s: float              answer after this long
    stop_heartbeat: bool        stop the heartbeat thread first
    hang: bool                  never answer, never read another message
    exit: int                   exit with this status instead of answering
    signal: name                kill itself with this signal instead of answering
    outputs: inline|shm|none    where the output ``OUT`` (the inputs' bytes joined) goes; or a
                                list of those, one per request
    errors: {index: [code, message]}   fail these requests of the batch
    failed: [code, message]     fail the whole batch
    results_delta: int          answer with this many results more (or fewer) than requests
    garbage_first: bool         send a header that is not an Envelope before the reply
    bad_frame: bool             point the outputs at a frame that is not in the message
    bad_block: bool             point shm outputs past the end of their segment
    stream: {n, after_done, final_alone, die_after, gate}
                                a decoupled reply: n Streamed responses per request (OUT = the
                                inputs joined, then its index as one byte), the last with the
                                final flag unless final_alone (then a final-only message); with
                                after_done the InferDone (no results) goes first; die_after exits
                                after that many responses; gate holds the streaming (after the
                                InferDone) until that file exists

Output blocks live in an ``Arena`` named with the Load's ``arena_prefix``; ``Release`` frees
them (logged with the number of blocks still live).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from shoal.proto import framing, wire
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import worker_pb2 as wpb
from shoal.shm.arena import Arena
from shoal.shm.block import Block
from shoal.shm.mapper import Mapper

HEARTBEAT_SUFFIX = b"/hb"
_PR_SET_PDEATHSIG = 1

Plan = dict[str, Any]


class Events:
    """Appends one JSON line per event; every line is written with one ``write``."""

    def __init__(self, path: str, gen: int) -> None:
        self.path = path
        self.gen = gen
        self.pid = os.getpid()

    def log(self, event: str, **details: Any) -> None:
        if not self.path:
            return
        line = json.dumps({"gen": self.gen, "pid": self.pid, "event": event, **details}) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


class Heartbeat(threading.Thread):
    """``Pong`` every ``interval_s`` from a connection named ``<identity>/hb``."""

    def __init__(self, endpoint: str, identity: bytes, interval_s: float) -> None:
        super().__init__(name="heartbeat", daemon=True)
        self.endpoint = endpoint
        self.identity = identity + HEARTBEAT_SUFFIX
        self.interval_s = interval_s
        self.done = threading.Event()

    def run(self) -> None:
        try:
            conn = framing.Connection(self.endpoint, self.identity)
        except OSError:
            return
        beat = wire.envelope(0)
        beat.pong.SetInParent()
        msg = [beat.SerializeToString()]
        try:
            while True:
                try:
                    conn.send(msg)
                except OSError:
                    return
                if self.done.wait(self.interval_s):
                    return
        finally:
            conn.close()


def _failed(code: str, message: str, out: wpb.Failed) -> None:
    wire.failed(ServingError(message, code=ErrorCode[code]), out)


class FakeWorker:
    def __init__(self, endpoint: str, identity: bytes, heartbeat_ms: int, plan: Plan, events: Events) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.heartbeat_ms = heartbeat_ms
        self.plan = plan
        self.events = events
        self.conn: framing.Connection | None = None
        self.heartbeat: Heartbeat | None = None
        self.arena: Arena | None = None
        self.mapper = Mapper()
        self.inline_max = 0
        self.infers = 0
        self.backlog: list[list[bytes]] = []

    def run(self) -> int:
        self.conn = framing.Connection(self.endpoint, self.identity)
        if self.heartbeat_ms > 0 and self.plan.get("heartbeat", True):
            self.heartbeat = Heartbeat(self.endpoint, self.identity, self.heartbeat_ms / 1000)
            self.heartbeat.start()
        if self.plan.get("hello", True):
            hello = wire.envelope(0)
            hello.ready.pid = os.getpid()
            self.send([hello.SerializeToString()])
        try:
            while True:
                frames = self.backlog.pop(0) if self.backlog else self.recv()
                env = wire.parse(frames[0])
                kind = env.WhichOneof("body")
                if kind == "load":
                    self._load(env)
                elif kind == "infer":
                    self._infer(env, frames[1:])
                elif kind == "release":
                    self._release(env.release)
                elif kind == "forget":
                    self.events.log(
                        "forget", region_ids=list(env.forget.region_ids), prefixes=list(env.forget.arena_prefixes)
                    )
                elif kind == "shutdown":
                    self.events.log("shutdown")
                    if self.plan.get("on_shutdown", "exit") == "exit":
                        return 0
                else:
                    self.events.log("unexpected", kind=kind)
        finally:
            self.close()

    def send(self, frames: list[bytes]) -> None:
        assert self.conn is not None
        self.conn.send(frames)

    def recv(self) -> list[bytes]:
        assert self.conn is not None
        try:
            return self.conn.recv()
        except EOFError:
            self.events.log("router closed")
            raise SystemExit(0) from None

    def stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.done.set()
            self.heartbeat.join(1.0)
            self.heartbeat = None

    def close(self) -> None:
        self.stop_heartbeat()
        self.mapper.close()
        if self.arena is not None:
            self.arena.close()
        if self.conn is not None:
            self.conn.close()

    def _load(self, env: wpb.Envelope) -> None:
        req = env.load
        spec: dict[str, Any] = self.plan.get("load", {})
        self.events.log(
            "load",
            model=req.model_name,
            version=req.model_version,
            instance=req.instance_name,
            arena_prefix=req.arena_prefix,
            arena_bytes=req.arena_bytes,
            inline_max_bytes=req.inline_max_bytes,
        )
        time.sleep(float(spec.get("delay_s", 0.0)))
        do = spec.get("do", "ok")
        if do == "hang":
            return  # never answered; a SIGTERM ends the process
        if do == "exit":
            os._exit(int(spec.get("status", 1)))
        reply = wire.envelope(env.request_id)
        if do == "fail":
            _failed(spec.get("code", "INTERNAL"), spec.get("message", "load failed"), reply.failed)
        else:
            segment = req.arena_bytes or 1 << 16
            self.arena = Arena(req.arena_prefix, segment_bytes=segment, max_bytes=segment * 4)
            self.inline_max = req.inline_max_bytes
            reply.ready.pid = os.getpid()
            reply.ready.loaded = True
        self.send([reply.SerializeToString()])

    def _action(self) -> Plan:
        actions: list[Plan] = self.plan.get("infer", [])
        n = self.infers
        self.infers += 1
        if n < len(actions):
            return actions[n]
        default: Plan = self.plan.get("infer_default", {})
        return default

    def _read(self, ref: wpb.TensorRef, frames: list[bytes]) -> tuple[bytes, str]:
        where = ref.WhichOneof("location")
        if where == "frame":
            return frames[ref.frame], "frame"
        if where == "shm":
            s = ref.shm
            view = self.mapper.view(Block(s.region, s.offset, s.nbytes, s.device))
            data = bytes(view)
            view.release()
            return data, "shm"
        return b"", str(where)

    def _infer(self, env: wpb.Envelope, frames: list[bytes]) -> None:
        action = self._action()
        inputs: list[list[tuple[bytes, str]]] = [[self._read(t, frames) for t in r.inputs] for r in env.infer.requests]
        self.events.log(
            "infer",
            rid=env.request_id,
            n=len(env.infer.requests),
            request_ids=[r.request_id for r in env.infer.requests],
            sources=[[src for _, src in req] for req in inputs],
        )
        if action.get("stop_heartbeat"):
            self.stop_heartbeat()
        hold = action.get("hold")
        if hold:
            while not os.path.exists(hold):
                assert self.conn is not None
                if self.conn.poll(5):
                    msg = self.recv()
                    self.events.log("arrived", kind=wire.parse(msg[0]).WhichOneof("body"), busy=env.request_id)
                    self.backlog.append(msg)
        time.sleep(float(action.get("delay_s", 0.0)))
        if action.get("hang"):
            self.events.log("hang", rid=env.request_id)
            while True:
                time.sleep(1.0)
        if "exit" in action:
            os._exit(int(action["exit"]))
        if "signal" in action:
            os.kill(os.getpid(), signal.Signals[action["signal"]])
            time.sleep(10.0)  # not reached for a fatal signal
        if "stream" in action:
            self._stream(env, action["stream"], inputs)
            return
        reply = wire.envelope(env.request_id)
        out_frames: list[bytes] = []
        if "failed" in action:
            code, message = action["failed"]
            _failed(code, message, reply.failed)
        else:
            self._results(env, action, inputs, reply.infer_done, out_frames)
        if action.get("garbage_first"):
            self.send([b"\xff\xfe not an envelope"])
        self.send([reply.SerializeToString(), *out_frames])
        self.events.log("answered", rid=env.request_id)

    def _stream(self, env: wpb.Envelope, spec: dict[str, Any], inputs: list[list[tuple[bytes, str]]]) -> None:
        done = wire.envelope(env.request_id)
        done.infer_done.SetInParent()
        after_done = spec.get("after_done", False)
        if after_done:
            self.send([done.SerializeToString()])
            gate = spec.get("gate")
            while gate and not os.path.exists(gate):
                time.sleep(0.005)
        sent = 0
        n = int(spec.get("n", 1))
        for i, r in enumerate(env.infer.requests):
            data = b"".join(d for d, _ in inputs[i])
            for k in range(n):
                if "die_after" in spec and sent == int(spec["die_after"]):
                    self.events.log("dying mid-stream", sent=sent)
                    os._exit(3)
                msg = wire.envelope(env.request_id)
                msg.streamed.index = r.id
                msg.streamed.final = k == n - 1 and not spec.get("final_alone")
                ref = msg.streamed.result.outputs.add()
                ref.name, ref.datatype, ref.frame = "OUT", "UINT8", 0
                ref.shape.append(len(data) + 1)
                self.send([msg.SerializeToString(), data + bytes([k])])
                sent += 1
            if spec.get("final_alone"):
                end = wire.envelope(env.request_id)
                end.streamed.index = r.id
                end.streamed.final = True
                self.send([end.SerializeToString()])
        if not after_done:
            self.send([done.SerializeToString()])
        self.events.log("streamed", rid=env.request_id, sent=sent)

    def _results(
        self,
        env: wpb.Envelope,
        action: Plan,
        inputs: list[list[tuple[bytes, str]]],
        done: wpb.InferDone,
        out_frames: list[bytes],
    ) -> None:
        errors: dict[str, list[str]] = action.get("errors", {})
        places = action.get("outputs", "inline")
        requests = list(env.infer.requests)
        count = len(requests) + int(action.get("results_delta", 0))
        written: list[list[int]] = []
        for i in range(count):
            req = requests[i % len(requests)]
            res = done.results.add()
            res.id = req.id
            res.parameters_json = json.dumps({"pid": os.getpid(), "rid": env.request_id, "index": i})
            if str(i) in errors:
                code, message = errors[str(i)]
                _failed(code, message, res.error)
                continue
            where = places[i % len(places)] if isinstance(places, list) else places
            if where == "none":
                continue
            data = b"".join(d for d, _ in inputs[i % len(inputs)])
            ref = res.outputs.add()
            ref.name = "OUT"
            ref.datatype = "UINT8"
            ref.shape.append(len(data))
            if where == "shm":
                assert self.arena is not None, "Infer before Load"
                block = self.arena.allocate(len(data))
                view = self.arena.view(block)
                view[:] = data
                view.release()
                ref.shm.region, ref.shm.offset, ref.shm.device = block.region, block.offset, block.device
                ref.shm.nbytes = block.nbytes + (1 << 30 if action.get("bad_block") else 0)
                written.append([block.offset, block.nbytes])
            else:
                ref.frame = len(out_frames) + (5 if action.get("bad_frame") else 0)
                out_frames.append(data)
        if written:
            self.events.log("outputs", rid=env.request_id, blocks=written, live=self._live())

    def _live(self) -> int:
        return self.arena.stats().live_blocks if self.arena is not None else 0

    def _release(self, rel: wpb.Release) -> None:
        freed: list[list[int]] = []
        for s in rel.blocks:
            block = Block(s.region, s.offset, s.nbytes, s.device)
            if self.arena is not None and self.arena.owns(block):
                self.arena.free(block)
                freed.append([s.offset, s.nbytes])
        self.events.log("release", blocks=freed, asked=len(rel.blocks), live=self._live())


def _die_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str] | None = None, worker_class: type[FakeWorker] = FakeWorker) -> int:
    """Run one fake worker process; ``worker_class``: a ``FakeWorker`` subclass to run instead
    (tests/component/models picks the plan from the model the process is told to load)."""
    p = argparse.ArgumentParser(prog="fake_worker")
    p.add_argument("-P", action="store_true")
    p.add_argument("-m", dest="module")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--identity", required=True)
    p.add_argument("--parent-pid", type=int, required=True)
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--heartbeat-ms", type=int, default=0)
    args = p.parse_args(argv)
    _die_with_parent(args.parent_pid)
    gen = int(args.identity.split("#")[1])
    script = json.loads(os.environ.get("FAKE_WORKER_SCRIPT", "{}"))
    plans: list[Plan] = script.get("plans") or [{}]
    plan = plans[min(gen, len(plans)) - 1]
    events = Events(os.environ.get("FAKE_WORKER_EVENTS", ""), gen)
    events.log(
        "start",
        argv=sys.argv[1:] if argv is None else argv,
        no_path=args.P,
        module=args.module,
        parent_pid=args.parent_pid,
        heartbeat_ms=args.heartbeat_ms,
        log_verbose=args.log_verbose,
    )
    worker = worker_class(args.endpoint, args.identity.encode(), args.heartbeat_ms, plan, events)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        events.log("sigterm")
        if plan.get("on_sigterm", "exit") == "exit":
            raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    status = worker.run()
    events.log("exit", status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())
