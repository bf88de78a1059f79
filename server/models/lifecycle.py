"""``ModelManager``: loading, reloading, unloading, polling and stopping models.

Every load or reload starts the new or changed versions while the old ones serve, swaps them
in, then lets the old ones finish their requests and stop; a version that fails to load
leaves the old one serving. Each version goes UNAVAILABLE -> LOADING -> READY -> UNLOADING ->
UNAVAILABLE. Operations on one model are serialized. Owned by the router's event loop; the
``Registry`` it writes is what requests read.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from shoal.proto import errortexts as T
from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server import autocomplete, ensemble, events
from shoal.server.dispatch.channel import WorkerChannel
from shoal.server.dispatch.pool import DispatchContext, InstancePool
from shoal.server.dispatch.worker import Worker
from shoal.server.latencymetrics import LatencyConfig, LatencyMetrics
from shoal.server.models.index import repository_index
from shoal.server.models.instances import InstanceFactory, InstanceSettings
from shoal.server.models.registry import Registry
from shoal.server.models.version import ModelState, ModelVersion, new_version, submit, version_print
from shoal.server.repositories import Repositories
from shoal.server.repository import ModelSource, fingerprint, parse_config, read_model, validate_model_name
from shoal.server.scheduling.base import Scheduler
from shoal.server.scheduling.direct import DirectScheduler
from shoal.server.scheduling.dynamic import DynamicBatcher
from shoal.server.scheduling.ensemble import EnsembleScheduler
from shoal.server.scheduling.sequence import SequenceBatcher
from shoal.server.types import InferRequest, InferResult
from shoal.server.validation import validate

log = logging.getLogger("shoal.models")

_LOADING: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("loading", default=())
"""The chain of ensembles whose loads led to the current load (finds cycles)."""
_ENSEMBLE_ERRORS = ("composing model ", "ensembles form a cycle")
"""How the errors of an ensemble's composing models start (``_load_composing``)."""


class ModelManager:
    """``mode``: "none" (load everything at start), "poll" (and follow the repository), or
    "explicit" (load / unload on request)."""

    def __init__(
        self,
        repository: Path | Repositories,
        *,
        channel: WorkerChannel,
        ctx: DispatchContext,
        settings: InstanceSettings,
        mode: str = "none",
        drain_timeout_s: float = 30.0,
        auto_complete: bool = True,
        refresh: Callable[[], Awaitable[None]] | None = None,
        load_threads: int = 4,
        load_retries: int = 0,
        latency: LatencyConfig | None = None,
    ) -> None:
        self.latency = latency or LatencyConfig()
        """``--metrics-config`` summaries and histograms of each version's latencies."""
        self.auto_complete = auto_complete
        self.refresh = refresh
        """Brings a remote repository's local copy up to date (before polls and loads)."""
        self.repos = repository if isinstance(repository, Repositories) else Repositories((repository,))
        self.ctx = ctx
        self.load_retries = load_retries
        self._load_slots = asyncio.Semaphore(max(1, load_threads))
        """``--model-load-thread-count``: loads (reading, auto-complete, starting workers) at once."""
        self.settings = settings
        self.mode = mode
        self.drain_timeout_s = drain_timeout_s
        self.registry = Registry()
        self.factory = InstanceFactory(
            repositories=self.repos,
            channel=channel,
            settings=settings,
            on_exit=self._on_worker_exit,
            limiter=ctx.limiter,
        )
        self._locks: dict[str, asyncio.Lock] = {}
        self.arena_gone: list[Callable[[str], None]] = []
        """Told the arena prefix of a worker that exited (frontend processes map its outputs too)."""

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return repository_index(self.registry, self.repos.names, ready_only)

    # ---- loading -------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        """Load every model of the repository (or ``names``) concurrently; failures are
        logged and kept as UNAVAILABLE with a reason, never raised."""
        if names is None:
            names = self.repos.names()

        async def one(name: str) -> None:
            # --model-load-retry-count: a failed load is tried again that many times
            for attempt in range(self.load_retries + 1):
                try:
                    async with self._load_slots:
                        await self.load(name, record_missing=True)
                    return
                except ServingError:
                    pass  # logged and recorded by load()
                if attempt < self.load_retries:
                    log.info("model '%s': load failed; retrying (%d of %d)", name, attempt + 1, self.load_retries)

        await asyncio.gather(*(one(name) for name in names))

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    async def load(
        self,
        name: str,
        override: mc.ModelConfig | None = None,
        *,
        record_missing: bool = False,
        upload: Path | None = None,
    ) -> None:
        """Load or reload ``name``; raises ``ServingError`` naming what failed.

        A name that is neither a directory of the repository nor a known model fails at once
        and leaves no trace (index, readiness), as in Triton; ``record_missing`` (models
        named on the command line) records it as UNAVAILABLE instead. ``upload``: the
        directory of files sent with the load request (``Repositories.write_upload``), read
        instead of the repository's; a later load without files goes back to the repository."""
        validate_model_name(name)
        previous = None
        if upload is not None or name in self.repos.uploads:
            previous = self.repos.use_upload(name, upload)
        try:
            if not record_missing and name not in self.registry.sources and not self.repos.exists(name):
                raise T.LOAD_POLL_FAILED(model=name)
            chain = _LOADING.get()
            if name in chain:
                raise InvalidInput(f"failed to load '{name}': ensembles form a cycle: {' -> '.join((*chain, name))}")
            token = _LOADING.set((*chain, name))
            try:
                await self._load(name, override)
            finally:
                _LOADING.reset(token)
        finally:
            if previous is not None and previous != upload:
                self.repos.drop_upload(previous)

    async def _read(self, name: str, override: mc.ModelConfig | None) -> ModelSource:
        """The model's source: auto-completed, normalized, its composing models loaded."""
        try:
            if self.auto_complete:
                override = await autocomplete.complete(
                    self.repos.root_of(name),
                    name,
                    override,
                    self.settings.load_timeout_s,
                    self.settings.python,
                    self.settings.backend_config,
                )
            conflict = self.repos.conflict(name)
            if conflict:
                raise InvalidInput(conflict)
            src = read_model(self.repos.root_of(name), name, len(self.settings.gpu_devices), override)
            if not src.error and ensemble.is_ensemble(src.config):
                await self._load_composing(src.config)
        except ServingError as exc:
            src = ModelSource(name=name, path=self.repos.path(name), error=exc.message)
        return src

    async def _load(self, name: str, override: mc.ModelConfig | None) -> None:
        reg = self.registry
        async with self._lock(name):
            reg.wanted.add(name)
            fp = (fingerprint(self.repos.path(name)), override.SerializeToString() if override else b"")
            src = await self._read(name, override)
            old = reg.models.get(name, {})
            # READY versions, even one whose only worker is restarting now: a failed reload keeps it
            serving = {v: mv for v, mv in old.items() if mv.state is ModelState.READY}
            if src.error:
                log.error("model '%s' cannot be loaded: %s", name, src.error)
                events.RECENT.add(events.LOAD_FAILED, name, src.error)
                # Triton's text, unless an ensemble's composing models failed (Shoal's own texts)
                polled = src.error.startswith(_ENSEMBLE_ERRORS)
                if serving:
                    reg.sources[name].error = ""
                    reg.sources[name].reload_error = src.error
                    if not polled:
                        raise T.LOAD_POLL_FAILED(model=name)
                    raise InvalidInput(f"failed to load '{name}': {src.error}; the previous version keeps serving")
                reg.sources[name] = src
                reg.models[name] = {}
                reg.fingerprints[name] = fp
                await self._retire_all(old.values())
                if not polled:
                    raise T.LOAD_POLL_FAILED(model=name)
                raise InvalidInput(f"failed to load '{name}': {src.error}")
            config_bytes = src.config.SerializeToString(deterministic=True)
            chosen: dict[int, ModelVersion] = {}
            starting: list[ModelVersion] = []
            for v in src.versions:
                mv = serving.get(v)
                if mv is not None and mv.config_bytes == config_bytes and mv.fingerprint == version_print(fp, v):
                    chosen[v] = mv  # unchanged: keeps serving as it is
                    continue
                fresh = new_version(src, v)
                if self.latency.any:
                    fresh.stats.latency = LatencyMetrics(self.latency)
                fresh.config_bytes = config_bytes
                fresh.fingerprint = version_print(fp, v)
                chosen[v] = fresh
                starting.append(fresh)
            if starting and not old:
                reg.models[name] = chosen  # first load: LOADING states are visible at once
            await asyncio.gather(*(self._load_version(mv) for mv in starting))
            failed = [mv for mv in starting if mv.state is not ModelState.READY]
            for mv in failed:
                previous = serving.get(mv.version)
                if previous is not None:
                    chosen[mv.version] = previous
            if failed and serving and not any(mv.state is ModelState.READY for mv in chosen.values()):
                # no newly chosen version could load (e.g. a broken new version directory):
                # the versions serving now go on serving
                chosen = {v: mv for v, mv in chosen.items() if mv.state is ModelState.READY} | serving
            src.reload_error = "; ".join(f"version {mv.version}: {mv.reason}" for mv in failed)
            reg.sources[name] = src
            reg.models[name] = chosen
            reg.fingerprints[name] = fp
            await self._retire_all(mv for v, mv in old.items() if chosen.get(v) is not mv)
            if failed:
                reasons = "".join(T.LOAD_VERSION_FAILED.text(version=mv.version, reason=mv.reason) for mv in failed)
                raise T.LOAD_FAILED(model=name, reasons=reasons)

    async def _load_composing(self, config: mc.ModelConfig) -> None:
        """Make sure every model an ensemble's steps use is loaded (loading it if not)."""
        self._check_cycle(config)
        for sub in ensemble.composing_models(config):
            if not sub:
                continue  # the plan reports it, naming the step
            lock = self._lock(sub)
            if lock.locked():
                async with lock:
                    pass  # being loaded (e.g. at start-up): wait for that load
            if any(mv.ready for mv in self.registry.models.get(sub, {}).values()):
                continue
            try:
                await self.load(sub)
            except ServingError as exc:
                raise InvalidInput(f"composing model '{sub}' failed to load: {exc.message.rstrip()}") from None

    def _check_cycle(self, config: mc.ModelConfig) -> None:
        """Refuse an ensemble that reaches itself through nested ensembles (read from the
        repository's configs: two loads waiting for each other would never finish)."""

        def visit(cfg: mc.ModelConfig, path: tuple[str, ...]) -> None:
            for sub in ensemble.composing_models(cfg):
                if sub in path:
                    raise InvalidInput(f"ensembles form a cycle: {' -> '.join((*path, sub))}")
                try:
                    validate_model_name(sub)
                    sub_cfg = parse_config(self.repos.path(sub), sub)
                except ServingError:
                    continue  # not an ensemble we can read: its own load reports it
                if ensemble.is_ensemble(sub_cfg):
                    visit(sub_cfg, (*path, sub))

        visit(config, (config.name,))

    async def _load_version(self, mv: ModelVersion) -> None:
        mv.state = ModelState.LOADING
        started = time.monotonic()
        try:
            workers = self.factory.make(mv)
            pool = InstancePool(workers, self.ctx, mv.stats)
            # before any process starts: a scheduler's configuration errors (e.g. a missing
            # initial-state file) need no worker to be found
            scheduler = self._scheduler(mv, pool)
        except (ServingError, OSError) as exc:
            _failed(mv, exc)
            return
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
            _failed(mv, errors[0])
            return
        mv.pool, mv.scheduler = pool, scheduler
        mv.state = ModelState.READY
        mv.reason = ""
        mv.load_seconds = time.monotonic() - started
        log.info(
            "model '%s' version %d ready (%d instances, %.2f s)", mv.name, mv.version, len(workers), mv.load_seconds
        )

    def _scheduler(self, mv: ModelVersion, pool: InstancePool) -> Scheduler:
        if ensemble.is_ensemble(mv.config):
            reg = self.registry
            plan = ensemble.plan(mv.config, lambda name, version: reg.get(name, version).config)
            mv.unavailable = lambda: reg.steps_unavailable(plan)
            return EnsembleScheduler(plan, self.run_step, mv.stats)
        if mv.config.HasField("sequence_batching"):
            return SequenceBatcher(pool, mv.config, mv.stats, self.repos.path(mv.name))
        if mv.config.max_batch_size > 0 and mv.config.HasField("dynamic_batching"):
            return DynamicBatcher(pool, mv.config, mv.stats)
        return DirectScheduler(pool, mv.stats)

    def _on_worker_exit(self, worker: Worker) -> None:
        # Outputs of the dead process are unreadable now; drop our mappings of its arena,
        # and those of other workers (ensemble steps read it in place).
        self.ctx.mapper.forget_prefix(worker.arena_prefix)
        cuda_ids = self.ctx.forget_cuda(worker.arena_prefix + "_cuda")  # its CUDA arena, opened by IPC
        for other in self.registry.workers():
            if other is not worker:
                other.forget(region_ids=cuda_ids, arena_prefixes=[worker.arena_prefix])
        for tell in self.arena_gone:
            tell(worker.arena_prefix)

    async def run_step(self, request: InferRequest) -> InferResult:
        """One ensemble step: ``request`` on the model it names, as a client request would
        run (version policy, validation, that model's scheduler)."""
        mv = self.registry.get(request.model_name, request.model_version)
        request.model_version = mv.version
        validate(mv, request)
        return await submit(mv, request)

    # ---- unloading -----------------------------------------------------------------------

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Stop serving ``name``: new requests fail at once, requests in flight finish.
        ``dependents``: also unload the ensembles using ``name`` and, when ``name`` is an
        ensemble, the composing models no other loaded ensemble uses."""
        validate_model_name(name)
        reg = self.registry
        composing = reg.composing_of(name) if dependents else []
        users = reg.ensembles_using(name) if dependents else []
        await self._unload(name)
        uploaded = self.repos.use_upload(name, None)
        if uploaded is not None:
            self.repos.drop_upload(uploaded)
        for other in users:
            if reg.models.get(other):
                log.info("unloading ensemble '%s', which uses '%s'", other, name)
                await self._unload(other)
        for sub in composing:
            if reg.models.get(sub) and not reg.ensembles_using(sub):
                log.info("unloading '%s', a composing model of '%s'", sub, name)
                await self.unload(sub, dependents=True)

    async def _unload(self, name: str) -> None:
        reg = self.registry
        async with self._lock(name):
            reg.wanted.discard(name)
            versions = reg.models.get(name)
            if not versions and name not in reg.sources:
                # as Triton: unloading a model that is not loaded (or not in the repository at
                # all) changes nothing and succeeds, so "unload, then load" scripts can run twice
                return
            await self._retire_all(list((versions or {}).values()))
            src = reg.sources.get(name)
            if src is not None:
                src.error = ""
                src.reload_error = ""
            reg.fingerprints.pop(name, None)

    async def _retire_all(self, versions: Iterable[ModelVersion]) -> None:
        retiring = list(versions)
        # UNLOADING at once, in the same step as the swap that retires them: gather starts the
        # _retire tasks only on the next loop turn, and nothing may see a retired version
        # still READY meanwhile (a component test caught that window)
        for mv in retiring:
            if not (mv.state is ModelState.UNAVAILABLE and mv.pool is None):
                mv.state = ModelState.UNLOADING
        await asyncio.gather(*(self._retire(mv) for mv in retiring))

    async def _retire(self, mv: ModelVersion) -> None:
        if mv.state is ModelState.UNAVAILABLE and mv.pool is None:
            mv.reason = mv.reason or "unloaded"
            return
        mv.state = ModelState.UNLOADING
        if mv.scheduler is not None:
            await mv.scheduler.drain(self.drain_timeout_s)
        if mv.pool is not None:
            await asyncio.gather(*(w.stop() for w in mv.pool.workers), return_exceptions=True)
        mv.state = ModelState.UNAVAILABLE
        mv.reason = "unloaded"
        log.info("model '%s' version %d unloaded", mv.name, mv.version)

    # ---- polling -------------------------------------------------------------------------

    async def poll_once(self) -> None:
        """Pick up models, versions, configs and label files added, changed or removed."""
        if self.refresh is not None:
            await self.refresh()
        reg = self.registry
        present = set(self.repos.names())
        for name in sorted(set(reg.fingerprints) - present):
            log.info("model '%s' left the repository: unloading", name)
            try:
                await self.unload(name)
            except ServingError as exc:
                log.error("unloading '%s' failed: %s", name, exc.message)
        changed: set[str] = set()
        for name in sorted(present):
            if reg.fingerprints.get(name) == (fingerprint(self.repos.path(name)), b""):
                continue
            log.info("model '%s' changed in the repository: (re)loading", name)
            changed.add(name)
            try:
                await self.load(name)
            except ServingError as exc:
                log.error("%s", exc.message)
        for name in sorted(present - changed):
            # an ensemble that failed to load may load now that a composing model changed
            src = reg.sources.get(name)
            if src is None or not src.error or not changed & set(self._composing_on_disk(name)):
                continue
            log.info("ensemble '%s': a composing model changed; loading it again", name)
            try:
                await self.load(name)
            except ServingError as exc:
                log.error("%s", exc.message)

    def _composing_on_disk(self, name: str) -> list[str]:
        """The composing models of ``name``'s config.pbtxt ([] if it is no readable ensemble)."""
        try:
            config = parse_config(self.repos.path(name), name)
        except ServingError:
            return []
        return ensemble.composing_models(config) if ensemble.is_ensemble(config) else []

    async def poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - polling must go on
                log.exception("polling the model repository failed")

    # ---- operators and shutdown ----------------------------------------------------------

    async def restart_instance(self, name: str, instance: str, version: int = -1) -> list[dict[str, object]]:
        """Restart one instance (of every loaded version, or of ``version``): the others keep
        serving; its in-flight batches finish first (up to the drain timeout)."""
        versions = self.registry.models.get(name)
        if not versions:
            raise ServingError(f"model '{name}' is not loaded", code=ErrorCode.NOT_FOUND)
        chosen = [mv for v, mv in versions.items() if version < 0 or v == version]
        workers = [
            w for mv in chosen if mv.pool is not None for w in mv.pool.workers if w.spec.instance_name == instance
        ]
        if not workers:
            where = f"version {version} of model '{name}'" if version >= 0 else f"model '{name}'"
            raise ServingError(f"{where} has no instance '{instance}'", code=ErrorCode.NOT_FOUND)
        await asyncio.gather(*(w.restart(self.drain_timeout_s) for w in workers))
        return [i for i in self.registry.instances() if i["model"] == name and i["instance"] == instance]

    def server_stopping(self) -> None:
        """The server shuts down: a worker process that exits from now on is not replaced."""
        for w in self.registry.workers():
            w.server_stopping = True

    async def drain(self, timeout_s: float) -> None:
        """Stop admitting and let requests in flight finish: ensembles first (their later
        steps still need the composing models), then every other model."""
        deadline = time.monotonic() + timeout_s
        versions = [mv for mv in self.registry.versions() if mv.scheduler]
        waves: list[list[ModelVersion]] = []
        ensembles = [mv for mv in versions if ensemble.is_ensemble(mv.config)]
        while ensembles:  # outer ensembles before the nested ones they call
            names = {mv.name for mv in ensembles}
            wave = [mv for mv in ensembles if not names & set(self.registry.ensembles_using(mv.name))] or ensembles
            waves.append(wave)
            ensembles = [mv for mv in ensembles if mv not in wave]
        waves.append([mv for mv in versions if not ensemble.is_ensemble(mv.config)])
        for wave in waves:
            left = max(0.0, deadline - time.monotonic())
            await asyncio.gather(*(mv.scheduler.drain(left) for mv in wave if mv.scheduler is not None))

    async def stop(self, timeout_s: float = 10.0) -> None:
        versions = self.registry.versions()
        for mv in versions:
            if mv.state is ModelState.READY:
                mv.state = ModelState.UNLOADING
        await asyncio.gather(*(w.stop(timeout_s) for w in self.registry.workers()), return_exceptions=True)
        for mv in versions:
            mv.state = ModelState.UNAVAILABLE
            mv.reason = "unloaded"


def _failed(mv: ModelVersion, exc: BaseException) -> None:
    mv.state = ModelState.UNAVAILABLE
    mv.reason = exc.message if isinstance(exc, ServingError) else str(exc) or repr(exc)
    mv.error_code = exc.code if isinstance(exc, ServingError) else ErrorCode.INTERNAL
    log.error("model '%s' version %d failed to load: %s", mv.name, mv.version, mv.reason)
    events.RECENT.add(events.LOAD_FAILED, mv.name, mv.reason, version=mv.version)
