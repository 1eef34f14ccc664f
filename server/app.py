"""The FastAPI app: wiring only. The engine, reward model and adapters load in the lifespan
(not at import), and requests reach them through app.state.gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.adapter_registry import AdapterRegistry
from server.backend import GenerationBackend, VLLMBackend
from server.bon_log import BoNLog, load_redactor
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from server.routers import admin, bon, health, openai, playground, vbon
from server.serving import Gateway, new_id
from server.settings import ServerSettings
from vbon.errors import ConfigError
from vbon.rewards.base import RewardModel
from vbon.shipped import install_shipped

logger = logging.getLogger("server")


def default_backend(settings: ServerSettings) -> GenerationBackend:
    """VBON_BACKEND: 'local' (vLLM in this process) or 'remote' (vLLM servers over HTTP)."""
    if settings.backend == "remote":
        from server.remote_backend import RemoteBackend

        return RemoteBackend(settings)
    return VLLMBackend(settings)


def startup_failure(exc: Exception) -> str:
    """Log why start-up failed and return what clients see: /health is public, and the
    exception's text can hold server paths (models, adapters, the reward folder) and internals,
    so clients get only the kind of failure and a reference to find the log entry."""
    ref = new_id("err")
    logger.error("start-up failed [%s]: %s", ref, exc, exc_info=exc)
    what = ": a setting is invalid" if isinstance(exc, ConfigError) else ""
    return f"start-up failed{what}; the server log has the details under {ref}"


def create_app(
    settings: ServerSettings,
    backend_factory: Callable[[ServerSettings], GenerationBackend] = default_backend,
    reward_factory: Callable[[ServerSettings], RewardModel] | None = None,
    background_load: bool = True,
) -> FastAPI:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = backend_factory(settings)
        parts: dict[str, Any] = {}

        async def load() -> None:
            try:
                # The BoN log's redactor and the reward first: both are quick, and a bad setting
                # should fail before the engine.
                redact = load_redactor(settings.bon_log_redact)
                reward = await asyncio.to_thread(
                    reward_factory or (lambda s: s.load_reward()), settings
                )
                await backend.start()
                if settings.shipped_adapters:
                    await asyncio.to_thread(
                        install_shipped, settings.adapters_dir, backend.model_path
                    )
                registry = parts["registry"] = AdapterRegistry(
                    settings.adapters_dir,
                    settings.max_lora_rank,
                    base_model=backend.model_path,
                    default=settings.default_adapter,
                    backend=backend,
                )
                await registry.scan()
                bon_log = None
                if settings.bon_log_path is not None:
                    bon_log = parts["bon_log"] = BoNLog(
                        settings.bon_log_path,
                        settings.bon_log_max_bytes,
                        settings.bon_log_backups,
                        metrics=metrics,
                        redact=redact,
                    )
                app.state.gateway = Gateway(settings, backend, reward, registry, metrics, bon_log)
                if settings.adapter_poll_s > 0:
                    parts["watcher"] = asyncio.create_task(registry.watch(settings.adapter_poll_s))
                logger.info(
                    "ready: model %s, reward %s, adapters %s",
                    app.state.gateway.model_name,
                    reward.describe(),
                    [v.name for v in registry.all()],
                )
            except Exception as exc:
                app.state.startup_error = startup_failure(exc)

        # The engine loads in the background (~40 s on CPU): meanwhile /health answers and
        # /ready and the API answer 503, as orchestrators expect.
        loader = asyncio.create_task(load())
        if not background_load:
            await loader
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            gateway, app.state.gateway = app.state.gateway, None
            if gateway is not None and gateway.shadow is not None:
                await gateway.shadow.close()  # shadow work is aborted before the engine stops
            if "watcher" in parts:
                parts["watcher"].cancel()
            if "bon_log" in parts:
                await asyncio.to_thread(parts["bon_log"].close)
            await backend.shutdown()
            if "registry" in parts:
                parts["registry"].close()

    app = FastAPI(
        title="vbon gateway",
        version="0.1.0",
        description="Best-of-N and variational Best-of-N serving on one vLLM engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gateway = None
    app.state.startup_error = None
    install_error_handlers(app, {k: v for k, (v, _) in settings.request_caps().items()})
    for r in (health.router, bon.router, vbon.router, openai.router, admin.router):
        app.include_router(r)
    if settings.playground:
        app.include_router(playground.router)
    # Outermost last: metrics see every response, auth runs before any body is read, and CORS
    # sits outside auth (a browser's preflight carries no key; a 401 needs CORS headers too).
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        AuthMiddleware,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_factory() -> Any:
    """For `uvicorn --factory server.app:app_factory`."""
    from vbon.settings import load_settings

    return create_app(load_settings(ServerSettings))
