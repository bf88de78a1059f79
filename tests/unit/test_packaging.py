"""The distribution installs the four folders as ``shoal.*`` and nothing at the top level."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("server", "workers", "shm", "proto")


def _setuptools() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    tool = data["tool"]["setuptools"]
    assert isinstance(tool, dict)
    return tool


def test_every_package_folder_is_listed() -> None:
    found = {
        "shoal." + ".".join(init.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert set(_setuptools()["packages"]) == found  # type: ignore[arg-type]
    assert _setuptools()["package-dir"] == {f"shoal.{f}": f for f in FOLDERS}


@pytest.mark.slow
def test_wheel_holds_only_the_shoal_namespace(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0 and "No module named" in out.stderr:
        pytest.skip(f"cannot build here: {out.stderr.strip().splitlines()[-1]}")
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("shoal-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names if not n.startswith("shoal-")}
    assert top == {"shoal"}, top
    for needed in (
        "shoal/server/app.py",
        "shoal/workers/pb/triton_python_backend_utils.py",
        "shoal/proto/worker.proto",
        "shoal/proto/gen/worker_pb2.pyi",
    ):
        assert needed in names, needed
