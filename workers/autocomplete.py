"""``python -m shoal.workers.autocomplete``: complete a model configuration from the model itself
(the backend's ``auto_complete``), in a short-lived process so the router imports no ML
runtime. Reads a serialized ``shoal.worker.Load`` on stdin (config, repository, model name,
version) and writes the completed ``ModelConfig`` on stdout; on failure exits 2 with the
reason on stderr's last line."""

from __future__ import annotations

import sys

from shoal.proto.errors import from_exception
from shoal.proto.gen import model_config_pb2 as mc
from shoal.proto.gen import worker_pb2 as wpb
from shoal.workers.backends.base import Device, spec_from_load
from shoal.workers.backends.registry import backend_class


def main() -> int:
    load = wpb.Load.FromString(sys.stdin.buffer.read())
    config = mc.ModelConfig.FromString(load.model_config)
    spec = spec_from_load(load, config, f"{load.model_name}_autocomplete", Device())
    try:
        completed = backend_class(config.backend).auto_complete(spec)
    except Exception as exc:  # noqa: BLE001 - reported to the router
        print(from_exception(exc).message.replace("\n", " "), file=sys.stderr)
        return 2
    sys.stdout.buffer.write(completed.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
