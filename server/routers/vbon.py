"""POST /v1/vbon: one sample from a distilled vBoN policy (a LoRA adapter)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.errors import GENERATION_ERRORS, STREAM_RESPONSE, APIError, error_responses
from server.protocol import VBoNRequest, VBoNResponse
from server.routers.common import abort_on_disconnect, get_gateway, sse, sse_error
from server.serving import Gateway, new_id

router = APIRouter(tags=["vbon"])


@router.post(
    "/v1/vbon",
    response_model=VBoNResponse,
    response_model_exclude_none=False,
    responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)},
)
async def vbon(body: VBoNRequest, request: Request, gateway: Gateway = Depends(get_gateway)):
    if not body.stream:
        return await abort_on_disconnect(request, gateway.vbon(body))
    adapter = gateway.resolve_adapter(body.adapter, body.n)
    prompt = gateway.render(body)
    stream = gateway.open_stream(prompt, body.sampling(), "/v1/vbon", adapter.ref)
    rid = new_id("vbon")
    info = gateway.adapter_info(adapter).model_dump()

    async def events() -> AsyncIterator[str]:
        text = []
        try:
            async for d in stream.deltas():
                text.append(d.text)
                chunk = {
                    "id": rid,
                    "object": "vbon.chunk",
                    "adapter": info,
                    "text": d.text,
                    "finish_reason": d.finish_reason,
                }
                if d.finish_reason is not None and body.score:
                    chunk["reward"] = await stream.score("".join(text))
                yield sse(chunk)
        except APIError as exc:
            yield sse_error(exc)
        yield sse("[DONE]")

    # Starlette cancels the generator when the client disconnects, which aborts the request.
    return StreamingResponse(
        events(), media_type="text/event-stream", background=BackgroundTask(stream.release)
    )
