"""The tensors the sequence batcher adds to a sequence's requests: its control inputs (START,
END, READY, CORRID), the initial value of an implicit state, the zeros of a null request, and
the request parameters that name the sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2 as mc
from shoal.server.types import InferRequest, InputTensor

_KIND = mc.ModelSequenceBatching.Control


def sequence_params(request: InferRequest, model: str) -> tuple[int | str, bool, bool]:
    """``(sequence_id, start, end)`` of a request to a sequence model."""
    params = request.parameters
    corrid = params.get("sequence_id", 0)
    if isinstance(corrid, bool) or not isinstance(corrid, int | str) or (isinstance(corrid, int) and corrid < 0):
        raise InvalidInput("request parameter 'sequence_id' must be an unsigned integer or a string")
    if corrid in (0, ""):
        raise T.SEQUENCE_NO_CORRELATION_ID(model=model)
    flags = []
    for key in ("sequence_start", "sequence_end"):
        value = params.get(key, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"request parameter '{key}' must be a boolean")
        flags.append(value)
    return corrid, flags[0], flags[1]


class Controls:
    """The ``sequence_batching.control_input`` of a model."""

    def __init__(self, config: mc.ModelConfig) -> None:
        sb = config.sequence_batching
        self.name = config.name
        self.batching = config.max_batch_size > 0
        self.pairs = [(c.name, ctl) for c in sb.control_input for ctl in c.control]
        self.names = {name for name, _ in self.pairs}

    def tensors(
        self, corrid: int | str, start: bool, end: bool, ready: bool = True, request_id: str = ""
    ) -> list[InputTensor]:
        """The control inputs of one request (a null request: ``ready`` false, CORRID 0 or empty)."""
        out = []
        shape = (1, 1) if self.batching else (1,)
        for name, ctl in self.pairs:
            if ctl.kind == _KIND.CONTROL_SEQUENCE_CORRID:
                dt = dtypes.BY_CONFIG_NUMBER[ctl.data_type]
                if dt.protocol == "BYTES":
                    text = str(corrid).encode() if ready else b""
                    data = dtypes.serialize_bytes(np.array([text], dtype=np.object_))
                else:
                    if isinstance(corrid, str):
                        raise T.SEQUENCE_ID_DATATYPE(
                            request_id, name=name, got="BYTES", model=self.name, expected=dt.protocol
                        )
                    assert dt.numpy is not None
                    data = np.array([corrid], dtype=np.uint64).astype(dt.numpy).tobytes()
                out.append(InputTensor(name, dt.protocol, shape, data))
                continue
            value = {
                _KIND.CONTROL_SEQUENCE_START: start,
                _KIND.CONTROL_SEQUENCE_END: end,
                _KIND.CONTROL_SEQUENCE_READY: ready,
            }.get(ctl.kind, False)
            out.append(_flag_tensor(name, ctl, value, shape))
        return out


def zeros_like(t: InputTensor) -> InputTensor:
    """Zeros with ``t``'s name, datatype and shape (BYTES: empty strings)."""
    if t.datatype == "BYTES":
        count = dtypes.element_count(t.shape)
        data = dtypes.serialize_bytes(np.array([b""] * count, dtype=np.object_))
    else:
        data = bytes(t.nbytes)
    return InputTensor(t.name, t.datatype, t.shape, data)


def _flag_tensor(name: str, ctl: Any, value: bool, shape: tuple[int, ...]) -> InputTensor:
    if len(ctl.int32_false_true) == 2:
        return InputTensor(name, "INT32", shape, np.array([ctl.int32_false_true[int(value)]], np.int32).tobytes())
    if len(ctl.fp32_false_true) == 2:
        return InputTensor(name, "FP32", shape, np.array([ctl.fp32_false_true[int(value)]], np.float32).tobytes())
    if len(ctl.bool_false_true) == 2:
        return InputTensor(name, "BOOL", shape, np.array([ctl.bool_false_true[int(value)]], np.bool_).tobytes())
    raise InvalidInput(f"control input '{name}' has no false/true values")


def initial_state(state: Any, batching: bool, model_dir: Path | None) -> InputTensor:
    """The state input of a sequence's first request: ``initial_state`` (zeros or a data
    file under <model>/initial_state/), else zeros of ``dims`` (a variable dim as 0)."""
    dt = dtypes.BY_CONFIG_NUMBER[state.data_type]
    init = state.initial_state[0] if len(state.initial_state) else None
    dims = tuple(int(d) for d in (init.dims if init is not None and len(init.dims) else state.dims))
    dims = tuple(max(d, 0) for d in dims)
    shape = ((1,) if batching else ()) + dims
    count = dtypes.element_count(shape)
    if init is not None and init.WhichOneof("state_data") == "data_file":
        if model_dir is None:
            raise InvalidInput(f"state '{state.input_name}': no model directory for its initial data file")
        root = (model_dir / "initial_state").resolve()
        path = (root / init.data_file).resolve()
        if root not in path.parents:
            raise InvalidInput(f"state '{state.input_name}': initial data file is outside initial_state/")
        data = path.read_bytes()
    elif dt.protocol == "BYTES":
        data = dtypes.serialize_bytes(np.array([b""] * count, dtype=np.object_))
    else:
        data = bytes(count * dt.itemsize)
    return InputTensor(state.input_name, dt.protocol, shape, data)
