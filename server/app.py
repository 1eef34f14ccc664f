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
from server.bon_log import BoNLog
from server.errors import install_error_handlers
from server.metrics import Metrics
from server.middleware import AuthMiddleware, BodyLimitMiddleware, MetricsMiddleware
from server.routers import admin, bon, health, openai, vbon
from server.serving import Gateway
from server.settings import ServerSettings
from vbon.rewards.base import RewardModel

logger = logging.getLogger("server")


def create_app(
    settings: ServerSettings,
    backend_factory: Callable[[ServerSettings], GenerationBackend] = VLLMBackend,
    reward_factory: Callable[[ServerSettings], RewardModel] | None = None,
) -> FastAPI:
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        backend = backend_factory(settings)
        bon_log = registry = watcher = None
        try:
            # Reward first: it is quick and a bad setting should fail before the engine loads.
            reward = await asyncio.to_thread(
                reward_factory or (lambda s: s.load_reward()), settings
            )
            await backend.start()
            registry = AdapterRegistry(
                settings.adapters_dir,
                settings.max_lora_rank,
                base_model=backend.model_path,
                default=settings.default_adapter,
                backend=backend,
            )
            await registry.scan()
            if settings.bon_log_path is not None:
                bon_log = BoNLog(
                    settings.bon_log_path, settings.bon_log_max_bytes, settings.bon_log_backups
                )
            app.state.gateway = Gateway(settings, backend, reward, registry, metrics, bon_log)
            if settings.adapter_poll_s > 0:
                watcher = asyncio.create_task(registry.watch(settings.adapter_poll_s))
            logger.info(
                "ready: model %s, reward %s, adapters %s",
                app.state.gateway.model_name,
                reward.describe(),
                [v.name for v in registry.all()],
            )
            yield
        finally:
            app.state.gateway = None
            if watcher is not None:
                watcher.cancel()
            if bon_log is not None:
                await asyncio.to_thread(bon_log.close)
            await backend.shutdown()
            if registry is not None:
                registry.close()

    app = FastAPI(
        title="vbon gateway",
        version="0.1.0",
        description="Best-of-N and variational Best-of-N serving on one vLLM engine.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gateway = None
    install_error_handlers(app)
    for r in (health.router, bon.router, vbon.router, openai.router, admin.router):
        app.include_router(r)
    # Outermost last: metrics see every response, auth runs before any body is read.
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(
        AuthMiddleware,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        admin_key=settings.admin_key.get_secret_value() if settings.admin_key else None,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_factory() -> Any:
    """For `uvicorn --factory server.app:app_factory`."""
    from vbon.settings import load_settings

    return create_app(load_settings(ServerSettings))
