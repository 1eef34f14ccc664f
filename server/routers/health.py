"""Liveness, readiness and metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import error_responses
from vbon.rewards.base import reward_health

router = APIRouter(tags=["health"])


@router.get("/health", responses={503: {"description": "Start-up failed or the engine died"}})
async def health(request: Request) -> JSONResponse:
    """Liveness (no auth): 200 while the process works, also while the engine loads; 503 if
    start-up failed or the local engine died, so that an orchestrator restarts it."""
    error = request.app.state.startup_error
    gateway = getattr(request.app.state, "gateway", None)
    if not error and gateway is not None:
        error = gateway.backend.fatal()
    if error:
        return JSONResponse({"status": "failed", "reason": error}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get(
    "/ready",
    responses={
        503: {"description": "Not ready: loading, start-up failed or the engine died"},
        **error_responses(401),
    },
)
async def ready(request: Request) -> JSONResponse:
    """200 when the engine and reward model are loaded (and a remote reward server answers its
    /health); 503 otherwise, with the reason."""
    state = request.app.state
    gateway = getattr(state, "gateway", None)
    if gateway is None:
        error = getattr(state, "startup_error", None) or "starting: loading engine and reward"
        return JSONResponse({"ready": False, "reason": error}, status_code=503)
    engine_error = gateway.backend.error()
    # A remote reward server is checked (cached, off the event loop); local rewards are
    # always ready once loaded. Only readiness depends on it, never liveness (/health).
    reward_error = await asyncio.to_thread(reward_health, gateway.reward)
    ready = engine_error is None and reward_error is None
    body = {
        "ready": ready,
        "engine": {
            "ok": engine_error is None,
            "error": engine_error,
            # The served name only: never the model folder's path on this server.
            "model": gateway.model_name,
        },
        "reward": {
            "ok": reward_error is None,
            **({"error": reward_error} if reward_error else {}),
            **gateway.reward.describe(),
        },
        "adapters": [
            {"name": v.name, "version": v.version, "n": v.meta.n, "method": v.meta.method}
            for v in gateway.registry.all()
        ],
        "refused_adapters": gateway.registry.refused_reasons(),
        "samples_in_flight": gateway.budget.in_flight,
        "engine_running_requests": await gateway.backend.running_requests(),
    }
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(401),
    },
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is not None:
        request.app.state.metrics.adapters.set(len(gateway.registry.all()))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
