"""Pieces shared by the tests that run traffic while models or workers come and go."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient


def worker_alive(pid: int, parent: int | None = None) -> bool:
    """Whether ``pid`` is a running worker process (a zombie is not), and when ``parent`` is
    given, that server's child: a pid from the log may belong to another process by now."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()  # after the command name
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    if fields[0] == "Z" or b"shoal.workers" not in cmdline:
        return False
    return parent is None or int(fields[1]) == parent


def client_for(server: Any, k: int) -> Any:
    """An HTTP client for odd ``k``, a gRPC one for even."""
    if k % 2:
        return httpclient.InferenceServerClient(server.url, network_timeout=120)
    return grpcclient.InferenceServerClient(server.grpc_url)


def identity_call(client: Any, name: str, x: np.ndarray, via_bls: bool, params: dict[str, Any] | None = None) -> None:
    """``x`` through model ``name`` (INPUT0 -> OUTPUT0), directly or through ``bls_relay``;
    raises InferenceServerException as the client does, AssertionError on a wrong answer."""
    mod: Any = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inp = mod.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    if via_bls:
        target = mod.InferInput("MODEL_NAME", [1], "BYTES")
        target.set_data_from_numpy(np.array([name.encode()], dtype=object))
        result = client.infer("bls_relay", [inp, target], parameters=params or None)
    else:
        result = client.infer(name, [inp], parameters=params or None)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def run_for(seconds: float, stop: threading.Event, threads: list[threading.Thread]) -> None:
    """Start ``threads``, let them run ``seconds``, set ``stop`` and wait for every one."""
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(120)
        assert not t.is_alive(), "a client hung"
