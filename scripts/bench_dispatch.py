#!/usr/bin/env python3
"""Router dispatch micro-benchmark: DataPlane.infer -> worker -> result, no HTTP.

Measures what the router's own dispatch path costs (router CPU microseconds per request,
from time.process_time) and end-to-end requests/s against a real worker process, for
several tensor sizes, with tensors inline in worker message frames or in the shared-memory arena.
This is how the default --inline-max-bytes was chosen.

Run: .venv/bin/python scripts/bench_dispatch.py [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from shoal.server.app import App  # noqa: E402
from shoal.server.config import ServerConfig  # noqa: E402
from shoal.server.types import InferRequest, InputTensor  # noqa: E402


async def run_case(app: App, nbytes: int, requests: int, concurrency: int) -> tuple[float, float]:
    assert app.dataplane is not None
    data = np.zeros(nbytes // 4, dtype=np.float32).tobytes()

    async def one() -> None:
        req = InferRequest("identity_fp32", -1, [InputTensor("INPUT0", "FP32", (len(data) // 4,), data)])
        result = await app.dataplane.infer(req)  # type: ignore[union-attr]
        result.done()

    for _ in range(50):
        await one()
    remaining = requests

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    cpu1, wall1 = time.process_time(), time.perf_counter()
    return requests / (wall1 - wall0), (cpu1 - cpu0) / requests * 1e6


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sizes", default="64,4096,65536,1048576")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="shoal-dispatch-"))
    shutil.copytree(ROOT / "examples" / "models" / "identity_fp32", tmp / "identity_fp32")
    base = ServerConfig(model_repository=tmp, host="127.0.0.1", http_port=0, grpc_port=0, metrics_port=0)
    print(f"{'bytes':>9} {'placement':>9} {'req/s':>8} {'router us/req':>14}")
    try:
        for placement, inline_max in (("inline", 1 << 30), ("shm", 0)):
            app = App(replace(base, inline_max_bytes=inline_max))
            await app.start()
            try:
                for size in (int(s) for s in args.sizes.split(",")):
                    rps, cpu_us = await run_case(app, size, args.requests, args.concurrency)
                    print(f"{size:>9} {placement:>9} {rps:>8.0f} {cpu_us:>14.1f}", flush=True)
            finally:
                await app.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
