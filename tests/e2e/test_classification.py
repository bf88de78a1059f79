"""The classification extension and label files through the real server (HTTP JSON,
HTTP binary, gRPC), and its bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository

X = np.array([[0.1, 0.7, 0.05, 0.15], [4.0, 1.0, 3.0, 2.0]], dtype=np.float32)


@pytest.fixture(scope="module")
def cserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = make_repository(tmp_path_factory.mktemp("repo"), "classifier")
    srv = ServerProcess(repo).start()
    yield srv
    assert srv.terminate() == 0, srv.log


def _as_text(arr: Any) -> list[list[str]]:
    return [[v.decode() if isinstance(v, bytes) else v for v in row] for row in arr.tolist()]


@pytest.mark.parametrize("proto", ["http-json", "http-binary", "grpc"])
def test_top_k_with_and_without_labels(cserver: ServerProcess, proto: str) -> None:
    if proto == "grpc":
        c: Any = grpcclient.InferenceServerClient(cserver.grpc_url)
        mod: Any = grpcclient
        outs = [mod.InferRequestedOutput("SCORES", class_count=2), mod.InferRequestedOutput("COUNTS", class_count=9)]
    else:
        c, mod = httpclient.InferenceServerClient(cserver.url), httpclient
        binary = proto == "http-binary"
        outs = [
            mod.InferRequestedOutput("SCORES", binary_data=binary, class_count=2),
            mod.InferRequestedOutput("COUNTS", binary_data=binary, class_count=9),
        ]
    try:
        inp = mod.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_data_from_numpy(X)
        r = c.infer("classifier", [inp], outputs=outs)
        scores = r.as_numpy("SCORES")
        assert scores.shape == (2, 2)
        assert _as_text(scores) == [["0.700000:1:dog", "0.150000:3:bird"], ["4.000000:0:cat", "3.000000:2:fish"]]
        counts = r.as_numpy("COUNTS")
        assert counts.shape == (2, 4)  # class_count larger than the output: all of it
        assert _as_text(counts)[1] == ["4:0", "3:2", "2:3", "1:1"]
        out = r.get_output("SCORES")
        assert (out["datatype"] if isinstance(out, dict) else out.datatype) == "BYTES"
    finally:
        c.close()


def test_classification_bad_input(cserver: ServerProcess) -> None:
    c = httpclient.InferenceServerClient(cserver.url)
    try:
        inp = httpclient.InferInput("INPUT0", [1, 4], "FP32")
        inp.set_data_from_numpy(X[:1])
        for bad in (-1, "3", True, 1.5):
            out = httpclient.InferRequestedOutput("SCORES")
            out._parameters["classification"] = bad
            with pytest.raises(InferenceServerException, match="'classification' must be a non-negative integer"):
                c.infer("classifier", [inp], outputs=[out])
        out = httpclient.InferRequestedOutput("SCORES", class_count=2)
        out._parameters["shared_memory_region"] = "r"
        out._parameters["shared_memory_byte_size"] = 16
        with pytest.raises(
            InferenceServerException, match="Output can't set both 'shared_memory_region' and 'classification'"
        ):
            c.infer("classifier", [inp], outputs=[out])
        # class_count 0 (tritonclient's default) is the plain tensor
        r = c.infer("classifier", [inp], outputs=[httpclient.InferRequestedOutput("SCORES", class_count=0)])
        np.testing.assert_array_equal(r.as_numpy("SCORES"), X[:1])
    finally:
        c.close()


def test_missing_label_file_is_a_load_error(tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    repo = make_repository(tmp_path / "repo", "classifier", "identity_fp32")
    (repo / "classifier" / "labels.txt").unlink()
    srv = ServerProcess(repo, "--strict-readiness=false").start()
    fresh_server.append(srv)
    h = httpclient.InferenceServerClient(srv.url)
    try:
        entry = next(e for e in h.get_model_repository_index() if e["name"] == "classifier")
        assert entry["state"] == "UNAVAILABLE" and "cannot read label file of output 'SCORES'" in entry["reason"]
        assert h.is_model_ready("identity_fp32")
    finally:
        h.close()
    assert srv.terminate() == 0


def test_classification_with_an_input_in_shared_memory(cserver: ServerProcess) -> None:
    """An input in client shared memory does not turn classification of an output off."""
    import os

    import tritonclient.utils.shared_memory as shm

    key = f"/shoaltest_{os.getpid()}_cls"
    handle = shm.create_shared_memory_region("cls", key, X.nbytes)
    c = httpclient.InferenceServerClient(cserver.url)
    try:
        shm.set_shared_memory_region(handle, [X])
        c.register_system_shared_memory("cls", key, X.nbytes)
        inp = httpclient.InferInput("INPUT0", [2, 4], "FP32")
        inp.set_shared_memory("cls", X.nbytes)
        r = c.infer("classifier", [inp], outputs=[httpclient.InferRequestedOutput("SCORES", class_count=1)])
        assert _as_text(r.as_numpy("SCORES")) == [["0.700000:1:dog"], ["4.000000:0:cat"]]
    finally:
        c.unregister_system_shared_memory()
        c.close()
        shm.destroy_shared_memory_region(handle)
