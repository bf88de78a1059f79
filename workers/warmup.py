"""Model warmup (``model_warmup`` in the configuration), as Triton runs it: each instance,
after its backend has loaded and before it reports ready, executes every sample ``count``
times as one batch of ``batch_size`` requests, straight on the backend (no scheduler). Data
is zeros, random bytes, or a file under ``<model>/warmup/``; a STRING input's random data is
empty strings, as Triton's (it uses zeros there). A sample whose requests fail makes the load
fail: "failed to run warmup sample '<name>': <errors>"."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np

from shoal.proto import dtypes
from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput
from shoal.proto.gen import model_config_pb2 as mc
from shoal.workers.backends.base import Backend, WorkRequest, WorkResponse

WARMUP_DIR = "warmup"
DECOUPLED_WAIT_S = 60.0
"""How long a decoupled model's warmup requests may take to send their final response."""


def _tensor(
    name: str, spec: mc.ModelWarmup.Input, batching: bool, model_dir: str, rng: np.random.Generator
) -> np.ndarray:
    dims = list(spec.dims)
    if any(d < 0 for d in dims):
        raise T.WARMUP_VARIABLE_DIMS(name=name)
    dtype = dtypes.BY_CONFIG_NUMBER.get(spec.data_type)
    if dtype is None or dtype.numpy is None:
        raise InvalidInput(f"warmup input '{name}': datatype {mc.DataType.Name(spec.data_type)} is not supported")
    shape = ([1] if batching else []) + dims
    count = dtypes.element_count(shape)
    kind = spec.WhichOneof("input_data_type")
    if kind is None:
        raise T.WARMUP_NO_DATA(name=name)
    if kind == "input_data_file":
        folder = os.path.join(model_dir, WARMUP_DIR)
        path = os.path.normpath(os.path.join(folder, spec.input_data_file))
        if not path.startswith(folder + os.sep):
            raise InvalidInput(f"warmup input '{name}': input_data_file must name a file under {WARMUP_DIR}/")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise InvalidInput(
                f"warmup input '{name}': cannot read {WARMUP_DIR}/{spec.input_data_file}: {exc.strerror}"
            ) from None
        if dtype.itemsize == 0:
            return dtypes.deserialize_bytes(data, count, name=name).reshape(shape)
        need = count * dtype.itemsize
        if len(data) < need:
            raise T.WARMUP_FILE_SHORT(need=need, file=spec.input_data_file, have=len(data))
        return np.frombuffer(data[:need], dtype=dtype.numpy).reshape(shape).copy()
    if dtype.itemsize == 0:
        return np.full(shape, b"", dtype=np.object_)
    if kind == "zero_data":
        return np.zeros(shape, dtype=dtype.numpy)
    return np.frombuffer(rng.bytes(count * dtype.itemsize), dtype=dtype.numpy).reshape(shape).copy()


def run(backend: Backend, config: mc.ModelConfig, model_dir: str, log: Callable[[str], None]) -> None:
    """Run every warmup sample of ``config`` on ``backend``; raises ``ServingError``."""
    batching = config.max_batch_size > 0
    decoupled = config.model_transaction_policy.decoupled
    rng = np.random.default_rng()
    for sample in config.model_warmup:
        if sample.batch_size == 0:
            continue  # Triton skips these too
        inputs = {name: _tensor(name, spec, batching, model_dir, rng) for name, spec in sample.inputs.items()}
        for iteration in range(1, max(1, sample.count) + 1):
            log(f"running warmup sample '{sample.name}' (iteration {iteration})")
            errors = _execute(backend, inputs, sample.batch_size, decoupled)
            if errors:
                raise T.WARMUP_SAMPLE_FAILED(name=sample.name, errors="; ".join(errors) + "; ")


def _execute(backend: Backend, inputs: dict[str, np.ndarray], batch: int, decoupled: bool) -> list[str]:
    errors: list[str] = []
    pending = threading.Semaphore(0)

    def send(resp: WorkResponse | None, final: bool) -> None:
        if resp is not None and resp.error is not None:
            errors.append(resp.error.message)
        if final:
            pending.release()

    work = []
    for i in range(batch):
        wr = WorkRequest(id=i, inputs=dict(inputs), requested_outputs=[])
        if decoupled:
            wr.send = send
        work.append(wr)
    try:
        responses = backend.execute(work)
    except Exception as exc:  # noqa: BLE001 - reported as the sample's error
        return [str(getattr(exc, "message", None) or exc)]
    if decoupled:
        for _ in work:
            if not pending.acquire(timeout=DECOUPLED_WAIT_S):
                errors.append(f"no final response within {DECOUPLED_WAIT_S:.0f} s")
                break
        return errors
    errors += [r.error.message for r in responses if r.error is not None]
    if len(responses) != len(work):
        errors.append(f"backend returned {len(responses)} responses where {len(work)} were expected")
    return errors
