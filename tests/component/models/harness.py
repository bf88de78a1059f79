"""The router side of the model-management component tests: the real ``ModelManager`` and
``DataPlane`` composed as ``server/app.py`` composes them (channel, input arena, mapper,
dispatch context, instance settings), over a model repository the test writes, in the test's
own event loop. Every worker is a fake process (``fake_model_worker.py``): the settings'
``python`` (``--worker-python``) is a launcher script, so the product's own spawn line starts
it; what each process does comes from the model's configuration (``plans``)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.dataplane import DataPlane
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.pool import DispatchContext
from shoal.server.logsettings import LogSettings
from shoal.server.models import InstanceSettings, ModelManager, ModelVersion
from shoal.server.sharedmem import SharedMemoryRegistry
from shoal.server.types import InferRequest, InferResult, InputTensor
from shoal.shm import region
from shoal.shm.arena import Arena
from shoal.shm.mapper import Mapper
from tests.component.dispatch.harness import alive, eventually
from tests.component.models.fake_model_worker import PLANS_FILE, PLANS_PARAMETER

__all__ = ["MakeEnv", "ModelEnv", "Plan", "alive", "config", "ensemble_config", "eventually", "out_bytes", "pid_of"]

ROOT = Path(__file__).resolve().parents[3]
INLINE_MAX = 64
"""Inputs larger than this go through the router's input arena."""
Plan = dict[str, Any]


def config(
    name: str,
    *,
    plans: Sequence[Plan] | Mapping[str, Sequence[Plan]] | None = None,
    count: int = 1,
    max_batch_size: int = 0,
    latest: int = 0,
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """A Python-backend model with input ``IN0`` and output ``OUT`` (UINT8, one variable
    dimension), the fake's echo; ``plans``: what its processes do (``fake_worker``), one plan
    per process generation, or such lists by instance name (``"*"``: the others)."""
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    cfg.input.add(name="IN0", data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name="OUT", data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=count)
    if latest:
        cfg.version_policy.latest.num_versions = latest
    if plans is not None:
        chosen = {k: list(v) for k, v in plans.items()} if isinstance(plans, Mapping) else list(plans)
        cfg.parameters[PLANS_PARAMETER].string_value = json.dumps(chosen)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(name: str, *steps: str, tensor_in: str = "IN0", tensor_out: str = "OUT") -> mc.ModelConfig:
    """An ensemble chaining ``steps`` (models with ``IN0`` -> ``OUT``) with the same input and output."""
    cfg = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=0)
    cfg.input.add(name=tensor_in, data_type=mc.TYPE_UINT8, dims=[-1])
    cfg.output.add(name=tensor_out, data_type=mc.TYPE_UINT8, dims=[-1])
    for i, model in enumerate(steps):
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map["IN0"] = tensor_in if i == 0 else f"t{i}"
        step.output_map["OUT"] = tensor_out if i == len(steps) - 1 else f"t{i + 1}"
    return cfg


def out_bytes(result: InferResult) -> bytes:
    """The echoed bytes of a fake's answer (``result.done()`` is called: nothing stays held)."""
    try:
        return bytes(result.outputs[0].data)
    finally:
        result.done()


def pid_of(result: InferResult) -> int:
    """The pid of the fake process that answered."""
    pid: int = result.parameters["pid"]
    return pid


class ModelEnv:
    """A model repository under ``tmp`` and the router components serving it."""

    def __init__(
        self,
        tmp: Path,
        *,
        mode: str = "explicit",
        drain_timeout_s: float = 5.0,
        load_timeout_s: float = 5.0,
        max_workers: int = 1024,
        allow_admin: bool = True,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.repo = tmp / "repo"
        self.repo.mkdir()
        self.events_path = tmp / "events.jsonl"
        self.prefix = f"shoal_{os.getpid()}_{secrets.token_hex(6)}"
        self.launcher = tmp / "fake-python"
        self.launcher.write_text(
            "#!/bin/sh\n"
            f'export FAKE_WORKER_EVENTS="{self.events_path}"\n'
            f'PYTHONPATH="{ROOT}${{PYTHONPATH:+:$PYTHONPATH}}" '
            f'exec "{sys.executable}" -m tests.component.models.fake_model_worker "$@"\n'
        )
        self.launcher.chmod(self.launcher.stat().st_mode | stat.S_IXUSR)
        self.channel = WorkerChannel(f"ipc://{tmp}/workers.sock")
        self.channel.start()
        self.arena = Arena(f"{self.prefix}_in", segment_bytes=1 << 16, max_bytes=1 << 20)
        self.mapper = Mapper()
        self.shm = SharedMemoryRegistry()
        self.ctx = DispatchContext(arena=self.arena, mapper=self.mapper, inline_max_bytes=INLINE_MAX, shm=self.shm)
        self.settings = InstanceSettings(
            run_prefix=self.prefix,
            worker_arena_bytes=1 << 16,
            inline_max_bytes=INLINE_MAX,
            load_timeout_s=load_timeout_s,
            heartbeat_timeout_s=0.0,
            max_workers=max_workers,
            python=str(self.launcher),
        )
        self.models = ModelManager(
            self.repo,
            channel=self.channel,
            ctx=self.ctx,
            settings=self.settings,
            mode=mode,
            drain_timeout_s=drain_timeout_s,
        )
        root = logging.getLogger()
        self._root_level = root.level
        self._root_formatters = [(h, h.formatter) for h in root.handlers]
        self.plane = DataPlane(
            self.models,
            version="test",
            logs=LogSettings(),
            shm=self.shm,
            allow_admin=allow_admin,
        )
        self.plane.started = True
        self._gates = 0
        self._gate_paths: list[str] = []

    # ---- the repository ------------------------------------------------------------------

    def write(self, cfg: mc.ModelConfig, versions: Sequence[int] = (1,)) -> Path:
        """Write ``cfg`` as ``<repo>/<name>/config.pbtxt`` and make the version directories
        (each with a file: an empty directory changes no fingerprint)."""
        path = self.repo / cfg.name
        path.mkdir(exist_ok=True)
        for v in versions:
            self.add_version(cfg.name, v)
        self.write_file(path / "config.pbtxt", text_format.MessageToString(cfg))
        return path

    @staticmethod
    def write_file(path: Path, text: str) -> None:
        """Write ``path``, its mtime always moving on: file times follow a coarse clock, and a
        rewrite of the same size within one tick would change no fingerprint."""
        before = path.stat().st_mtime_ns if path.exists() else 0
        path.write_text(text)
        after = path.stat().st_mtime_ns
        if after <= before:
            os.utime(path, ns=(before + 1_000_000, before + 1_000_000))

    def add_version(self, name: str, version: int, plans: Sequence[Plan] | None = None) -> Path:
        """A version directory; ``plans``: what this version's processes do, whatever the
        configuration says."""
        vdir = self.repo / name / str(version)
        vdir.mkdir(parents=True, exist_ok=True)
        (vdir / "weights").write_text(f"{name} {version}\n")
        if plans is not None:
            (vdir / PLANS_FILE).write_text(json.dumps(list(plans)))
        return vdir

    def gate(self) -> str:
        """A file path for a ``hold`` action: the fake answers once ``open_gate`` made it."""
        self._gates += 1
        path = str(self.tmp / f"gate{self._gates}")
        self._gate_paths.append(path)
        return path

    @staticmethod
    def open_gate(path: str) -> None:
        Path(path).touch()

    # ---- requests ------------------------------------------------------------------------

    @staticmethod
    def request(model: str, data: bytes = b"abc", version: int = -1, rid: str = "") -> InferRequest:
        return InferRequest(
            model_name=model, model_version=version, inputs=[InputTensor("IN0", "UINT8", (len(data),), data)], id=rid
        )

    async def infer(self, model: str, data: bytes = b"abc", version: int = -1) -> InferResult:
        return await self.plane.infer(self.request(model, data, version))

    def version(self, model: str, v: int) -> ModelVersion:
        return self.models.registry.models[model][v]

    def index(self) -> dict[tuple[str, str], dict[str, str]]:
        return {(e["name"], e.get("version", "")): e for e in self.models.index()}

    # ---- what the fake processes did ------------------------------------------------------

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.events_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = [json.loads(line) for line in lines if line]
        return [e for e in out if kind is None or e["event"] == kind]

    def pids(self, model: str | None = None, version: int | None = None) -> list[int]:
        """Processes started (all), or those told to load ``model`` (``version``), in order."""
        if model is None:
            return [e["pid"] for e in self.events("start")]
        return [
            e["pid"]
            for e in self.events("load")
            if e["model"] == model and (version is None or e["version"] == version)
        ]

    def live_pids(self, model: str | None = None, version: int | None = None) -> list[int]:
        return [p for p in self.pids(model, version) if alive(p)]

    async def all_exited(self, pids: Sequence[int], what: str = "the worker processes to exit") -> None:
        await eventually(lambda: not any(alive(p) for p in pids), what)

    def segments(self) -> list[str]:
        """/dev/shm segments of the workers' output arenas (the router's input arena aside)."""
        mine = self.prefix + "_w"
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(mine))

    def mapped_worker_segments(self) -> list[str]:
        """Worker arena segments this (router) process still maps, unlinked or not."""
        mine = f"/dev/shm/{self.prefix}_w"
        with open("/proc/self/maps") as f:
            return sorted({line.split(None, 5)[5].strip() for line in f if mine in line})

    # ---- teardown ------------------------------------------------------------------------

    async def close(self) -> list[str]:
        """Stop everything; returns what was left behind (processes, blocks, segments),
        cleaned up."""
        problems: list[str] = []
        for gate in self._gate_paths:
            self.open_gate(gate)  # a failed test may have left a worker waiting
        try:
            await self.models.stop(2.0)
        except Exception as exc:  # noqa: BLE001 - reported, and the rest still cleaned up
            problems.append(f"ModelManager.stop raised {exc!r}")
        self.channel.close()
        for pid in self.pids():
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
        root = logging.getLogger()
        root.setLevel(self._root_level)
        for handler, formatter in self._root_formatters:
            handler.setFormatter(formatter)
        return problems


MakeEnv = Callable[..., ModelEnv]
"""The ``make_env`` fixture: a ``ModelEnv`` in the test's temporary directory (keywords: its
settings)."""
