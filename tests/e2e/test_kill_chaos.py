"""Workers SIGKILLed at random under mixed traffic: requests straight to two models and through
a BLS model (over lanes, with frontend processes), and decoupled streams. Every request is
answered right or fails with one of the errors a dead or restarting worker causes; every
model serves again afterwards; the server stops cleanly with nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository, wait_until
from tests.e2e.traffic import client_for, identity_call, run_for, worker_alive

MODELS = ("identity_fp32", "slow")
ALL = (*MODELS, "bls_relay", "repeat")
EXPECTED = re.compile(
    r"Request for unknown model: '[a-z_0-9]+' has no available versions"
    r"|model '[a-z_0-9]+' version \d+ instance '[a-z_0-9]+' \(pid \d+\) died"
    r"( while executing the request|: killed by signal SIGKILL)"
    r"|the model instance is not connected \(it is restarting\)"
)
"""What a request may be told while the instances it needs die and restart."""


def _collector(got: list[str], done: threading.Event) -> Any:
    """A stream callback: "" per response, the text of an error, ``done`` at the end."""

    def cb(result: Any, error: Any) -> None:
        if error is not None:
            got.append(str(error))
            done.set()
        elif result.get_response().parameters["triton_final_response"].bool_param:
            done.set()
        else:
            got.append("")

    return cb


@pytest.mark.parametrize("frontends", [0, 2])
def test_workers_killed_at_random_under_traffic(
    tmp_path: Path, fresh_server: list[ServerProcess], frontends: int
) -> None:
    repo = make_repository(tmp_path / "repo", *ALL)
    srv = ServerProcess(repo, "--frontend-processes", str(frontends)).start()
    fresh_server.append(srv)
    stop = threading.Event()
    unexpected: list[str] = []
    answered = [0, 0]  # requests, streams

    def killer() -> None:
        rng = np.random.default_rng(7)
        while not stop.wait(0.25 + 0.3 * rng.random()):
            pids = [p for m in ALL for p in srv.worker_pids(m) if worker_alive(p, srv.pid)]
            if pids:
                os.kill(int(rng.choice(pids)), signal.SIGKILL)

    def traffic(k: int) -> None:
        rng = np.random.default_rng(100 + k)
        c = client_for(srv, k)
        try:
            while not stop.is_set():
                name = MODELS[rng.integers(2)]
                params = {"delay_ms": 20} if name == "slow" else None
                try:
                    identity_call(c, name, np.arange(4, dtype=np.float32) + k, rng.random() < 0.4, params)
                    answered[0] += 1
                except InferenceServerException as exc:
                    if not EXPECTED.search(str(exc)):
                        unexpected.append(str(exc))
                    time.sleep(0.01)
        finally:
            c.close()

    def streams() -> None:
        c = grpcclient.InferenceServerClient(srv.grpc_url)
        try:
            while not stop.is_set():
                got: list[str] = []
                done = threading.Event()
                c.start_stream(callback=_collector(got, done))
                inp = grpcclient.InferInput("IN", [20], "INT32")
                inp.set_data_from_numpy(np.arange(20, dtype=np.int32))
                c.async_stream_infer("repeat", [inp], enable_empty_final_response=True)
                if not done.wait(30):
                    unexpected.append("a stream got no final response nor an error in 30 s")
                c.stop_stream()
                errors = [e for e in got if e]
                if not errors:
                    assert len(got) == 20
                    answered[1] += 1
                elif not EXPECTED.search(errors[0]):
                    unexpected.append(errors[0])
                    time.sleep(0.01)
        finally:
            c.close()

    threads = [threading.Thread(target=killer), threading.Thread(target=streams)]
    threads += [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
    run_for(5, stop, threads)
    assert not unexpected, unexpected[:5]
    assert answered[0] > 0 and answered[1] > 0, answered
    h = httpclient.InferenceServerClient(srv.url)
    try:
        # restarts back off up to 10 s after repeated deaths
        wait_until(lambda: all(h.is_model_ready(m) for m in ALL), timeout_s=40)
        for name in MODELS:
            inp = httpclient.InferInput("INPUT0", [4], "FP32")
            inp.set_data_from_numpy(np.ones(4, np.float32))
            np.testing.assert_array_equal(h.infer(name, [inp]).as_numpy("OUTPUT0"), np.ones(4, np.float32))
    finally:
        h.close()
    assert srv.terminate() == 0, srv.log
    assert not srv.segments(), srv.segments()
    assert not [p for m in ALL for p in srv.worker_pids(m) if worker_alive(p)]
    assert "Traceback" not in srv.log, srv.log
