"""``shoal serve ...`` / ``python -m shoal.server serve ...``: run the router until a signal."""

from __future__ import annotations

# ruff: noqa: E402 - grpc's environment is set before the imports that load grpc
from shoal.server import grpcenv

grpcenv.apply()  # before grpc is imported

import asyncio
import gc
import logging
import os
import signal
import sys
import types
from collections.abc import Callable, Coroutine
from typing import Any

from shoal.server.config import ConfigError, parse


def main(argv: list[str] | None = None, *, triton: bool = False) -> int:
    """``shoal ...``; ``triton``: started as ``tritonserver`` (no subcommand, Triton's
    defaults)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["workers"] and not triton:
        from shoal.server import admincli

        return admincli.main(args[1:])
    try:
        config = parse(args, triton=triton)
    except ConfigError as exc:
        print(f"{'tritonserver' if triton else 'shoal'}: invalid command line:", file=sys.stderr)
        for p in exc.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    if config.log.file:
        # the router's log and its workers' (they inherit stderr) go to the file
        try:
            fd = os.open(config.log.file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            print(f"--log-file {config.log.file}: {exc.strerror}", file=sys.stderr)
            return 2
        os.dup2(fd, 2)
        os.close(fd)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for note in config.warnings:
        logging.getLogger("shoal").warning("%s", note)
    return _run(_serve(config))


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (its loop and transports cost a fraction of the
    default loop's per request); the default asyncio loop otherwise. Once the loop is closed
    the server has stopped: a SIGTERM or SIGINT arriving while the interpreter exits is
    ignored (closing the loop restores their default action, which killed the process, so
    a second signal just after shutdown turned its exit status 0 into -15)."""
    try:
        import uvloop
    except ImportError:
        run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    else:
        run = uvloop.run
    try:
        return run(coro)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


async def _serve(config: object) -> int:
    # imported here, after the command line was parsed: a bad one (or --help) is answered
    # without loading the server's modules (about a second on a 2-core machine)
    from shoal.server.app import App, ListenError, StartupError
    from shoal.server.config import ServerConfig

    assert isinstance(config, ServerConfig)
    gc_check = os.environ.get("SHOAL_GC_CHECK") == "1"
    if gc_check:
        gc.disable()
    app = App(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        logging.getLogger("shoal").info("received %s; shutting down", signal.Signals(signum).name)
        app.stopping()
        if signals_seen > 1:
            logging.getLogger("shoal").warning("second signal: skipping the graceful wait")
            app.force_stop()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        start = asyncio.create_task(app.start())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start.done():
            try:
                start.result()
            except ListenError as exc:  # which port and which flag: no traceback
                logging.getLogger("shoal").error("%s", exc)
                return 1
            except StartupError as exc:
                # Triton's words for it (tritonserver exits 1 with the same line)
                logging.getLogger("shoal").error("error: creating server: Internal - %s", exc)
                return 1
            await stopper
        else:
            start.cancel()
            try:
                await start
            except asyncio.CancelledError:
                pass
    finally:
        if gc_check:
            _report_cycles()
        await app.stop()
    return 0


def _report_cycles() -> None:
    """``SHOAL_GC_CHECK=1`` (tests): the garbage collector ran never; now count the frames of
    Shoal's router code that only a collection would free (reference cycles keep request
    bodies alive until one happens: every error path must be free of them)."""
    root = os.path.dirname(os.path.abspath(__file__))
    gc.set_debug(gc.DEBUG_SAVEALL)
    gc.collect()
    frames = [
        f"{os.path.relpath(o.f_code.co_filename, root)}:{o.f_code.co_name}"
        for o in gc.garbage
        if isinstance(o, types.FrameType) and o.f_code.co_filename.startswith(root)
    ]
    where = ", ".join(sorted(set(frames)))
    logging.getLogger("shoal").info("gc check: %d router frames in reference cycles (%s)", len(frames), where)
    gc.garbage.clear()
    gc.set_debug(0)


if __name__ == "__main__":
    sys.exit(main())
