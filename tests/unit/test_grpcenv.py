"""``server/grpcenv.py``: gRPC's process settings are defaults set before grpc is imported;
an operator's own value wins, and an experiment the installed grpc does not know is never
named (grpc would log an error at every start). Each case runs in a fresh interpreter, since
the settings are process environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from shoal.server import grpcenv

PROBE = """
import json, os, sys
from shoal.server import grpcenv
grpcenv.apply()
import grpc  # noqa: F401 - loads grpc's core with the environment apply() left
seen = {k: os.environ.get(k) for k in ("GRPC_EXPERIMENTS", "GRPC_ENABLE_FORK_SUPPORT")}
print(json.dumps({**seen, "set": grpcenv.SET}))
"""


def _probe(**env: str | None) -> tuple[dict[str, Any], str]:
    child = {k: v for k, v in os.environ.items() if k not in env}
    child.update({k: v for k, v in env.items() if v is not None})
    proc = subprocess.run([sys.executable, "-c", PROBE], env=child, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


def test_the_installed_grpc_knows_its_listener_experiment() -> None:
    assert grpcenv.knows_experiment(grpcenv.LISTENER_EXPERIMENT)
    assert not grpcenv.knows_experiment("no_such_experiment_in_grpc")
    assert not grpcenv.knows_experiment("event_engine")  # a prefix of several names is not a name


def test_defaults_are_set_when_the_operator_set_none() -> None:
    seen, stderr = _probe(GRPC_EXPERIMENTS=None, GRPC_ENABLE_FORK_SUPPORT=None)
    both = {"GRPC_EXPERIMENTS": "-event_engine_listener", "GRPC_ENABLE_FORK_SUPPORT": "false"}
    assert seen == {**both, "set": both}
    assert "Unknown experiment" not in stderr


@pytest.mark.parametrize("value", ["", "-event_engine_client", "event_engine_listener"])
def test_the_operators_values_win(value: str) -> None:
    seen, _ = _probe(GRPC_EXPERIMENTS=value, GRPC_ENABLE_FORK_SUPPORT="true")
    assert seen == {"GRPC_EXPERIMENTS": value, "GRPC_ENABLE_FORK_SUPPORT": "true", "set": {}}
