#!/usr/bin/env python3
"""The channel's decoder alone (``proto.framing.Decoder``): messages of a few sizes fed in
reads of a fixed size, as a socket hands them over, timed in this process.

Each row: one message of SIZE (a 100-byte header and a frame of SIZE), or, for the small
row, 5000 messages of 1 KiB back to back, fed in reads of CHUNK bytes into a decoder with
``bytes`` frames (the router's) and one with ``bytearray`` frames (a worker's); best and
median milliseconds over ``--repeat`` runs. Large messages are the arena-overflow path (a
tensor an arena has no room for travels in the message).

Run: .venv/bin/python scripts/bench_framing.py [--sizes-mib 0.001,16,300] [--chunk-kib 256] [--repeat 3]
``--base DIR``: also time the decoder of another checkout's ``proto/framing.py`` (e.g. one
made with ``git worktree add DIR REV``), interleaved with this one's.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _framing(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stream(framing: ModuleType, size: int) -> bytes:
    if size >= 1 << 20:
        return b"".join(bytes(b) for b in framing.encode([b"h" * 100, bytes(size)]))
    one = b"".join(bytes(b) for b in framing.encode([b"h" * 100, bytes(size)]))
    return one * 5000


def _time(decoder: Any, view: memoryview, chunk: int) -> tuple[float, int]:
    t = time.perf_counter()
    got = 0
    for i in range(0, len(view), chunk):
        got += len(decoder.feed(view[i : i + chunk]))
    return time.perf_counter() - t, got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mib", default="0.001,16,300")
    ap.add_argument("--chunk-kib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--base", default="", help="another checkout whose proto/framing.py to compare")
    args = ap.parse_args()
    here = _framing(ROOT / "proto" / "framing.py", "framing_here")
    sides = [("this", here)]
    if args.base:
        sides.append(("base", _framing(Path(args.base) / "proto" / "framing.py", "framing_base")))
    chunk = args.chunk_kib << 10
    print(f"{'size MiB':>9} {'frames':>9} {'side':>5} {'messages':>8} {'best ms':>9} {'median ms':>10}")
    for raw in args.sizes_mib.split(","):
        size = int(float(raw) * (1 << 20))
        view = memoryview(_stream(here, size))
        for writable in (False, True):
            times: dict[str, list[float]] = {name: [] for name, _ in sides}
            counts: dict[str, int] = {}
            for _ in range(args.repeat):
                for name, module in sides:  # interleaved: this VM's memory is slower at times
                    dt, n = _time(module.Decoder(writable=writable), view, chunk)
                    times[name].append(dt)
                    counts[name] = n
            kind = "bytearray" if writable else "bytes"
            for name, _ in sides:
                t = times[name]
                print(
                    f"{float(raw):>9g} {kind:>9} {name:>5} {counts[name]:>8} "
                    f"{1000 * min(t):>9.1f} {1000 * statistics.median(t):>10.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
