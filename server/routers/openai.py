"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions. HTTP only: what
the model names mean and how choices and chunks are built is server/openai_serving.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server import openai_serving
from server.errors import GENERATION_ERRORS, STREAM_RESPONSE, error_responses
from server.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelList,
)
from server.routers.common import abort_on_disconnect, get_gateway, sse_response
from server.serving import Gateway

router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def models(gateway: Gateway = Depends(get_gateway)) -> ModelList:
    return openai_serving.list_models(gateway)


@router.post(
    "/v1/completions",
    response_model=CompletionResponse,
    response_model_exclude_none=True,
    responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)},
)
async def completions(
    body: CompletionRequest, request: Request, gateway: Gateway = Depends(get_gateway)
) -> CompletionResponse | StreamingResponse:
    target = openai_serving.resolve_target(gateway, body)
    if body.stream and target.kind == "bon":
        resp = await abort_on_disconnect(request, openai_serving.completion(gateway, body, target))
        return sse_response(openai_serving.finished_chunks(resp, body), lambda: None)
    if body.stream:
        stream = openai_serving.open_completion_stream(
            gateway, body, body.prompts()[0], target, chat=False
        )
        return sse_response(stream.chunks(), stream.release)
    return await abort_on_disconnect(request, openai_serving.completion(gateway, body, target))


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    response_model_exclude_none=True,
    responses={**STREAM_RESPONSE, **error_responses(*GENERATION_ERRORS)},
)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, gateway: Gateway = Depends(get_gateway)
) -> ChatCompletionResponse | StreamingResponse:
    target = openai_serving.resolve_target(gateway, body)
    prompt = openai_serving.chat_prompt(gateway, body)
    if body.stream and target.kind == "bon":
        resp = await abort_on_disconnect(
            request, openai_serving.chat_completion(gateway, body, prompt, target)
        )
        return sse_response(openai_serving.finished_chunks(resp, body), lambda: None)
    if body.stream:
        stream = openai_serving.open_completion_stream(gateway, body, prompt, target, chat=True)
        return sse_response(stream.chunks(), stream.release)
    return await abort_on_disconnect(
        request, openai_serving.chat_completion(gateway, body, prompt, target)
    )
