"""The models the server serves: versions and their states (``version``), lookups
(``registry``), loading and unloading (``lifecycle``), worker processes (``instances``) and
the repository index (``index``)."""

from shoal.server.models.instances import InstanceSettings
from shoal.server.models.lifecycle import ModelManager
from shoal.server.models.registry import Registry
from shoal.server.models.version import ModelState, ModelVersion, TensorSpec, submit

__all__ = ["InstanceSettings", "ModelManager", "ModelState", "ModelVersion", "Registry", "TensorSpec", "submit"]
