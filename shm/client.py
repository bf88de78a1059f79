"""POSIX shared-memory objects that clients own (Triton's system shared-memory extension),
opened and accessed so that nothing a client does to its object can hurt the server.

- Objects are opened with ``O_NOFOLLOW | O_NONBLOCK`` and must be regular files: a key that
  names a directory, a symlink or a FIFO (which would block ``open``) is refused.
- Bytes are copied with ``preadv`` / ``pwritev``, never through a mapping: if the client
  truncates its object while a request uses it, or ``/dev/shm`` is full under a sparse
  object, the copy fails with a short count or ``ENOSPC``, where touching a mapping would
  raise SIGBUS and kill the process.
- ``Identity`` (device, inode) pins what was checked at registration: a key that names
  another object by the time a worker opens it (unlinked and created again, perhaps by
  another user) is refused.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

SHM_DIR = "/dev/shm"
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


@dataclass(frozen=True, slots=True)
class Identity:
    """What ``fstat`` says of an open object."""

    device: int
    inode: int
    size: int
    uid: int


def open_object(name: str) -> tuple[int, Identity]:
    """Open ``/dev/shm/<name>`` read-write; returns the descriptor (the caller closes it) and
    the object's identity. Raises ``OSError`` for anything that is not a regular file."""
    fd = os.open(os.path.join(SHM_DIR, name), _FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(22, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, Identity(st.st_dev, st.st_ino, st.st_size, st.st_uid)


def read_into(fd: int, offset: int, out: memoryview) -> int:
    """Copy bytes at ``offset`` into ``out``; returns how many (fewer than ``len(out)`` when
    the object is shorter now)."""
    done = 0
    total = len(out)
    while done < total:
        n = os.preadv(fd, [out[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def write_from(fd: int, offset: int, data: memoryview) -> None:
    """Copy ``data`` to ``offset``; raises ``OSError`` (e.g. ``ENOSPC``)."""
    done = 0
    total = len(data)
    while done < total:
        n = os.pwritev(fd, [data[done:]], offset + done)
        if n <= 0:
            raise OSError(28, "no space left for the shared memory region")
        done += n
