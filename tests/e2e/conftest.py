from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.server import ServerProcess, make_repository

ALL_MODELS = ("add_sub", "strings", "identity_fp32", "echo_all", "slow", "crashy", "simple_onnx")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test shows the end of its server's log (what the router and workers said)."""
    outcome = yield
    report = outcome.get_result()
    srv = getattr(item, "funcargs", {}).get("server")
    if report.failed and isinstance(srv, ServerProcess):
        report.sections.append(("server log (last 80 lines)", "".join(srv.lines[-80:])))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server over every test model, shared by a test module; checked at the end:
    exit status 0 after SIGTERM and no shared memory left."""
    pytest.importorskip("onnxruntime")
    repo = make_repository(tmp_path_factory.mktemp("repo"), *ALL_MODELS)
    srv = ServerProcess(repo).start()
    yield srv
    segments_before_exit = srv.proc.pid if srv.proc else 0
    rc = srv.terminate()
    assert rc == 0, srv.log
    assert not srv.segments(), f"server {segments_before_exit} left {srv.segments()}"


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Servers a test starts itself (e.g. to kill or signal it); always reaped."""
    started: list[ServerProcess] = []
    yield started
    for srv in started:
        srv.kill()


@pytest.fixture(autouse=True)
def collect_clients_in_main_thread() -> Iterator[None]:
    """tritonclient.http clients close themselves in ``__del__`` on the gevent hub of the
    thread that made them; a garbage collection that happens to run on another thread (a
    test's helper thread) then raises. Collect garbage here, on the main thread.

    What is alive when a test starts (modules, module-scoped servers and their clients) is
    then frozen (``gc.freeze``): later collections, these two and the interpreter's own, skip
    it. A full collection of the test process's heap took 70-85 ms on the 2-core box (more
    once PyTorch is imported), twice for each of about a thousand tests. The module's end
    unfreezes it all and collects it once (``unfreeze_after_the_module``)."""
    gc.collect()
    gc.freeze()
    yield
    gc.collect()


@pytest.fixture(scope="module", autouse=True)
def unfreeze_after_the_module() -> Iterator[None]:
    """What the module's tests froze becomes collectable again once the module's fixtures
    (its servers, their clients) are gone: one full collection per module."""
    yield
    gc.unfreeze()
    gc.collect()
