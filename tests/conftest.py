"""Fixtures shared by every test layer: shared-memory leak checks."""

from __future__ import annotations

import os

# Before anything imports grpc: with its fork support on (grpcio's default), a process that
# forks while its gRPC threads run (subprocess with preexec_fn, as ServerProcess uses for
# rlimits; os.fork) can abort the child before exec: "Epoll1Poller ... epoll_wait error: Bad
# file descriptor", SIGABRT (grpc/grpc#43055; ~1 in 300 such forks here). The router sets
# the same for itself.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402


def shoal_segments() -> set[str]:
    """Segments of Shoal servers and of the client regions tests create (``shoaltest_``)."""
    try:
        mine = f"shoaltest_{os.getpid()}_"  # client regions of this test process only
        return {n for n in os.listdir("/dev/shm") if n.startswith(("shoal_", mine)) and f"_{PLANTED}_" not in n}
    except FileNotFoundError:
        return set()


PLANTED = "dead00"
"""The run token of the stale segment tests/e2e/test_lifecycle.py plants for a dead process
on purpose: not a leak of this session (another test session on the machine may have planted
it; its owner is dead, so nothing tells whose it is)."""


EXCLUSIVE_LOCK = "/tmp/shoal-tests-exclusive.lock"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests under tests/security are ``exclusive``: they bound latency and memory while an
    attack runs, which another test process beside them would skew (a good client's answer
    took 6.5 s there once, against a 5 s bound)."""
    for item in items:
        if "tests/security/" in item.nodeid or item.nodeid.startswith("security/"):
            item.add_marker(pytest.mark.exclusive)


@pytest.fixture(autouse=True)
def exclusive_when_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """With two test processes (``SHOAL_TEST_JOBS=2 ./dev test``, pytest-xdist), an ``exclusive`` test runs
    while no other test does: it holds a file lock exclusively, every other test holds it
    shared. (Module-scoped servers start before it; only the tests themselves wait.)"""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield
        return
    import fcntl

    mode = fcntl.LOCK_EX if request.node.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with open(EXCLUSIVE_LOCK, "a") as lock:
        fcntl.flock(lock, mode)
        yield


@pytest.fixture(autouse=True)
def no_leaked_segments() -> Iterator[None]:
    """Every test must leave /dev/shm as it found it (segments of servers that are still
    running in a wider-scoped fixture are allowed to persist)."""
    before = shoal_segments()
    yield
    leaked = shoal_segments() - before
    # segments of module-scoped servers that a test merely caused to grow stay with
    # their (live) server and are checked when it stops; those of other live processes (a
    # second test session on the machine) are theirs to check
    leaked = {n for n in leaked if not _owned_elsewhere(n)}
    if leaked:
        leaked = _not_gone(leaked)
    assert not leaked, f"shared memory leaked: {sorted(leaked)}"


def _not_gone(names: set[str], grace_s: float = 3.0) -> set[str]:
    """Of segments found after a test, those that stay. A segment of a server whose router has
    exited can be one that a test process running beside this one (``SHOAL_TEST_JOBS=2
    ./dev test`` runs two) is stopping: its router gone, its workers still unlinking (CI saw one in
    ``test_every_datatype``). Those get ``grace_s`` to go; a leak stays and is reported. (Which
    server a segment's name came from cannot be told by its pid alone: pids wrap around at
    32768 here during a suite.) Segments this process made itself count at once."""
    import time

    from shoal.shm.region import _OWNER_RE

    def foreign(name: str) -> bool:
        owner = _OWNER_RE.match(name)
        return owner is not None and int(owner.group(1)) != os.getpid()

    deadline = time.monotonic() + grace_s
    while any(foreign(n) for n in names) and time.monotonic() < deadline:
        time.sleep(0.05)
        names = names & shoal_segments()
    return names


def _owned_elsewhere(name: str) -> bool:
    """The segment belongs to a live server run (its owner lock is held), or to another live
    process than this one."""
    from shoal.shm.region import _OWNER_RE, _RUN_RE, SHM_DIR, is_held, lock_name

    run = _RUN_RE.match(name)
    if run and is_held(str(SHM_DIR / lock_name(run.group(1)))):
        return True
    owner = _OWNER_RE.match(name)
    if owner is None or int(owner.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(owner.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
