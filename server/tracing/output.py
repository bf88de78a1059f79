"""Trace output in ``triton`` mode: tensor data as Triton's trace JSON shows it, and the one
thread that writes trace files (never the event loop)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger("shoal.trace")
_NUMPY = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}


def tensor_text(datatype: str, shape: Sequence[int], data: Any) -> str:
    """A tensor's values as Triton writes them in a trace: comma-separated, floats with six
    significant digits (C++'s default), booleans 0/1, BYTES elements quoted; FP16 and BF16
    (and tensors in a client's shared memory, which the router does not map) are empty.
    Triton prints INT8/UINT8 elements as characters; here they are numbers."""
    try:
        count = 1
        for d in shape:
            count *= int(d)
        if datatype == "BYTES":
            raw = bytes(data)
            items = []
            pos = 0
            for _ in range(count):
                if pos + 4 > len(raw):
                    break
                n = int.from_bytes(raw[pos : pos + 4], "little")
                pos += 4
                items.append('"' + raw[pos : pos + n].decode("utf-8", "replace") + '"')
                pos += n
            return ",".join(items)
        dtype = _NUMPY.get(datatype)
        if dtype is None or not len(data):
            return ""
        values = np.frombuffer(data, dtype=dtype, count=count)
        if datatype == "BOOL":
            return ",".join("1" if v else "0" for v in values.tolist())
        if dtype.kind == "f":
            return ",".join(format(v, ".6g") for v in values.tolist())
        return ",".join(str(v) for v in values.tolist())
    except (ValueError, TypeError):
        return ""


# ---- the file writer --------------------------------------------------------------------------


class _Writer:
    """Writes trace files in a thread of its own (started at the first write): ``append``
    adds a trace to a file's JSON array, ``indexed`` writes a whole file, ``close`` ends
    an array.

    Appended traces are written whole: what the queue held is joined and written with one
    unbuffered write per file once the queue is empty, so a reader of a file being written
    (a client tailing it, the tests) sees whole trace objects, never the half of one that a
    buffered file flushes when its buffer fills."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[str, str, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._files: dict[str, Any] = {}
        self._pending: dict[str, list[str]] = {}
        """Text appended to each open file and not written yet."""
        self.written = 0
        """Operations done (tests wait on it)."""

    def put(self, op: tuple[str, str, str]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shoal-trace-writer", daemon=True)
            self._thread.start()
        self._queue.put(op)

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                break
            try:
                self._do(*op)
                if self._queue.empty():
                    self._flush()
            except OSError as exc:
                log.error("writing trace file %s failed: %s", op[1], exc)
            self.written += 1
        for path in list(self._files):
            try:
                self._end(path)
            except OSError:
                pass
        self._files.clear()

    def _flush(self, only: str = "") -> None:
        for path, texts in list(self._pending.items()):
            if only and path != only:
                continue
            del self._pending[path]
            data = memoryview("".join(texts).encode("utf-8"))
            f = self._files[path]
            while data:  # a regular file takes it all in one write, short of a full disk
                data = data[f.write(data) :]

    def _end(self, path: str) -> None:
        self._pending.setdefault(path, []).append("]")
        self._flush(path)
        self._files.pop(path).close()

    def _do(self, kind: str, path: str, text: str) -> None:
        if kind == "indexed":
            with open(path, "w", encoding="utf-8") as out:
                out.write("[" + text + "]")
        elif kind == "append":
            if path not in self._files:
                self._files[path] = open(path, "wb", buffering=0)  # noqa: SIM115 - kept open
                self._pending[path] = ["[" + text]
            else:
                self._pending.setdefault(path, []).append("," + text)
        elif kind == "close":
            if path in self._files:
                self._end(path)
