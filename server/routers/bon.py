"""POST /v1/bon: the best of N base-model samples by reward."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server.errors import GENERATION_ERRORS, error_responses
from server.protocol import BoNRequest, BoNResponse
from server.routers.common import abort_on_disconnect, get_gateway
from server.serving import Gateway

router = APIRouter(tags=["bon"])


@router.post(
    "/v1/bon",
    response_model=BoNResponse,
    response_model_exclude_none=True,
    responses=error_responses(*GENERATION_ERRORS),
)
async def bon(
    body: BoNRequest, request: Request, gateway: Gateway = Depends(get_gateway)
) -> BoNResponse:
    return await abort_on_disconnect(request, gateway.bon(body))
