"""The status page in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) driven by selenium loads ``GET /`` from the
real server while tritonclient sends traffic, waits for the plots to have points, asserts on
the DOM (model names and states, the broken model's reason, worker pids, a worker exit in the
recent events), checks that the page refreshes itself, and saves a screenshot in the test's
temporary directory. Skips when selenium, chromium or chromedriver is missing."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.e2e.server import ServerProcess, make_repository

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromedriver (apt-get install chromium-driver)"
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1600",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _traffic(srv: ServerProcess, stop: threading.Event) -> None:
    client = httpclient.InferenceServerClient(srv.url)
    a = np.arange(4, dtype=np.float32)
    inputs = [httpclient.InferInput("INPUT0", [4], "FP32"), httpclient.InferInput("INPUT1", [4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    try:
        while not stop.is_set():
            client.infer("add_sub", inputs)
            time.sleep(0.005)
    finally:
        client.close()


def _points(driver: Any, model: str, kind: str) -> int:
    plots = driver.find_elements(By.CSS_SELECTOR, f'svg.plot[data-model="{model}"][data-kind="{kind}"]')
    return int(plots[0].get_attribute("data-points") or 0) if plots else 0


def test_status_page_in_chromium(tmp_path: Path, fresh_server: list[ServerProcess], browser: Any) -> None:
    repo = make_repository(tmp_path / "repo", "add_sub", "crashy")
    (repo / "broken").mkdir()
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nnot a config\n')
    srv = ServerProcess(repo, env={"SHOAL_STATUS_INTERVAL_S": "0.5"})
    fresh_server.append(srv)
    srv.start()
    stop = threading.Event()
    sender = threading.Thread(target=_traffic, args=(srv, stop), daemon=True)
    sender.start()
    try:
        inp = httpclient.InferInput("INPUT0", [1], "INT32")
        inp.set_data_from_numpy(np.array([4], dtype=np.int32))
        with pytest.raises(InferenceServerException):
            srv.client().infer("crashy", [inp])  # its worker exits: a recent event
        browser.get(f"http://{srv.url}/")
        wait = WebDriverWait(browser, 30, poll_frequency=0.2)
        try:
            wait.until(lambda d: _points(d, "add_sub", "throughput") >= 3 and _points(d, "add_sub", "latency") >= 3)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#events li[data-kind="worker exited"]'))
        except TimeoutException:
            browser.save_screenshot(str(tmp_path / "status-timeout.png"))
            raise
    finally:
        stop.set()
        sender.join(10)

    assert browser.title == "Shoal status"
    assert not browser.find_element(By.ID, "error").is_displayed()
    rows = {
        tr.get_attribute("data-model"): [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in browser.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    }
    assert rows["add_sub"][:3] == ["add_sub", "1", "READY"]
    assert rows["crashy"][2] in ("READY", "UNAVAILABLE")  # restarting, or back
    assert rows["broken"][2] == "UNAVAILABLE" and rows["broken"][3]  # and why
    pids = {
        tr.get_attribute("data-instance"): tr.find_element(By.CSS_SELECTOR, "td.pid").text
        for tr in browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr")
    }
    assert int(pids["add_sub_0"]) in srv.worker_pids("add_sub")
    assert "crashy_0" in pids
    event = browser.find_element(By.CSS_SELECTOR, '#events li[data-kind="worker exited"]').text
    assert "crashy" in event and "exited with status 3" in event
    assert "broken" in browser.find_element(By.CSS_SELECTOR, '#events li[data-kind="load failed"]').text
    # the plots: a line drawn, in SVG, with the latest numbers in the legend
    throughput = browser.find_element(By.CSS_SELECTOR, 'svg.plot[data-model="add_sub"][data-kind="throughput"]')
    assert throughput.find_elements(By.CSS_SELECTOR, "polyline.rps")
    assert "ok " in throughput.text
    latency = browser.find_element(By.CSS_SELECTOR, 'svg.plot[data-model="add_sub"][data-kind="latency"]')
    assert latency.find_elements(By.CSS_SELECTOR, "polyline.p50") and "p99" in latency.text
    assert browser.find_elements(By.CSS_SELECTOR, 'svg.plot[data-model="add_sub"][data-kind="queue"]')
    # it refreshes itself
    loaded = browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded")
    WebDriverWait(browser, 15).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") != loaded
    )
    shot = tmp_path / "status.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    assert srv.terminate() == 0
