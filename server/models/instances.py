"""``InstanceFactory``: the worker processes of a model version: where each instance runs,
the ``Load`` message it gets, and the bound on how many exist (``--max-worker-processes``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shoal.proto import hostpolicy
from shoal.proto.errors import ErrorCode, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server import gpus
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.ratelimit import RateLimiter
from shoal.server.dispatch.worker import Worker, WorkerSpec, WorkerState
from shoal.server.models.version import ModelVersion
from shoal.server.optionvalues import backend_settings
from shoal.server.repositories import Repositories


@dataclass(frozen=True, slots=True)
class InstanceSettings:
    """Router-wide settings every worker gets."""

    run_prefix: str
    worker_arena_bytes: int
    inline_max_bytes: int
    log_verbose: int = 0
    load_timeout_s: float = 120.0
    gpu_devices: tuple[str, ...] = ()
    """The server's GPUs as CUDA_VISIBLE_DEVICES entries (``server.gpus.devices``)."""
    heartbeat_timeout_s: float = 30.0
    stall_timeout_s: float = 0.0
    max_workers: int = 1024
    """Worker processes the server runs at most (``--max-worker-processes``)."""
    python: str = ""
    """The interpreter that runs workers (``--worker-python``; empty: the router's)."""
    client_shm_mapped: bool = False
    lanes: bool = False
    """Workers open a lane socket for frontend processes (``server.frontproc.lanes``)."""
    busy_poll_us: int = 0
    """``--busy-poll-us``: given to every worker as ``SHOAL_BUSY_POLL_US``."""
    backend_config: tuple[tuple[str, str, str], ...] = ()
    """``--backend-config`` settings as (backend, key, value)."""
    host_policies: tuple[tuple[str, str, str], ...] = ()
    """``--host-policy`` settings as (policy name, setting, value): a worker gets those of its
    instance's policy (``proto.hostpolicy``)."""
    gpu_load_limits: tuple[tuple[int, float], ...] = ()
    """``--model-load-gpu-limit`` as (device id, fraction): a GPU worker gets its GPU's."""


def placements(group: mc.ModelInstanceGroup) -> list[tuple[str, int]]:
    """(device kind, server GPU ordinal or -1) of each instance of ``group``."""
    kinds = mc.ModelInstanceGroup
    if group.kind == kinds.KIND_GPU:
        return [("GPU", gpu) for gpu in group.gpus for _ in range(group.count)]
    kind = "MODEL" if group.kind == kinds.KIND_MODEL else "CPU"
    return [(kind, -1)] * group.count


class InstanceFactory:
    """Makes workers (not started); owns the count of those alive. Owned by the router's
    event loop. ``on_exit`` is every worker's exit hook."""

    def __init__(
        self,
        *,
        repositories: Repositories,
        channel: WorkerChannel,
        settings: InstanceSettings,
        on_exit: Callable[[Worker], None],
        limiter: RateLimiter | None = None,
    ) -> None:
        self.limiter = limiter
        self.repositories = repositories
        self.channel = channel
        self.settings = settings
        self.on_exit = on_exit
        self._counter = 0
        self._live: set[Worker] = set()
        """Every worker made and not yet stopped (the ``max_workers`` bound counts these)."""

    def make(self, mv: ModelVersion) -> list[Worker]:
        """The workers of ``mv``; raises ``RESOURCE_EXHAUSTED`` when they would pass
        ``--max-worker-processes``."""
        self._live = {w for w in self._live if w.state not in (WorkerState.STOPPED, WorkerState.FAILED)}
        wanted = sum(len(placements(g)) for g in mv.config.instance_group)
        limit = self.settings.max_workers
        if len(self._live) + wanted > limit:
            raise ServingError(
                f"model '{mv.name}' version {mv.version} needs {wanted} worker processes; the server runs "
                f"{len(self._live)} of at most {limit} (--max-worker-processes)",
                code=ErrorCode.RESOURCE_EXHAUSTED,
            )
        config_bytes = mv.config.SerializeToString()
        workers = []
        for group in mv.config.instance_group:
            for i, (kind, gpu) in enumerate(placements(group)):
                policy = hostpolicy.policy_name(group.host_policy, kind, gpu)
                worker = self._worker(mv, config_bytes, f"{group.name}_{i}", kind, gpu, policy)
                if self.limiter is not None:
                    worker.rate = self.limiter.needs(group.rate_limiter, gpu)
                workers.append(worker)
        self._live.update(workers)
        return workers

    def _worker(self, mv: ModelVersion, config_bytes: bytes, instance: str, kind: str, gpu: int, policy: str) -> Worker:
        s = self.settings
        devs = list(s.gpu_devices)
        env: tuple[tuple[str, str], ...] = (("SHOAL_BUSY_POLL_US", str(s.busy_poll_us)),) if s.busy_poll_us else ()
        order: list[int] = []
        if kind == "GPU":
            # its GPU is device 0 to the worker; the others stay visible behind it
            env += (("CUDA_VISIBLE_DEVICES", gpus.visible_env(gpu, devs)),)
            order = gpus.worker_order(gpu, devs)
        load = wpb.Load(
            model_config=config_bytes,
            repository=str(self.repositories.root_of(mv.name)),
            model_name=mv.name,
            model_version=mv.version,
            instance_name=instance,
            device_kind=kind,
            device_index=gpu,
            arena_bytes=s.worker_arena_bytes,
            inline_max_bytes=s.inline_max_bytes,
            gpu_order=order,
            priority=int(mv.config.optimization.priority),
            client_shm_mapped=s.client_shm_mapped,
            lanes=s.lanes,
            backend_config=backend_settings(s.backend_config, mv.config.backend),
            host_policy={k: v for name, k, v in s.host_policies if name == policy},
            host_policy_name=policy,
        )
        limit = dict(s.gpu_load_limits).get(gpu) if kind == "GPU" else None
        if limit is not None:
            load.gpu_load_limit = limit
        spec = WorkerSpec(
            model_name=mv.name,
            model_version=mv.version,
            instance_name=instance,
            load=load,
            load_timeout_s=s.load_timeout_s,
            log_verbose=s.log_verbose,
            env=env,
            heartbeat_timeout_s=s.heartbeat_timeout_s,
            stall_timeout_s=s.stall_timeout_s,
            python=s.python,
        )
        self._counter += 1
        prefix = f"{s.run_prefix}_w{self._counter}"
        return Worker(spec, channel=self.channel, arena_prefix=prefix, on_exit=self.on_exit)
