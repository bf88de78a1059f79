"""What a client may name: shared-memory keys (POSIX object names) and the
``shared_memory_*`` parameters of a tensor, checked before anything is opened."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from shoal.proto import errortexts as T
from shoal.proto.errors import InvalidInput, ServingError
from shoal.server.types import ShmRef
from shoal.shm import client as shm_client
from shoal.shm.region import SERVER_PREFIX

log = logging.getLogger("shoal.shm")

RESERVED_KEY_PREFIXES = (SERVER_PREFIX, "triton_python_backend_shm_region_", "sem.")
_KEY_RE = re.compile(r"^[^/\x00]{1,255}$")
_U64 = 2**64


def u64(value: Any, what: str) -> int:
    """``value`` as an unsigned 64-bit integer (JSON ``true`` is not one)."""
    if type(value) is not int or not 0 <= value < _U64:
        raise InvalidInput(f"{what} must be an unsigned 64-bit integer")
    return value


def normalize_key(key: str) -> str:
    """The POSIX object name of ``key`` (leading slashes dropped, as glibc does). Its errors
    are Shoal's: Triton's texts for these quote the key, and no error quotes a key here."""
    name = key.lstrip("/")
    if not _KEY_RE.match(name) or name in (".", ".."):
        raise InvalidInput(
            "shared memory key must be a POSIX shared memory name: 1 to 255 characters, no '/' after the leading one"
        )
    if name.startswith(RESERVED_KEY_PREFIXES):
        raise InvalidInput("shared memory key uses a prefix reserved for the server's own shared memory")
    return name


def _shown(text: str) -> str:
    """``text`` as error messages quote it: printable, at most 256 characters."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[:256])


def unusable(region: str) -> ServingError:
    """The one answer to a key that cannot be registered, whatever the reason (no existence
    or size oracle; Triton's text for a key smaller than offset + byte_size); the log says why."""
    return T.SHM_INVALID_ARGS(region=_shown(region))


def open_checked(name: str, region: str) -> shm_client.Identity:
    """The identity of the client's object ``name``; refuses what is not a regular file
    (directories, symlinks, FIFOs) the same way as a key that does not exist."""
    try:
        fd, ident = shm_client.open_object(name)
    except OSError as exc:
        log.info("register %r: cannot open key %r: %s", region, name, exc.strerror or exc)
        raise unusable(region) from None
    os.close(fd)
    return ident


def shm_params(params: dict[str, Any], what: str) -> ShmRef | None:
    """Take the ``shared_memory_*`` parameters out of a tensor's ``params``; ``None`` when
    the tensor does not use shared memory."""
    if "shared_memory_region" not in params:
        for k in ("shared_memory_offset", "shared_memory_byte_size"):
            if k in params:
                raise InvalidInput(f"{what}: '{k}' given without 'shared_memory_region'")
        return None
    name = params.pop("shared_memory_region")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what}: 'shared_memory_region' must be a non-empty string")
    if "shared_memory_byte_size" not in params:
        raise InvalidInput(f"{what}: 'shared_memory_byte_size' is required with 'shared_memory_region'")
    byte_size = u64(params.pop("shared_memory_byte_size"), f"{what}: 'shared_memory_byte_size'")
    offset = u64(params.pop("shared_memory_offset", 0), f"{what}: 'shared_memory_offset'")
    return ShmRef(region_name=name, offset=offset, byte_size=byte_size)
