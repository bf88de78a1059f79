"""The container images (Dockerfile, deploy/docker/entrypoint.sh) where no image builder runs:
the Dockerfile's layout (stages, non-root user, exec-form entrypoint, health check, ports,
volume), the wheel stage's files building a complete wheel, and the entrypoint script run
directly (it execs the server, which then gets the SIGTERM of `docker stop` itself).

The images themselves were built and run with buildah and podman (README "Container,
Kubernetes and KServe"); CI has no builder."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "docker" / "entrypoint.sh"

Instruction = tuple[str, str]


def _instructions() -> list[Instruction]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending
    return out


def _stages() -> dict[str, list[Instruction]]:
    """Each stage's instructions, by stage name (in order of the file)."""
    stages: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for word, rest in _instructions():
        if word == "FROM":
            found = re.fullmatch(r"(\S+) AS (\S+)", rest, re.I)
            assert found, f"every stage is named: FROM {rest}"
            current = stages[found.group(2)] = [(word, found.group(1))]
        elif current is not None:
            current.append((word, rest))
    return stages


def _args() -> dict[str, str]:
    """The global ARGs (before the first FROM) and their defaults."""
    out = {}
    for word, rest in _instructions():
        if word == "FROM":
            break
        if word == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default
    return out


def _one(stage: list[Instruction], word: str) -> str:
    (found,) = [rest for w, rest in stage if w == word]
    return found


def test_stages_build_a_cpu_and_a_cuda_image() -> None:
    stages = _stages()
    assert list(stages) == ["wheel", "cpu-venv", "cuda-venv", "cuda", "cpu"]
    assert list(stages)[-1] == "cpu"  # the default target
    args = _args()
    assert args["DEBIAN_IMAGE"].startswith("debian:bookworm")  # Python 3.11, as Shoal needs
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", args["CUDA_IMAGE"])
    assert _one(stages["cpu"], "FROM") == _one(stages["cpu-venv"], "FROM") == "${DEBIAN_IMAGE}"
    assert _one(stages["cuda"], "FROM") == _one(stages["cuda-venv"], "FROM") == "${CUDA_IMAGE}"
    # the runtime images take the environments, not the build tools
    assert ("COPY", "--from=cpu-venv /opt/shoal /opt/shoal") in stages["cpu"]
    assert ("COPY", "--from=cuda-venv /opt/shoal /opt/shoal") in stages["cuda"]
    # CuPy and onnxruntime-gpu for the base image's CUDA major version
    cuda_major = re.match(r"nvidia/cuda:(\d+)\.", args["CUDA_IMAGE"]).group(1)  # type: ignore[union-attr]
    (packages,) = [r for w, r in stages["cuda-venv"] if w == "ARG" and r.startswith("CUDA_PACKAGES=")]
    assert set(json.loads(packages.partition("=")[2]).split()) == {"onnxruntime-gpu==1.31.*", f"cupy-cuda{cuda_major}x"}
    assert cuda_major == "13"  # onnxruntime-gpu 1.31's CUDA provider links libcudart.so.13
    assert "$CUDA_PACKAGES" in " ".join(r for w, r in stages["cuda-venv"] if w == "RUN")
    assert "[onnx" in " ".join(r for w, r in stages["cpu-venv"] if w == "RUN")


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_runtime_image_layout(target: str) -> None:
    stage = _stages()[target]
    assert _one(stage, "USER") == "1000:1000"  # numeric: Kubernetes' runAsNonRoot can check it
    assert "useradd --uid 1000 --gid 1000" in _one(stage, "RUN")
    # exec form: the entrypoint (and through its exec, the server) is PID 1
    assert json.loads(_one(stage, "ENTRYPOINT")) == ["/usr/local/bin/shoal-entrypoint"]
    assert json.loads(_one(stage, "CMD")) == []
    assert ("COPY", "deploy/docker/entrypoint.sh /usr/local/bin/shoal-entrypoint") in stage
    assert json.loads(_one(stage, "VOLUME")) == ["/models"]
    assert _one(stage, "EXPOSE").split() == ["8000", "8001", "8002"]
    assert _one(stage, "STOPSIGNAL") == "SIGTERM"
    env = _one(stage, "ENV")
    assert "SHOAL_MODEL_REPOSITORY=/models" in env
    assert "SHOAL_HEALTH_URL=http://127.0.0.1:8000/v2/health/ready" in env
    assert "PATH=/opt/shoal/bin:$PATH" in env
    options, _, command = _one(stage, "HEALTHCHECK").partition("CMD ")
    assert "--start-period=" in options
    cmd = json.loads(command)
    assert cmd[0] == "/opt/shoal/bin/python" and "SHOAL_HEALTH_URL" in cmd[-1]


def test_healthcheck_command_fails_unless_ready(tmp_path: Path) -> None:
    """The HEALTHCHECK's Python line: exit 0 on 200, non-zero on 400 and on no server."""
    import http.server
    import threading

    cmd = json.loads(_one(_stages()["cpu"], "HEALTHCHECK").partition("CMD ")[2])
    codes = {"/v2/health/ready": 200, "/down/v2/health/ready": 400}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(codes.get(self.path, 404))
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        for path, ok in [("/v2/health/ready", True), ("/down/v2/health/ready", False)]:
            env = {**os.environ, "SHOAL_HEALTH_URL": f"http://127.0.0.1:{port}{path}"}
            out = subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30)
            assert (out.returncode == 0) is ok, out.stderr
    finally:
        server.shutdown()
        server.server_close()
    env = {**os.environ, "SHOAL_HEALTH_URL": f"http://127.0.0.1:{port}/v2/health/ready"}
    assert subprocess.run([sys.executable, *cmd[1:]], env=env, capture_output=True, timeout=30).returncode != 0


def test_wheel_stage_copies_every_package_and_builds_a_complete_wheel(tmp_path: Path) -> None:
    """The files the wheel stage copies, alone, build Shoal's wheel with every package."""
    stage = _stages()["wheel"]
    copied = []
    for word, rest in stage:
        if word == "COPY":
            *sources, _dest = rest.split()
            copied += sources
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    assert package_dirs <= set(copied)
    src = tmp_path / "src"
    src.mkdir()
    for name in copied:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(path, src / name)
    # .dockerignore lets each of them into the build context
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :].count("*") == 1
    for name in copied:
        assert f"!{name}" in ignore, f".dockerignore keeps {name} out of the build context"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("shoal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for package in project["tool"]["setuptools"]["packages"]:
        assert package.replace(".", "/") + "/__init__.py" in names, package
    assert "shoal/proto/gen/grpc_service_pb2.py" in names
    assert "shoal/workers/pb/triton_python_backend_utils.py" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert b"tritonserver = shoal.server.cli:tritonserver" in zipfile.ZipFile(wheel).read(entry_points)


# -- the entrypoint script, run directly --------------------------------------------------

FAKE_SERVER = """#!/bin/sh
# stands in for shoal and tritonserver: prints what it was run as, drains on SIGTERM
trap 'echo drained; exit 0' TERM
echo "$$ $(basename "$0") $*"
while :; do sleep 0.05; done
"""


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("shoal", "tritonserver"):
        (bin_dir / name).write_text(FAKE_SERVER)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _start(fake_bin: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if k != "SHOAL_MODEL_REPOSITORY"}
    environ.update(PATH=f"{fake_bin}:{os.environ['PATH']}", **env)
    return subprocess.Popen(
        [str(ENTRYPOINT), *args], env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _stop(proc: subprocess.Popen[str]) -> str:
    """docker stop: SIGTERM to the container's first process; what it printed after."""
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    return rest.strip()


SERVE = "shoal serve --model-repository=/models"
ENTRYPOINT_CASES: list[tuple[list[str], dict[str, str], str]] = [
    ([], {}, SERVE),
    (["--log-verbose=1", "--exit-timeout-secs", "5"], {}, f"{SERVE} --log-verbose=1 --exit-timeout-secs 5"),
    (["--model-repository=/data", "--http-port=9"], {}, "shoal serve --model-repository=/data --http-port=9"),
    (["--http-port=9", "--model-store", "/data"], {}, "shoal serve --http-port=9 --model-store /data"),
    ([], {"SHOAL_MODEL_REPOSITORY": "s3://b/m"}, "shoal serve --model-repository=s3://b/m"),
    (["tritonserver", "--model-store=/mnt/models"], {}, "tritonserver --model-store=/mnt/models"),
    (["shoal", "workers", "list"], {}, "shoal workers list"),
]


@pytest.mark.parametrize(("args", "env", "expected"), ENTRYPOINT_CASES)
def test_entrypoint_execs_the_server(fake_bin: Path, args: list[str], env: dict[str, str], expected: str) -> None:
    proc = _start(fake_bin, *args, **env)
    try:
        pid, _, ran = _first_line(proc).partition(" ")
        assert ran == expected
        # exec: the server is the process that was started (PID 1 in a container) ...
        assert int(pid) == proc.pid
        # ... so it gets docker stop's SIGTERM itself, and drains
        assert _stop(proc) == "drained"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_entrypoint_is_executable_posix_sh() -> None:
    assert os.access(ENTRYPOINT, os.X_OK)
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    for shell in ("dash", "sh"):
        path = shutil.which(shell)
        if path is not None:
            assert subprocess.run([path, "-n", str(ENTRYPOINT)], timeout=30).returncode == 0


def test_stop_timeout_advice_matches_the_exit_timeout() -> None:
    """`--stop-timeout` in the Dockerfile's advice is above the server's default exit timeout."""
    from shoal.server.config import parse

    text = DOCKERFILE.read_text()
    stop = int(re.search(r"--stop-timeout=(\d+)", text).group(1))  # type: ignore[union-attr]
    exit_timeout = parse(["serve", "--model-repository", str(ROOT)]).exit_timeout_s
    assert stop > exit_timeout
    assert "--shm-size" in text and "--ipc=host" in text
