"""The router never imports a worker module or an ML runtime; workers never import server."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "server": ("shoal.workers", "onnxruntime", "torch", "tensorrt", "cupy", "onnx"),
    "workers": ("shoal.server", "aiohttp"),
    "shm": ("shoal.server", "shoal.workers"),
    "proto": ("shoal.server", "shoal.workers", "shoal.shm"),
}


def modules_of(package: str) -> list[str]:
    """Every module of ``shoal.<package>`` (the folder ``<package>/``)."""
    path = ROOT / package
    names = [f"shoal.{package}"]
    for info in pkgutil.walk_packages([str(path)], prefix=f"shoal.{package}."):
        if ".gen." in info.name or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_import_boundaries(package: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules_of(package)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded for f in FORBIDDEN[package] if m == f or m.startswith(f + ".")]
    assert not bad, f"{package} pulls in {bad}"
