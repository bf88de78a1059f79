"""A model repository in S3, served from moto's S3 server on loopback (a real HTTP S3 API):
the server mirrors it, polls it (models added, changed, removed) and loads from it in
explicit mode. GCS goes through the same fsspec code (gcsfs) but has no emulator here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

import tritonclient.http as httpclient  # noqa: E402

from tests.e2e.server import ServerProcess, make_repository, wait_until  # noqa: E402


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
    }.items():
        monkeypatch.setenv(key, value)
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    bucket = f"models-{uuid.uuid4().hex[:12]}"  # moto's state outlives one server object
    fs.mkdir(bucket)
    fs.bucket = bucket
    yield fs
    server.stop()


def _upload(fs: Any, local: Path, name: str) -> None:
    for path in sorted((local / name).rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            fs.pipe(f"{fs.bucket}/repo/{path.relative_to(local).as_posix()}", path.read_bytes())


def test_s3_repository_polled(s3: Any, tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    local = make_repository(tmp_path / "local", "identity_fp32", "add_sub")
    _upload(s3, local, "identity_fp32")
    srv = ServerProcess(f"s3://{s3.bucket}/repo", "--model-control-mode=poll", "--repository-poll-secs=0.3")
    fresh_server.append(srv.start())
    h = httpclient.InferenceServerClient(srv.url)
    try:
        x = httpclient.InferInput("INPUT0", [3], "FP32")
        x.set_data_from_numpy(np.arange(3, dtype=np.float32))
        assert h.infer("identity_fp32", [x]).as_numpy("OUTPUT0").tolist() == [0, 1, 2]
        _upload(s3, local, "add_sub")  # a model added to the bucket
        wait_until(lambda: h.is_model_ready("add_sub"))
        cfg = (local / "identity_fp32" / "config.pbtxt").read_text().replace("count: 1", "count: 2")
        s3.pipe(f"{s3.bucket}/repo/identity_fp32/config.pbtxt", cfg.encode())  # a changed config
        wait_until(lambda: len(srv.worker_pids("identity_fp32")) >= 3)
        assert [g["count"] for g in h.get_model_config("identity_fp32")["instance_group"]] == [2]
        s3.rm(f"{s3.bucket}/repo/add_sub", recursive=True)  # a model removed
        wait_until(lambda: not h.is_model_ready("add_sub"))
        assert h.infer("identity_fp32", [x]).as_numpy("OUTPUT0").tolist() == [0, 1, 2]
    finally:
        h.close()
    assert srv.terminate() == 0


def test_s3_repository_explicit(s3: Any, tmp_path: Path, fresh_server: list[ServerProcess]) -> None:
    local = make_repository(tmp_path / "local", "identity_fp32")
    srv = ServerProcess(f"s3://{s3.bucket}/repo", "--model-control-mode=explicit")
    fresh_server.append(srv.start())
    h = httpclient.InferenceServerClient(srv.url)
    try:
        assert h.get_model_repository_index() == []
        _upload(s3, local, "identity_fp32")
        h.load_model("identity_fp32")  # the bucket is read again before loading
        assert h.is_model_ready("identity_fp32")
    finally:
        h.close()
    assert srv.terminate() == 0
