"""Model tensors that the sequence batcher fills or keeps, not listed in a configuration's
``input`` and ``output``: control inputs (START, END, READY, CORRID) and implicit state.
Backends that check the configuration against the model accept these too."""

from __future__ import annotations

from shoal.proto import dtypes
from shoal.proto.gen import model_config_pb2 as mc

_CONTROL = mc.ModelSequenceBatching.Control


def sequence_inputs(config: mc.ModelConfig) -> dict[str, str]:
    """Model inputs that are not in ``config.input`` because the sequence batcher fills them:
    ``sequence_batching.control_input`` (START, END, READY, CORRID) and the state inputs,
    each with the protocol datatype of the tensor the batcher sends (a flag: the type of its
    ``*_false_true`` values; CORRID: its ``data_type``)."""
    sb = config.sequence_batching
    out: dict[str, str] = {}
    for c in sb.control_input:
        for ctl in c.control:
            if ctl.kind == _CONTROL.CONTROL_SEQUENCE_CORRID:
                out[c.name] = _protocol(ctl.data_type)
            elif len(ctl.int32_false_true):
                out[c.name] = "INT32"
            elif len(ctl.fp32_false_true):
                out[c.name] = "FP32"
            elif len(ctl.bool_false_true):
                out[c.name] = "BOOL"
    for state in sb.state:
        out[state.input_name] = _protocol(state.data_type)
    return out


def state_outputs(config: mc.ModelConfig) -> dict[str, str]:
    """Model outputs that are not in ``config.output``: the state outputs of
    ``sequence_batching.state`` (the batcher feeds them back), with their datatypes."""
    return {s.output_name: _protocol(s.data_type) for s in config.sequence_batching.state}


def _protocol(data_type: int) -> str:
    dt = dtypes.BY_CONFIG_NUMBER.get(data_type)
    return dt.protocol if dt is not None else "INVALID"
