"""``Registry``: what the server knows of each model (its repository source and versions)
and the lookups every request makes. Lookups raise Triton's errors (``proto.errortexts``: unknown
model INVALID_ARGUMENT; unknown version or none available NOT_FOUND; a named version not
ready UNAVAILABLE). Owned by the router's
event loop; ``ModelManager`` is the only writer."""

from __future__ import annotations

from shoal.proto import errortexts as T
from shoal.proto.errors import ServingError
from shoal.server import ensemble
from shoal.server.dispatch.worker import Worker
from shoal.server.models.version import ModelState, ModelVersion
from shoal.server.repository import ModelSource


class Registry:
    def __init__(self) -> None:
        self.sources: dict[str, ModelSource] = {}
        """Each model's last read of its repository directory (config, versions, error)."""
        self.models: dict[str, dict[int, ModelVersion]] = {}
        """The versions chosen to serve, by model."""
        self.wanted: set[str] = set()
        """Models that should be loaded: strict readiness looks at these."""
        self.fingerprints: dict[str, tuple[object, ...]] = {}

    # ---- lookups -------------------------------------------------------------------------

    def get(self, name: str, version: int = -1) -> ModelVersion:
        """The version to serve; raises Triton's errors for unknown / unready models."""
        versions = self.models.get(name)
        if versions is None:
            raise T.UNKNOWN_MODEL(model=name)
        if version < 0:
            if len(versions) == 1:  # the common case: one version, no list to build
                for only in versions.values():
                    if only.ready:
                        return only
            ready = [mv for mv in versions.values() if mv.ready]
            if not ready:
                raise T.NO_AVAILABLE_VERSIONS(model=name)
            return max(ready, key=lambda mv: mv.version)
        mv = versions.get(version)
        if mv is None:
            raise T.UNKNOWN_VERSION(model=name, version=version)
        if not mv.ready:
            raise T.VERSION_NOT_READY(model=name, version=version)
        return mv

    def ready_versions(self, name: str | None = None) -> list[ModelVersion]:
        """The READY versions of ``name`` (every model's when ``None``), by name and version."""
        groups = [self.models.get(name, {})] if name is not None else list(self.models.values())
        return sorted((mv for vs in groups for mv in vs.values() if mv.ready), key=lambda m: (m.name, m.version))

    def versions(self) -> list[ModelVersion]:
        """Every version chosen to serve, in any state."""
        return [mv for vs in self.models.values() for mv in vs.values()]

    def all_ready(self) -> bool:
        """Every model that should be loaded has every chosen version ready (strict
        readiness); in explicit mode only the models loaded on request count."""
        for name in self.wanted:
            src = self.sources.get(name)
            versions = self.models.get(name)
            if src is None or src.error or not versions:
                return False
            if not all(mv.ready for mv in versions.values()):
                return False
        return True

    def steps_unavailable(self, plan: ensemble.EnsemblePlan) -> str:
        """Why an ensemble cannot serve now ("" when every composing model can)."""
        for step in plan.steps:
            try:
                self.get(step.model, step.version)
            except ServingError:
                return f"composing model '{step.model}' is not available"
        return ""

    # ---- ensembles -----------------------------------------------------------------------

    def composing_of(self, name: str) -> list[str]:
        return sorted(
            {sub for mv in self.models.get(name, {}).values() for sub in ensemble.composing_models(mv.config)}
        )

    def ensembles_using(self, name: str) -> list[str]:
        """Loaded ensembles with a step on ``name``."""
        return sorted(
            other
            for other, versions in self.models.items()
            if any(
                mv.state is ModelState.READY and name in ensemble.composing_models(mv.config)
                for mv in versions.values()
            )
        )

    # ---- workers -------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        return [w for mv in self.versions() if mv.pool for w in mv.pool.workers]

    def instances(self) -> list[dict[str, object]]:
        """Every worker process (the admin API's list)."""
        out: list[dict[str, object]] = []
        for name, versions in sorted(self.models.items()):
            for v, mv in sorted(versions.items()):
                for w in mv.pool.workers if mv.pool is not None else ():
                    load = w.spec.load
                    out.append(
                        {
                            "model": name,
                            "version": str(v),
                            "instance": w.spec.instance_name,
                            "state": w.state.value,
                            "pid": w.pid,
                            "restarts": w.restarts,
                            "outstanding": w.outstanding + w.lane_requests,
                            "device": f"GPU {load.device_index}" if load.device_kind == "GPU" else load.device_kind,
                            "reason": w.reason,
                        }
                    )
        return out

    def summary(self) -> str:
        """One line for the log: every model and the state of each version."""
        parts = []
        for name in sorted(self.sources):
            if self.sources[name].error:
                parts.append(f"{name}: UNAVAILABLE")
                continue
            for v, mv in sorted(self.models.get(name, {}).items()):
                parts.append(f"{name}/{v}: {mv.state.value}")
        return ", ".join(parts) or "no models"
