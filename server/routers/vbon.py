"""POST /v1/vbon: one sample from a distilled vBoN policy (a LoRA adapter). HTTP only: the
request's meaning, streamed or not, is Gateway.vbon / Gateway.open_vbon_stream."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.errors import GENERATION_ERRORS, STREAM_RESPONSE, error_responses
from server.protocol import VBoNRequest, VBoNResponse
from server.routers.common import abort_on_disconnect, get_gateway, sse_response
from server.serving import Gateway

router = APIRouter(tags=["vbon"])


@router.post(
    "/v1/vbon",
    response_model=VBoNResponse,
    response_model_exclude_none=False,
    responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)},
)
async def vbon(
    body: VBoNRequest, request: Request, gateway: Gateway = Depends(get_gateway)
) -> VBoNResponse | StreamingResponse:
    if not body.stream:
        return await abort_on_disconnect(request, gateway.vbon(body))
    stream = gateway.open_vbon_stream(body)
    await abort_on_disconnect(request, stream.start())
    return sse_response(stream.chunks(), stream.release)
