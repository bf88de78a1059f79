"""A decoupled model's responses to one request, as the frontends consume them
(``DataPlane.infer_stream``): a queue the worker's streamed responses land in, flow-control
acknowledgements back to the worker as they are taken, and everything given back when the
consumer leaves early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from shoal.proto.errors import ServingError
from shoal.proto.streamflow import ACK_EVERY
from shoal.server.types import InferRequest, InferResult

StreamItem = tuple[InferResult | ServingError | None, bool]
"""One response of a decoupled model (``DataPlane.infer_stream``) and whether it is the last."""


async def responses(
    request: InferRequest, run_request: Callable[[], Coroutine[Any, Any, InferResult]]
) -> AsyncGenerator[StreamItem, None]:
    """``(response, final)`` pairs of ``request`` as they come, while ``run_request()`` (its
    execution) runs; a response is an ``InferResult`` (the caller ``done``s it), a
    ``ServingError`` or ``None`` (the final flag alone). Ends after the final one; a request
    refused before it ran raises. Leaving the loop early stops delivery: later responses are
    dropped and their shared memory given back."""
    queue: asyncio.Queue[StreamItem] = asyncio.Queue()
    listening = True
    trace = request.trace

    def sink(item: InferResult | ServingError | None, final: bool) -> None:
        if listening:
            if trace is not None and isinstance(item, InferResult):
                trace.outputs(item)
            queue.put_nowait((item, final))
        elif isinstance(item, InferResult):
            item.done()

    request.responses = sink
    request.backlog = queue.qsize
    ended = False
    consumed = 0
    run = asyncio.ensure_future(run_request())
    try:
        while True:
            if queue.empty() and not run.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait((getter, run), return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    exc = run.exception()  # the request failed, or execute returned
                    if exc is not None:
                        raise exc
                    continue
                item, final = getter.result()
            else:
                item, final = await queue.get()
            yield item, final
            if final:
                ended = True
                return
            # consumed: the model's response sender may send more (flow control)
            consumed += 1
            if consumed >= ACK_EVERY and request.ack is not None:
                request.ack(consumed)
                consumed = 0
    finally:
        if not ended and request.cancel is not None:
            request.cancel()  # left before the final response: the model may stop
        listening = False
        while not queue.empty():
            item, _ = queue.get_nowait()
            if isinstance(item, InferResult):
                item.done()
        if not run.done():
            if ended:  # the final response came before the execution's end: let it end (its
                # statistics and trace are recorded then), then give its result back
                run.add_done_callback(_done)
            else:
                run.cancel()
        elif not run.cancelled() and run.exception() is None:
            run.result().done()


def _done(run: asyncio.Future[InferResult]) -> None:
    if not run.cancelled() and run.exception() is None:
        run.result().done()
