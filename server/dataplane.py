"""``DataPlane``: the one API the frontends call. Transport-neutral: it takes and returns
``server.types`` values and plain dicts, and raises ``ServingError``."""

from __future__ import annotations

from typing import Any

import orjson

from proto import dtypes
from proto.config_json import config_from_json, config_to_json
from proto.errors import ErrorCode, InvalidInput, ServingError, Unsupported
from proto.gen import model_config_pb2 as mc
from server.classification import classify
from server.logsettings import LogSettings
from server.models import ModelManager, ModelVersion, TensorSpec
from server.sharedmem import SharedMemoryRegistry
from server.types import InferRequest, InferResult

SERVER_NAME = "shoal"
EXTENSIONS = [
    "model_configuration",
    "binary_tensor_data",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
    "system_shared_memory",
    "cuda_shared_memory",
    "logging",
]


class DataPlane:
    def __init__(
        self,
        models: ModelManager,
        *,
        version: str,
        strict_readiness: bool = True,
        logs: LogSettings | None = None,
        shm: SharedMemoryRegistry | None = None,
    ) -> None:
        self.models = models
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.logs = logs or LogSettings()
        self.version = version
        self.strict_readiness = strict_readiness
        self.accepting = True
        self.started = False

    # ---- health and metadata ----------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not (self.started and self.accepting):
            return False
        return self.models.all_ready() if self.strict_readiness else True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": self.version, "extensions": list(EXTENSIONS)}

    def model_ready(self, name: str, version: int) -> None:
        """Returns when the version is ready; raises the lookup error otherwise."""
        self.models.get(name, version)

    def model_metadata(self, name: str, version: int) -> dict[str, Any]:
        mv = self.models.get(name, version)
        cfg = mv.config
        if version >= 0:
            versions = [str(version)]
        else:
            versions = [str(v) for v, m in sorted(self.models.models[name].items()) if m.ready]
        batch = [-1] if cfg.max_batch_size > 0 else []
        return {
            "name": name,
            "versions": versions,
            "platform": cfg.platform or cfg.backend,
            "inputs": [
                {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in mv.inputs.values()
            ],
            "outputs": [
                {"name": t.name, "datatype": t.datatype, "shape": batch + list(t.dims)} for t in mv.outputs.values()
            ],
        }

    def model_config(self, name: str, version: int) -> dict[str, Any]:
        return config_to_json(self.models.get(name, version).config)

    def model_config_message(self, name: str, version: int) -> mc.ModelConfig:
        """The normalized configuration; callers must not modify it."""
        return self.models.get(name, version).config

    def raw_input(self, name: str, version: int, nbytes: int) -> tuple[str, str, tuple[int, ...]]:
        """Name, datatype and shape of the one input a raw-body request feeds."""
        mv = self.models.get(name, version)
        if len(mv.inputs) != 1:
            raise InvalidInput(f"raw binary request body needs a model with one input; '{name}' has {len(mv.inputs)}")
        spec = next(iter(mv.inputs.values()))
        batch: tuple[int, ...] = (1,) if mv.config.max_batch_size > 0 else ()
        if spec.datatype == "BYTES":
            if spec.dims not in ((1,), (-1,)):
                raise InvalidInput(f"raw binary request body for BYTES input '{spec.name}' needs shape [1]")
            return spec.name, "BYTES", batch + (1,)
        variable = [i for i, d in enumerate(spec.dims) if d == -1]
        if len(variable) > 1:
            raise InvalidInput(f"raw binary request body: input '{spec.name}' has more than one variable dimension")
        itemsize = dtypes.BY_PROTOCOL[spec.datatype].itemsize
        fixed = dtypes.element_count([d for d in spec.dims if d != -1]) * itemsize
        dims = list(spec.dims)
        if variable:
            if fixed == 0 or nbytes % fixed:
                raise InvalidInput(f"raw binary request body of {nbytes} bytes does not fit input '{spec.name}'")
            dims[variable[0]] = nbytes // fixed
        return spec.name, spec.datatype, batch + tuple(dims)

    # ---- model repository extension -------------------------------------------------------------

    def _check_control(self) -> None:
        if self.models.mode != "explicit":
            raise ServingError(
                "explicit model load / unload is not allowed: start the server with --model-control-mode=explicit",
                code=ErrorCode.UNAVAILABLE,
            )

    def repository_index(self, ready_only: bool = False) -> list[dict[str, str]]:
        return self.models.index(ready_only)

    async def load_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Load or reload ``name``; ``parameters["config"]``: JSON text of a configuration
        to use instead of config.pbtxt. Files sent with the request are refused."""
        self._check_control()
        override: mc.ModelConfig | None = None
        for key, value in parameters.items():
            if key == "config":
                if not isinstance(value, str):
                    raise InvalidInput("load parameter 'config' must be a string of JSON")
                try:
                    obj = orjson.loads(value)
                except orjson.JSONDecodeError as exc:
                    raise InvalidInput(f"load parameter 'config' is not valid JSON: {exc}") from None
                override = config_from_json(obj)
            elif key.startswith("file:"):
                raise Unsupported(
                    "model files sent with a load request are not accepted; put them in the model repository"
                )
            else:
                raise InvalidInput(f"unknown load parameter '{key[:64]}'")
        if self.models.refresh is not None:
            await self.models.refresh()
        await self.models.load(name, override)

    async def unload_model(self, name: str, parameters: dict[str, Any]) -> None:
        """Unload ``name``. ``unload_dependents`` is accepted (no model depends on another
        until ensembles exist)."""
        self._check_control()
        for key, value in parameters.items():
            if key != "unload_dependents":
                raise InvalidInput(f"unknown unload parameter '{key[:64]}'")
            if not isinstance(value, bool):
                raise InvalidInput("unload parameter 'unload_dependents' must be a boolean")
        await self.models.unload(name)

    # ---- statistics ---------------------------------------------------------------------------

    def statistics(self, name: str, version: int) -> list[dict[str, Any]]:
        """Statistics of every READY version (of one model, or of one version)."""
        if not name:
            versions = [mv for vs in self.models.models.values() for mv in vs.values() if mv.ready]
        elif version >= 0:
            try:
                versions = [self.models.get(name, version)]
            except ServingError:
                raise InvalidInput(f"requested model '{name}' is not available") from None
        else:
            versions = [mv for mv in self.models.models.get(name, {}).values() if mv.ready]
            if not versions:
                raise InvalidInput(f"requested model '{name}' is not available")
        return [mv.stats.as_dict() for mv in sorted(versions, key=lambda m: (m.name, m.version))]

    # ---- inference ----------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResult:
        if not self.accepting:
            raise ServingError("the server is shutting down", code=ErrorCode.UNAVAILABLE, retryable=True)
        mv = self.models.get(request.model_name, request.model_version)
        request.model_version = mv.version
        uses_shm = any(t.shm is not None for t in request.inputs) or any(
            o.shm is not None for o in request.outputs or ()
        )
        if uses_shm:
            # The regions stay counted until this request is done here; the dispatcher counts
            # its own use separately, until the worker has answered (even if this caller is
            # cancelled).
            self.shm.bind(request)
        try:
            validate(mv, request)
            assert mv.scheduler is not None
            result = await mv.scheduler.submit(request)
        finally:
            if uses_shm:
                self.shm.unbind(request)
        if request.outputs is not None:
            try:
                classify(request, result, mv.labels, mv.config.max_batch_size > 0)
            except BaseException:
                result.done()
                raise
        return result


def validate(mv: ModelVersion, request: InferRequest) -> None:
    """Check names, datatypes, shapes and byte sizes against the configuration; errors name
    the tensor. Applies ``reshape`` so workers see the shapes the model expects."""
    name = mv.name
    max_batch = mv.config.max_batch_size
    batch_size: int | None = None
    seen: set[str] = set()
    for t in request.inputs:
        spec = mv.inputs.get(t.name)
        if spec is None:
            raise InvalidInput(f"unexpected inference input '{t.name}' for model '{name}'")
        if t.name in seen:
            raise InvalidInput(f"input '{t.name}' appears more than once in the request for model '{name}'")
        seen.add(t.name)
        if t.datatype != spec.datatype:
            raise InvalidInput(
                f"inference input '{t.name}' data-type is '{t.datatype}', but model '{name}' expects '{spec.datatype}'"
            )
        shape = t.shape
        if any(d < 0 for d in shape):
            raise InvalidInput(f"inference input '{t.name}' has a negative dimension in shape {list(shape)}")
        dims = shape
        if max_batch > 0:
            if not shape:
                raise InvalidInput(f"inference input '{t.name}' of batching model '{name}' needs a batch dimension")
            if batch_size is None:
                batch_size = shape[0]
            elif shape[0] != batch_size:
                raise InvalidInput(
                    f"inference input '{t.name}' batch size {shape[0]} differs from other inputs ({batch_size})"
                )
            if shape[0] > max_batch:
                raise InvalidInput(
                    f"inference request batch-size must be <= {max_batch} for '{name}', "
                    f"got {shape[0]} for input '{t.name}'"
                )
            dims = shape[1:]
        if not _dims_match(dims, spec.dims):
            expect = ([-1] if max_batch > 0 else []) + list(spec.dims)
            raise InvalidInput(
                f"unexpected shape for input '{t.name}' for model '{name}'. Expected {expect}, got {list(shape)}"
            )
        if spec.datatype != "BYTES":
            expected = dtypes.element_count(shape) * dtypes.BY_PROTOCOL[spec.datatype].itemsize
            if t.nbytes != expected:
                raise InvalidInput(
                    f"input byte size mismatch for input '{t.name}' for model '{name}'. "
                    f"Expected {expected}, got {t.nbytes}"
                )
        if spec.reshape is not None:
            t.shape = ((shape[0],) if max_batch > 0 else ()) + _reshape(spec, dims)
    if batch_size is not None:
        request.batch_size = batch_size
    if len(seen) < mv.required_inputs or any(n not in seen for n, s in mv.inputs.items() if not s.optional):
        missing = [n for n, s in mv.inputs.items() if not s.optional and n not in seen]
        raise InvalidInput(
            f"expected {mv.required_inputs} inputs but got {len(seen)} inputs for model '{name}'. "
            f"Missing: {', '.join(repr(m) for m in missing)}"
        )
    if request.outputs is not None:
        for o in request.outputs:
            if o.name not in mv.outputs:
                raise InvalidInput(f"unexpected inference output '{o.name}' for model '{name}'")


def _dims_match(dims: tuple[int, ...], expect: tuple[int, ...]) -> bool:
    if len(dims) != len(expect):
        return False
    return all(e == -1 or d == e for d, e in zip(dims, expect, strict=True))


def _reshape(spec: TensorSpec, dims: tuple[int, ...]) -> tuple[int, ...]:
    target = spec.reshape or ()
    if -1 not in target:
        return target
    known = 1
    for d in target:
        if d != -1:
            known *= d
    total = dtypes.element_count(dims)
    return tuple(total // known if known and d == -1 else d for d in target)
