"""Triton's repository index (the model-repository extension's ``index``)."""

from __future__ import annotations

from collections.abc import Callable

from shoal.server.dispatch.worker import Worker
from shoal.server.models.registry import Registry
from shoal.server.models.version import ModelState


def repository_index(
    registry: Registry, listing: Callable[[], list[str]], ready_only: bool = False
) -> list[dict[str, str]]:
    """One entry per known version; model directories never loaded (``listing``: the
    repositories' model names) appear with their name only. A version is UNAVAILABLE with
    a reason when it cannot serve now."""
    out: list[dict[str, str]] = []
    names = set(registry.models) | set(registry.sources)
    try:
        names |= set(listing())
    except OSError:
        pass
    for name in sorted(names):
        versions = registry.models.get(name, {})
        src = registry.sources.get(name)
        if not versions:
            if ready_only:
                continue
            entry = {"name": name}
            if src is not None and src.error:
                entry.update(state="UNAVAILABLE", reason=src.error)
            out.append(entry)
            continue
        for v, mv in sorted(versions.items()):
            if ready_only and not mv.ready:
                continue
            entry = {"name": name, "version": str(v), "state": mv.state.value}
            reason = mv.reason
            why = mv.unavailable() if mv.unavailable is not None and mv.state is ModelState.READY else ""
            pool = mv.pool
            if not why and mv.state is ModelState.READY and pool is not None and pool.workers and not pool.ready_count:
                why = _no_instance(pool.workers)
            if why:
                entry["state"], reason = ModelState.UNAVAILABLE.value, why
            if mv.ready and src is not None and src.reload_error:
                reason = f"reload failed, still serving: {src.reload_error}"
            if reason:
                entry["reason"] = reason
            out.append(entry)
    return out


def _no_instance(workers: list[Worker]) -> str:
    """Why a loaded version has no instance serving."""
    why = "; ".join(f"instance '{w.spec.instance_name}': {w.reason}" for w in workers if w.reason)
    return "no instance is running" + (f" ({why})" if why else " (restarting)")
