"""``ModelConfig`` of ``triton_python_backend_utils``: the config a model's static
``auto_complete_config`` reads and fills in (re-exported by that module)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any, Final

_TENSOR_REQUIRED: Final = ("name", "data_type", "dims")
_INPUT_PROPERTIES: Final = frozenset({"name", "data_type", "dims", "optional"})
_OUTPUT_PROPERTIES: Final = frozenset({"name", "data_type", "dims"})
_POLICY_PROPERTIES: Final = frozenset({"decoupled"})


class ModelConfig:
    """A model configuration (Triton's JSON form) that ``auto_complete_config`` may complete.

    Only ``max_batch_size``, inputs, outputs, dynamic batching and the transaction policy can
    be set; every setter raises ``ValueError`` when it contradicts what the config says.
    """

    def __init__(self, model_config: str | Mapping[str, Any]) -> None:
        if isinstance(model_config, str):
            self._config: dict[str, Any] = json.loads(model_config)
        else:
            self._config = copy.deepcopy(dict(model_config))

    def as_dict(self) -> dict[str, Any]:
        """The configuration as a dict (Triton's JSON form)."""
        return self._config

    def _name(self) -> str:
        return str(self._config.get("name", ""))

    def max_batch_size(self) -> int:
        """The configured ``max_batch_size`` (0: the server does not batch)."""
        return int(self._config.get("max_batch_size", 0))

    def set_max_batch_size(self, max_batch_size: int) -> None:
        """Set ``max_batch_size``; ValueError if the config already asks for a larger one."""
        current = self.max_batch_size()
        if current > max_batch_size:
            raise ValueError(
                f"configuration specified max_batch_size {current}, but auto-complete-config "
                f"function for model '{self._name()}' specified max_batch_size {max_batch_size}"
            )
        self._config["max_batch_size"] = int(max_batch_size)

    def set_dynamic_batching(self) -> None:
        """Use the dynamic batcher unless another scheduler is configured (then ValueError)."""
        for other in ("sequence_batching", "ensemble_scheduling"):
            if other in self._config:
                raise ValueError(
                    f"configuration specified scheduling_choice as '{other}', but auto-complete-config "
                    f"function for model '{self._name()}' tries to set scheduling_choice as 'dynamic_batching'"
                )
        self._config.setdefault("dynamic_batching", {})

    def add_input(self, input: Mapping[str, Any]) -> None:  # Triton's name
        """Add an input (``name``, ``data_type``, ``dims``, optional ``optional``) or complete
        the configured input of that name; ValueError on a contradiction."""
        self._add_tensor("input", input, _INPUT_PROPERTIES)

    def add_output(self, output: Mapping[str, Any]) -> None:
        """Add an output (``name``, ``data_type``, ``dims``) or complete the configured output
        of that name; ValueError on a contradiction."""
        self._add_tensor("output", output, _OUTPUT_PROPERTIES)

    def set_model_transaction_policy(self, transaction_policy_dict: Mapping[str, Any]) -> None:
        """Set the transaction policy (``{"decoupled": bool}``); ValueError on a contradiction."""
        for key in transaction_policy_dict:
            if key not in _POLICY_PROPERTIES:
                raise ValueError(
                    f"model transaction property in auto-complete-config function for model "
                    f"'{self._name()}' contains property other than 'decoupled'"
                )
        policy = self._config.setdefault("model_transaction_policy", {})
        if "decoupled" in transaction_policy_dict:
            want = bool(transaction_policy_dict["decoupled"])
            if "decoupled" in policy and bool(policy["decoupled"]) != want:
                raise ValueError(
                    f"trying to change decoupled property in auto-complete-config function for model "
                    f"'{self._name()}', which is already set to {policy['decoupled']}"
                )
            policy["decoupled"] = want

    def _add_tensor(self, key: str, tensor: Mapping[str, Any], allowed: frozenset[str]) -> None:
        model = self._name()
        label = tensor.get("name", "")
        extra = sorted(set(tensor) - allowed)
        if extra:
            raise ValueError(
                f"{key} '{label}' in auto-complete-config function for model '{model}' contains "
                f"properties other than {sorted(allowed)}: {extra}"
            )
        for prop in _TENSOR_REQUIRED:
            if prop not in tensor:
                raise ValueError(
                    f"{key} '{label}' in auto-complete-config function for model '{model}' is missing '{prop}' property"
                )
        new = dict(tensor)
        new["dims"] = [int(d) for d in tensor["dims"]]
        entries: list[dict[str, Any]] = self._config.setdefault(key, [])
        for current in entries:
            if current.get("name") != new["name"]:
                continue
            dtype = current.get("data_type", "TYPE_INVALID")
            if dtype not in ("", "TYPE_INVALID") and dtype != new["data_type"]:
                raise ValueError(
                    f"unable to load model '{model}', configuration expects datatype {dtype} for "
                    f"{key} '{new['name']}', model provides {new['data_type']}"
                )
            dims = [int(d) for d in current.get("dims", [])]
            if dims and dims != new["dims"]:
                raise ValueError(
                    f"model '{model}', tensor '{new['name']}': the model expects dims {new['dims']} "
                    f"but the model configuration specifies dims {dims}"
                )
            current.update(new)
            return
        entries.append(new)
