"""The run directory: a private folder in the temp directory (``/tmp`` where the temp
directory's path is too long for Unix sockets) holding the workers' channel socket, and the
owner locks that tell a live run from a dead one.

A run is named ``shoal_<pid>_<token>``. While the router lives it holds two exclusive
locks (``shm.region.OwnerLock``): ``/dev/shm/<run>.lock`` for its shared-memory segments
and ``<tmp>/<run>/lock`` for this folder (two, because containers may share one and not the
other). At start, segments and folders of runs whose lock is free are removed: those of a
router that was killed, or is a zombie, but never those of a live server in another PID
namespace.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from shoal.shm.region import SHM_DIR, OwnerLock, is_held, lock_name

log = logging.getLogger("shoal")

_RUN_DIR_RE = re.compile(r"^shoal_\d+_[0-9a-f]+$")
_OLD_RUN_DIR_RE = re.compile(r"^shoal-[A-Za-z0-9_]{8}$")
"""``tempfile.mkdtemp(prefix="shoal-")`` folders of Shoal before owner locks."""


SUN_PATH_MAX = 107
"""Bytes of a Unix socket's path at most (``sun_path`` is 108, with its NUL)."""
_LONGEST = ("shoal_4194304_ffffff", "lane-4194304.sock")
"""The longest run folder and socket names (PIDs reach 2**22 on Linux)."""


def base_dir() -> Path:
    """Where run folders go: the temp directory (``TMPDIR``), or ``/tmp`` when the sockets of
    a run folder under it would have longer paths than Unix sockets allow (a long ``TMPDIR``,
    as batch schedulers and build tools set). Raises ``OSError`` when neither will do."""
    tmp = Path(tempfile.gettempdir())
    if _fits(tmp):
        return tmp
    fallback = Path("/tmp")
    if fallback != tmp and _fits(fallback) and os.access(fallback, os.W_OK | os.X_OK):
        log.info("run folder in %s: socket paths under %s would be too long", fallback, tmp)
        return fallback
    raise OSError(
        errno.ENAMETOOLONG,
        f"the temporary directory {tmp} is too long a path for the run folder's Unix sockets "
        f"(at most {SUN_PATH_MAX} bytes) and /tmp cannot be used: set TMPDIR to a shorter directory",
    )


def _fits(base: Path) -> bool:
    return len(os.fsencode(base.joinpath(*_LONGEST))) <= SUN_PATH_MAX


class RunDir:
    """Owned by the router: created at start, removed (locks released) at stop."""

    def __init__(self, run: str, path: Path, locks: list[OwnerLock]) -> None:
        self.run = run
        self.path = path
        self._locks = locks

    @classmethod
    def create(cls, run: str) -> RunDir:
        """Take the run's locks and make its folder; raises ``OSError``. Without a usable
        /dev/shm (absent, read-only, not ours to write) the run has no lock there and no
        segments: every tensor travels in the messages (``framing.overflow``)."""
        locks: list[OwnerLock] = []
        try:
            locks.append(OwnerLock.acquire(str(SHM_DIR / lock_name(run))))
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.ENOENT, errno.EACCES, errno.EPERM):
                raise
            log.warning("no usable shared memory in %s (%s): tensors travel in the messages", SHM_DIR, exc.strerror)
        try:
            path = base_dir() / run
            path.mkdir(mode=0o700)
            locks.append(OwnerLock.acquire(str(path / "lock")))
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        return cls(run, path, locks)

    def close(self) -> None:
        """Remove the folder, then release the locks (the /dev/shm one last, after the
        caller has unlinked the run's segments)."""
        shutil.rmtree(self.path, ignore_errors=True)
        for lock in reversed(self._locks):
            lock.release()


def reclaim_run_dirs() -> list[str]:
    """Remove run folders of Shoal servers that are gone; returns their paths."""
    removed: list[str] = []
    entries = []
    for tmp in dict.fromkeys((Path(tempfile.gettempdir()), Path("/tmp"))):  # see base_dir
        try:
            entries += list(os.scandir(tmp))
        except OSError:
            continue
    for entry in entries:
        if not entry.is_dir(follow_symlinks=False):
            continue
        if _RUN_DIR_RE.match(entry.name):
            stale = not is_held(os.path.join(entry.path, "lock"))
        elif _OLD_RUN_DIR_RE.match(entry.name):
            stale = _old_run_gone(Path(entry.path))
        else:
            continue
        if stale:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


def _old_run_gone(path: Path) -> bool:
    """A pre-lock run folder is stale when nothing listens on its socket any more (a folder
    of that name without the socket is not known to be Shoal's: left alone)."""
    sock_path = path / "workers.sock"
    if not sock_path.is_socket():
        return False
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock_path))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False
