"""deploy/systemd/shoal.service: systemd accepts it (``systemd-analyze verify``, with
ExecStart pointed at this environment's ``shoal``), it signals only the router on stop, and
it waits longer than the server's own exit timeout."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "shoal.service"


def test_unit_stops_the_router_gracefully() -> None:
    text = UNIT.read_text()
    assert re.search(r"^KillMode=mixed$", text, re.M)  # SIGTERM to the router only
    assert re.search(r"^KillSignal=SIGTERM$", text, re.M)
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    exit_timeout = int(re.search(r"--exit-timeout-secs (\d+)", text).group(1))  # type: ignore[union-attr]
    assert stop > exit_timeout


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    shoal = Path(sys.executable).parent / "shoal"
    assert shoal.exists()
    unit = tmp_path / "shoal.service"
    unit.write_text(UNIT.read_text().replace("/opt/shoal/.venv/bin/shoal", str(shoal)))
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
