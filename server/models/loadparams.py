"""The parameters of a model load or unload request (the model repository extension), as
Triton reads them: ``config`` (JSON text of a configuration to use instead of config.pbtxt),
``file:<path>`` (model files: bytes over gRPC and from models, base64 text over HTTP; they
need ``config``), and ``unload_dependents`` (a boolean)."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import orjson

from shoal.proto import errortexts as T
from shoal.proto.config_json import config_from_json
from shoal.proto.errors import InvalidInput, ServingError
from shoal.proto.gen import model_config_pb2 as mc

log = logging.getLogger("shoal.dataplane")


def load_parameters(name: str, parameters: dict[str, Any]) -> tuple[mc.ModelConfig | None, dict[str, bytes]]:
    """The configuration override and the model files of a load of ``name``; raises
    Triton's errors for anything else."""
    override: mc.ModelConfig | None = None
    files: dict[str, bytes] = {}
    for key, value in parameters.items():
        if key == "config":
            if not isinstance(value, str):
                raise T.LOAD_CONFIG_NOT_STRING()
            try:
                override = config_from_json(orjson.loads(value))
            except (orjson.JSONDecodeError, ServingError) as exc:
                detail = exc.message if isinstance(exc, ServingError) else str(exc)
                log.info("load of '%s': invalid config override: %s", name, detail)
                raise T.LOAD_CONFIG_INVALID(model=name, detail=detail) from None
        elif key.startswith("file:"):
            files[key[len("file:") :]] = _file_bytes(key, value)
        else:
            raise T.LOAD_PARAM_UNRECOGNIZED(name=key[:64], type=_param_type(value))
    if files and override is None:
        raise T.LOAD_FILES_NEED_CONFIG()
    return override, files


def unload_parameters(parameters: dict[str, Any]) -> bool:
    """Whether an unload takes the model's dependents with it (``unload_dependents``)."""
    dependents = False
    for key, value in parameters.items():
        if key != "unload_dependents":
            raise InvalidInput(f"unknown unload parameter '{key[:64]}'")
        if not isinstance(value, bool):
            raise InvalidInput("unload parameter 'unload_dependents' must be a boolean")
        dependents = value
    return dependents


def _file_bytes(key: str, value: Any) -> bytes:
    """A ``file:`` load parameter's contents: bytes over gRPC (and from models), base64 text
    over HTTP."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise InvalidInput(f"File parameter '{key[:64]}' must be base64-encoded bytes") from None
    raise T.LOAD_FILE_NOT_BYTES(name=key[:64])


def _param_type(value: Any) -> str:
    """Triton's name of a parameter value's type (``TRITONSERVER_ParameterTypeString``)."""
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT"
    if isinstance(value, float):
        return "DOUBLE"
    if isinstance(value, bytes | bytearray):
        return "BYTES"
    return "STRING"
