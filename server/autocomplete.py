"""Auto-complete (Triton's default since 22.07; off with ``--strict-model-config=true`` or
``--disable-auto-complete-config``): a configuration that lacks inputs or outputs, or a
Python model with an ``auto_complete_config`` hook, is completed by the model's backend in
a short-lived ``python -m shoal.workers.autocomplete`` process (the router imports no ML
runtime). The completed configuration then goes through the usual normalization."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.server.optionvalues import backend_settings
from shoal.server.repository import available_versions, backend_of, config_file, parse_config


def needs_completion(config: mc.ModelConfig, version_dir: Path) -> bool:
    if not config.input or not config.output:
        return config.backend in ("onnxruntime", "python")
    if config.backend == "python":
        model = version_dir / (config.default_model_filename or "model.py")
        try:
            return "auto_complete_config" in model.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    return False


async def complete(
    repository: Path,
    name: str,
    override: mc.ModelConfig | None,
    timeout_s: float,
    python: str = "",
    backend_config: tuple[tuple[str, str, str], ...] = (),
) -> mc.ModelConfig | None:
    """The completed configuration of ``name`` (``override`` or its config.pbtxt), or
    ``override`` unchanged when nothing needs completing or the config is unreadable (the
    normal load then reports that). Raises ``InvalidInput`` when the backend fails."""
    path = repository / name
    try:
        config = mc.ModelConfig()
        if override is not None:
            config.CopyFrom(override)
        elif config_file(path).is_file():
            config.CopyFrom(parse_config(path, name))
        # else: no config.pbtxt at all; the backend completes an empty one (as Triton)
        versions = available_versions(path)
        config.name = config.name or name
        config.backend = backend_of(config, name, path, versions)
    except ServingError:
        return override
    if not versions or not needs_completion(config, path / str(versions[-1])):
        return override if override is not None or config_file(path).is_file() else config
    load = wpb.Load(
        model_config=config.SerializeToString(),
        repository=str(repository),
        model_name=name,
        model_version=versions[-1],
        backend_config=backend_settings(backend_config, config.backend),
    )
    env = dict(os.environ)
    try:
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable, "-P", "-m", "shoal.workers.autocomplete",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
    except OSError as exc:
        raise ServingError(
            f"model '{name}': cannot start the auto-complete process: {exc.strerror or exc}",
            code=ErrorCode.UNAVAILABLE,
        ) from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(load.SerializeToString()), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InvalidInput(f"model '{name}': auto-complete did not finish within {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise InvalidInput(f"model '{name}': auto-complete failed: {lines[-1] if lines else proc.returncode}")
    return mc.ModelConfig.FromString(out)
