"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions. HTTP only: what
the model names mean and how choices and chunks are built is server/openai_serving.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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


async def _respond(
    request: Request,
    body: CompletionRequest | ChatCompletionRequest,
    target: openai_serving.Target,
    answer: Callable[[], Awaitable[CompletionResponse | ChatCompletionResponse]],
    open_stream: Callable[[], openai_serving.CompletionStream],
) -> CompletionResponse | ChatCompletionResponse | StreamingResponse:
    """Both routes alike: the whole answer; a best-of model's stream, its winner as one chunk
    once every candidate is scored; any other stream, token by token, its first token fetched
    before the 200 so that a start-up failure is an error status, not an event."""
    if not body.stream:
        return await abort_on_disconnect(request, answer())
    if target.kind == "bon":
        resp = await abort_on_disconnect(request, answer())
        return sse_response(openai_serving.finished_chunks(resp, body), lambda: None)
    stream = open_stream()
    await abort_on_disconnect(request, stream.start())
    return sse_response(stream.chunks(), stream.release)


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
    return await _respond(
        request, body, target,
        lambda: openai_serving.completion(gateway, body, target),
        lambda: openai_serving.open_completion_stream(
            gateway, body, body.prompts()[0], target, chat=False
        ),
    )  # fmt: skip


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
    return await _respond(
        request, body, target,
        lambda: openai_serving.chat_completion(gateway, body, prompt, target),
        lambda: openai_serving.open_completion_stream(gateway, body, prompt, target, chat=True),
    )  # fmt: skip
