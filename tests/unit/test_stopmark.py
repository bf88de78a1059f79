"""``proto.stopmark``: where the router's stop mark lies for a worker's channel endpoint, and
how long a worker looks for it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from shoal.proto import stopmark


def test_the_mark_lies_in_the_folder_of_the_channel_socket(tmp_path: Path) -> None:
    assert stopmark.path_for(f"ipc://{tmp_path}/workers.sock") == str(tmp_path / "stopping")
    assert stopmark.path_for("tcp://127.0.0.1:5555") == ""
    assert not stopmark.wait_for("", 0.5)


def test_a_worker_finds_a_mark_made_while_it_looks(tmp_path: Path) -> None:
    path = stopmark.path_for(f"ipc://{tmp_path}/workers.sock")
    started = time.monotonic()
    assert not stopmark.wait_for(path, 0.05)
    assert time.monotonic() - started >= 0.05
    later = threading.Timer(0.05, stopmark.mark, [str(tmp_path)])
    later.start()
    try:
        assert stopmark.wait_for(path, 5.0)
    finally:
        later.join()
    stopmark.mark(str(tmp_path))  # again: idempotent
    stopmark.mark(str(tmp_path / "gone"))  # a folder already removed: nothing happens
    assert stopmark.wait_for(path, 0.0)
