"""``server.dispatch.output``: a worker's stdout and stderr read through pipes on the event
loop. Real child processes write; the lines land in the ring (partial last lines and
over-long lines too) and are forwarded unchanged; a reader of the router's output that stalls
pauses the pipes (the child blocks, the loop does not) and nothing is lost."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time

import pytest

from shoal.server.dispatch import output


async def _run(capture: output.Capture, ring: output.LogRing, script: str) -> int:
    out_fd, err_fd = capture.open()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdin=asyncio.subprocess.DEVNULL, stdout=out_fd, stderr=err_fd
    )
    await capture.start(ring, proc.pid)
    rc = await proc.wait()
    await capture.wait_ended(10)
    assert capture.ended
    capture.close()
    return rc


async def test_lines_reach_the_ring_and_the_router_output(capfd: pytest.CaptureFixture[str]) -> None:
    ring = output.LogRing()
    script = (
        "import sys\n"
        "print('one'); print('two', file=sys.stderr); sys.stdout.flush()\n"
        "sys.stdout.write('x' * 70000 + '\\n'); sys.stdout.write('no newline at the end')\n"
    )
    assert await _run(output.Capture(), ring, script) == 0
    output.FORWARDER.flush()
    rows = ring.as_list()
    texts = [(r["stream"], r["text"]) for r in rows]
    assert ("stdout", "one") in texts and ("stderr", "two") in texts
    assert texts[-1] == ("stdout", "no newline at the end")
    long = [t for s, t in texts if t.startswith("xxx")]
    assert long and all(len(t) <= output.LINE_MAX + 6 for t in long)
    assert {r["pid"] for r in rows} == {rows[0]["pid"]} and rows[0]["pid"] > 0
    assert ring.as_list(2) == rows[-2:]
    out, err = capfd.readouterr()
    # forwarded whole and unchanged, each stream to its own
    assert out == "one\n" + "x" * 70000 + "\nno newline at the end"
    assert err == "two\n"


async def test_ring_is_bounded() -> None:
    ring = output.LogRing(maxlen=10)
    for i in range(25):
        ring.add(1, "stderr", f"line {i}\n".encode())
    assert [r["text"] for r in ring.as_list()] == [f"line {i}" for i in range(15, 25)]
    ring.add(1, "stdout", b"\xff bad utf-8\r\n")
    assert ring.as_list(1)[0]["text"] == "\ufffd bad utf-8"


async def test_a_stalled_reader_pauses_the_pipes_not_the_loop() -> None:
    read_end, write_end = os.pipe()
    forwarder = output.Forwarder({1: write_end, 2: write_end})
    ring = output.LogRing()
    lines = 120_000  # 12 MB: three times the high-water mark
    script = f"import sys\nfor i in range({lines}):\n    sys.stdout.write('%098d\\n' % i)\n"
    received = bytearray()
    reading = threading.Event()

    def drain() -> None:
        reading.wait()
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    run = asyncio.ensure_future(_run(output.Capture(forwarder), ring, script))
    # nobody reads the router's output: the loop keeps turning while the child is held back
    ticks = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.0:
        await asyncio.sleep(0.01)
        ticks += 1
    assert ticks > 50 and not run.done()  # the child is blocked on its full pipe
    reading.set()
    assert await asyncio.wait_for(run, 60) == 0
    assert forwarder.flush(10)
    forwarder.close()
    os.close(write_end)
    reader.join(10)
    os.close(read_end)
    assert len(received) == lines * 99  # nothing lost, nothing reordered
    assert received[:99] == b"%098d\n" % 0 and received[-99:] == b"%098d\n" % (lines - 1)
    assert ring.as_list(1)[0]["text"] == f"{lines - 1:098d}"


async def test_abort_closes_everything() -> None:
    capture = output.Capture()
    fds = capture.open()
    capture.abort()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
