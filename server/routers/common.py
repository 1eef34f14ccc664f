"""What every router needs: the gateway from app.state, running a handler so that a client
that goes away aborts its engine request, and the server-sent-events framing of a stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.errors import APIError, ClientDisconnected, error_body
from server.serving import Gateway

T = TypeVar("T")


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if gateway is None or not gateway.backend.ready():
        reason = (
            gateway.backend.error()
            if gateway is not None
            else request.app.state.startup_error or "loading the engine"
        )
        raise APIError(503, f"not ready: {reason}; retry shortly", headers={"Retry-After": "5"})
    return gateway


def sse(data: dict | str) -> str:
    """One server-sent event (the OpenAI streaming framing: `data: <json>`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def sse_error(exc: APIError) -> str:
    """An error after the stream started (the status line is gone): the error shape as an
    event, followed by the usual [DONE]."""
    return sse(error_body(exc.status, exc.message, exc.param, exc.code))


def sse_response(
    chunks: AsyncIterator[dict[str, Any]], release: Callable[[], None]
) -> StreamingResponse:
    """A stream's chunks as server-sent events, an error after the 200 as an error event, then
    [DONE]. `release` (the stream's admission) also runs as the response's background task: a
    response that never starts its body never runs the generator's `finally`. Starlette
    cancels the body when the client disconnects, which aborts the engine request."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except APIError as exc:
            yield sse_error(exc)
        yield sse("[DONE]")

    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(release)
    )


async def until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def abort_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts the engine request) if the client leaves."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        gateway: Gateway | None = getattr(request.app.state, "gateway", None)
        if gateway is not None:
            gateway.metrics.disconnects.inc()
        raise ClientDisconnected
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
