"""python_backend's custom execution environments: the model configuration parameter
``EXECUTION_ENV_PATH`` names a conda-pack archive (``.tar.gz``) or an unpacked environment
(its directory, or its activation script inside it), ``$$TRITON_MODEL_DIRECTORY`` standing
for the model's directory. The worker puts the environment's ``site-packages`` first on
``sys.path`` before it imports the model, so the model's own packages (and versions) win.

Archives are unpacked once per archive (path, size and modification time) under
``$SHOAL_ENV_CACHE`` (default ``<tmp>/shoal-envs/``) and reused by every instance and later
loads; members that would land outside the target are refused (``tarfile``'s ``data``
filter). Unlike Triton's stub, which is built for one Python, the environment must hold
packages for the worker's own Python version: anything else fails the load, naming both.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile

from shoal.proto.errors import ErrorCode, InvalidInput, ServingError
from shoal.workers.backends.base import ModelSpec

PARAMETER = "EXECUTION_ENV_PATH"
MODEL_DIRECTORY = "$$TRITON_MODEL_DIRECTORY"
CACHE_VARIABLE = "SHOAL_ENV_CACHE"
"""Where archives are unpacked (the worker inherits the server's environment)."""


def activate(spec: ModelSpec) -> str | None:
    """Put the model's execution environment on ``sys.path``; its ``site-packages``, or None
    when the model names none."""
    param = spec.config.parameters.get(PARAMETER)
    raw = param.string_value.strip() if param is not None else ""
    if not raw:
        return None
    path = raw.replace(MODEL_DIRECTORY, spec.model_dir)
    if not os.path.exists(path):
        raise InvalidInput(f"model '{spec.name}': {PARAMETER} '{raw}': no such file or directory")
    root = (
        _unpacked(spec, raw, path) if os.path.isfile(path) and tarfile.is_tarfile(path) else _root_of(spec, raw, path)
    )
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = os.path.join(root, "lib", version, "site-packages")
    if not os.path.isdir(site):
        found = sorted(
            os.path.basename(os.path.dirname(p))
            for p in glob.glob(os.path.join(root, "lib", "python*", "site-packages"))
        )
        raise InvalidInput(
            f"model '{spec.name}': the execution environment '{raw}' has no packages for {version} "
            f"(it has: {', '.join(found) or 'none'}); Shoal's workers run {version}"
        )
    if site not in sys.path:
        sys.path.insert(0, site)
    return site


def _root_of(spec: ModelSpec, raw: str, path: str) -> str:
    """An unpacked environment: the directory named, or the nearest one above the file named
    (an activation script) that holds ``lib/python*/site-packages``."""
    here = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
    while True:
        if glob.glob(os.path.join(here, "lib", "python*", "site-packages")):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            if os.path.isdir(path):
                return os.path.abspath(path)  # reported as having no packages
            raise InvalidInput(f"model '{spec.name}': {PARAMETER} '{raw}' is neither an archive nor in an environment")
        here = parent


def _unpacked(spec: ModelSpec, raw: str, archive: str) -> str:
    st = os.stat(archive)
    key = hashlib.sha256(f"{os.path.realpath(archive)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:20]
    base = os.environ.get(CACHE_VARIABLE) or os.path.join(tempfile.gettempdir(), "shoal-envs")
    dest = os.path.join(base, key)
    if os.path.isdir(dest):
        return dest
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix=f"{key}.", dir=base)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
    except (OSError, tarfile.TarError) as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise ServingError(
            f"model '{spec.name}': cannot unpack the execution environment '{raw}': {exc}", code=ErrorCode.INTERNAL
        ) from None
    try:
        os.rename(work, dest)
    except OSError:  # another instance unpacked it meanwhile
        shutil.rmtree(work, ignore_errors=True)
    return dest
