"""POSIX shared-memory segments: create (owner), attach (consumer), unlink, reclaim.

Segment names are ``/dev/shm`` names without the leading slash. The owner creates with
``O_EXCL`` and reserves the pages with ``posix_fallocate`` so that a full ``/dev/shm``
is an error at creation (``RESOURCE_EXHAUSTED``) rather than a ``SIGBUS`` on first write.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
from pathlib import Path

import posix_ipc

from shoal.proto.errors import ErrorCode, ServingError

log = logging.getLogger("shoal.shm")

SHM_DIR = Path("/dev/shm")
SERVER_PREFIX = "shoal_"
"""Every segment a Shoal server or its workers create starts with this; the client
shared-memory registration API refuses keys with this prefix."""

_OWNER_RE = re.compile(r"^shoal_(\d+)_")
_RUN_RE = re.compile(r"^(shoal_\d+_[0-9a-f]+)(?:_|\.lock$)")
LOCK_SUFFIX = ".lock"


class Segment:
    """One mapped POSIX shm segment. The creator owns it and unlinks it on ``close``."""

    __slots__ = ("name", "nbytes", "mm", "owner", "_closed")

    def __init__(self, name: str, nbytes: int, mm: mmap.mmap, *, owner: bool) -> None:
        self.name = name
        self.nbytes = nbytes
        self.mm = mm
        self.owner = owner
        self._closed = False

    @classmethod
    def create(cls, name: str, nbytes: int) -> Segment:
        """Create and map a new segment of ``nbytes``; raises ``RESOURCE_EXHAUSTED`` when
        ``/dev/shm`` cannot hold it and ``ALREADY_EXISTS`` when the name is taken."""
        try:
            shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600)
        except posix_ipc.ExistentialError:
            log.error("shared memory segment %s already exists", name)
            raise ServingError(
                "a server shared memory segment name is already taken", code=ErrorCode.ALREADY_EXISTS
            ) from None
        except OSError as exc:  # no usable /dev/shm: read-only, absent, not ours to write
            raise ServingError(
                f"cannot create shared memory in /dev/shm ({exc.strerror})", code=ErrorCode.RESOURCE_EXHAUSTED
            ) from None
        try:
            try:
                os.posix_fallocate(shm.fd, 0, nbytes)
            except OSError as exc:
                shm.unlink()
                raise ServingError(
                    f"cannot reserve {nbytes} bytes of shared memory in /dev/shm ({exc.strerror}); "
                    "enlarge /dev/shm (docker: --shm-size) or lower --shm-arena-bytes",
                    code=ErrorCode.RESOURCE_EXHAUSTED,
                ) from None
            mm = mmap.mmap(shm.fd, nbytes)
        finally:
            shm.close_fd()
        return cls(name, nbytes, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> Segment:
        """Map an existing segment read-write; raises ``NOT_FOUND`` if it does not exist."""
        try:
            shm = posix_ipc.SharedMemory("/" + name)
        except posix_ipc.ExistentialError:
            # the name stays in the log: segment names must not reach clients (CVE-2025-23320)
            log.error("shared memory segment %s does not exist", name)
            raise ServingError("a server shared memory segment is missing", code=ErrorCode.NOT_FOUND) from None
        try:
            nbytes = os.fstat(shm.fd).st_size
            mm = mmap.mmap(shm.fd, nbytes)
        finally:
            shm.close_fd()
        return cls(name, nbytes, mm, owner=False)

    def close(self) -> None:
        """Unmap; the owner also unlinks. Idempotent. Views still exported keep the
        mapping alive until they are released (mmap refuses to close then)."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            unlink(self.name)
        try:
            self.mm.close()
        except BufferError:
            # A memoryview into the segment is still alive; the mapping goes with it.
            pass


def unlink(name: str) -> None:
    """Remove a segment name; missing names are ignored."""
    try:
        posix_ipc.unlink_shared_memory("/" + name)
    except posix_ipc.ExistentialError:
        pass


def unlink_prefix(prefix: str) -> list[str]:
    """Unlink every segment whose name starts with ``prefix``; returns the names."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            removed.append(name)
    return removed


class OwnerLock:
    """An exclusive ``flock`` the live server holds for its whole life on a file named after
    its run. Another server tells a live run from a dead one by trying that lock: it works
    across PID namespaces (two containers sharing /dev/shm with ``--ipc=host``, where the
    other's pid means nothing), and a zombie or killed router no longer holds it."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, path: str) -> OwnerLock:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file, then let go of the lock; idempotent."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = -1


def is_held(path: str) -> bool | None:
    """Whether a live process holds the lock at ``path``; ``None`` when there is no lock file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return True  # not ours to judge (permissions): leave it alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def lock_name(run_prefix: str) -> str:
    """The /dev/shm name of a run's owner lock."""
    return run_prefix + LOCK_SUFFIX


def reclaim_stale() -> list[str]:
    """Unlink segments left by Shoal servers that are no longer running.

    Segments are named ``shoal_<pid>_<token>_...``; the run's owner lock
    (``shoal_<pid>_<token>.lock``) tells whether the server that made them is alive. A run
    whose lock is free or missing is gone. Returns the names removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return removed
    runs: dict[str, list[str]] = {}
    for name in names:
        m = _RUN_RE.match(name)
        if m is not None:
            runs.setdefault(m.group(1), []).append(name)
    for run, members in runs.items():
        if is_held(str(SHM_DIR / lock_name(run))):
            continue
        for name in sorted(members, key=lambda n: n.endswith(LOCK_SUFFIX)):  # the lock last
            unlink(name)
            removed.append(name)
    return removed
