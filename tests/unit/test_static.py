"""Lint and strict typing are part of the suite, so CI enforces them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["server", "workers", "shm", "proto"]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_ruff() -> None:
    out = subprocess.run(
        [_tool("ruff"), "check", *PACKAGES, "tests", "--output-format", "concise"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict(tmp_path: Path) -> None:
    """mypy over the ``shoal`` namespace: the folders are installed under it through a
    setuptools mapping that static tools cannot read, so a folder of links stands in."""
    shim = tmp_path / "shoal"
    shim.mkdir()
    (shim / "__init__.py").write_text("")
    for package in PACKAGES:
        (shim / package).symlink_to(ROOT / package)
    out = subprocess.run(
        [_tool("mypy"), "-p", "shoal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MYPYPATH": str(tmp_path)},
    )
    assert out.returncode == 0, out.stdout + out.stderr
