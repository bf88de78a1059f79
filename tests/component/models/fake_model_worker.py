"""The scripted fake worker (``tests/component/dispatch/fake_worker.py``) for model-manager
tests: the ``ModelManager`` starts every worker itself, so a test cannot hand each process an
environment of its own; instead the plan comes from the model the process is told to load.

The plans (a JSON list, one plan per process generation, the last one for later generations;
see ``fake_worker`` for what a plan says; or an object of such lists by instance name, ``"*"``
for the other instances) are read at ``Load`` from, in this order:

- ``<repository>/<model>/<version>/fake_plans.json`` (one version only; read at every load, so
  a restarted process reads the file as it is then),
- the parameter ``fake_plans`` of the configuration in the ``Load`` message (a reload with a
  changed plan is a changed configuration, as for a real model),
- none: ``[{}]`` (load, and echo every request's inputs).

One more ``load`` key than ``fake_worker`` knows: ``hold: path`` answers the ``Load`` once that
file exists (what a model that takes long to load looks like, released by the test).

Events go to ``FAKE_WORKER_EVENTS`` as in ``fake_worker``; the ``load`` event names model,
version and instance, so a test can tell whose process a pid is.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from tests.component.dispatch.fake_worker import FakeWorker, main

PLANS_FILE = "fake_plans.json"
PLANS_PARAMETER = "fake_plans"


def plans_of(load: wpb.Load) -> list[dict[str, Any]]:
    path = Path(load.repository) / load.model_name / str(load.model_version) / PLANS_FILE
    if path.is_file():
        text = path.read_text()
    else:
        config = mc.ModelConfig.FromString(load.model_config)
        text = config.parameters[PLANS_PARAMETER].string_value if PLANS_PARAMETER in config.parameters else "[{}]"
    found: list[dict[str, Any]] | dict[str, list[dict[str, Any]]] = json.loads(text)
    plans = found.get(load.instance_name, found.get("*", [{}])) if isinstance(found, dict) else found
    return plans or [{}]


class ModelFakeWorker(FakeWorker):
    def _load(self, env: wpb.Envelope) -> None:
        plans = plans_of(env.load)
        self.plan = plans[min(self.events.gen, len(plans)) - 1]
        hold = self.plan.get("load", {}).get("hold")
        if hold:
            self.events.log("load_held", model=env.load.model_name, version=env.load.model_version)
            while not os.path.exists(hold):
                time.sleep(0.005)
        super()._load(env)


if __name__ == "__main__":
    sys.exit(main(worker_class=ModelFakeWorker))
