"""``ModelConfig`` <-> the JSON that Triton serves at ``/v2/models/{m}/config``.

Triton (``core: src/model_config_utils.cc``, ``ModelConfigToJson``) prints the config as
protobuf JSON with the proto field names and every no-presence field (so ``"platform": ""``
and ``"optional": false`` appear), enums as names, and then turns a fixed list of 64-bit
fields back into JSON numbers; protobuf itself prints 64-bit integers as strings. The
other 64-bit fields (CUDA graph spec dims, secondary device ids, map keys) stay strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format

from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2

__all__ = ["config_from_json", "config_to_json"]

# Triton's ModelConfigToJson looks for ``initial_state`` on ``sequence_batching`` instead
# of on each ``state`` entry, so ``state[].initial_state[].dims`` stay strings there. We
# print what Triton prints; set this to True to convert them as well.
_FIX_INITIAL_STATE_DIMS = False


def _fix_int(obj: dict[str, Any], key: str) -> None:
    if key in obj:
        obj[key] = int(obj[key])


def _fix_int_list(obj: dict[str, Any], key: str) -> None:
    if key in obj:
        obj[key] = [int(v) for v in obj[key]]


def _fix_int64_fields(cfg: dict[str, Any]) -> None:
    for name in ("input", "output"):
        for io in cfg.get(name, []):
            _fix_int_list(io, "dims")
            if "reshape" in io:
                _fix_int_list(io["reshape"], "shape")

    specific = cfg.get("version_policy", {}).get("specific")
    if specific is not None:
        _fix_int_list(specific, "versions")

    db = cfg.get("dynamic_batching")
    if db is not None:
        for key in ("max_queue_delay_microseconds", "priority_levels", "default_priority_level"):
            _fix_int(db, key)
        if "default_queue_policy" in db:
            _fix_int(db["default_queue_policy"], "default_timeout_microseconds")
        # Map keys stay strings: JSON object keys can only be strings.
        for policy in db.get("priority_queue_policy", {}).values():
            _fix_int(policy, "default_timeout_microseconds")

    sb = cfg.get("sequence_batching")
    if sb is not None:
        _fix_int(sb, "max_sequence_idle_microseconds")
        for strategy in ("oldest", "direct"):
            if strategy in sb:
                _fix_int(sb[strategy], "max_queue_delay_microseconds")
        for state in sb.get("state", []):
            _fix_int_list(state, "dims")
            if _FIX_INITIAL_STATE_DIMS:
                for initial in state.get("initial_state", []):
                    _fix_int_list(initial, "dims")

    ens = cfg.get("ensemble_scheduling")
    if ens is not None:
        for step in ens.get("step", []):
            _fix_int(step, "model_version")

    for warmup in cfg.get("model_warmup", []):
        for warmup_input in warmup.get("inputs", {}).values():
            _fix_int_list(warmup_input, "dims")


def config_to_json(config: model_config_pb2.ModelConfig) -> dict[str, object]:
    """Return ``config`` as the JSON object Triton returns for ``GET .../config``.

    An all-default config gives ``{}``: Triton answers such a config with an empty body,
    which the HTTP frontend should send in that case.
    """
    if config.ByteSize() == 0:
        return {}
    cfg: dict[str, Any] = json_format.MessageToDict(
        config,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        use_integers_for_enums=False,
    )
    _fix_int64_fields(cfg)
    return cfg


def config_from_json(obj: Mapping[str, object]) -> model_config_pb2.ModelConfig:
    """Parse a JSON object (as from ``config_to_json`` or a client) into a ``ModelConfig``.

    64-bit fields may be numbers or strings; enums must be given by name or number.
    Unknown fields are errors. Raises ``InvalidInput`` naming what was wrong.
    """
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"model configuration must be a JSON object, got {type(obj).__name__}")
    config = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(dict(obj), config, ignore_unknown_fields=False)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        # ParseError messages end with a long list of the message's fields: keep line one.
        detail = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise InvalidInput(f"invalid model configuration: {detail}") from exc
    return config
