"""`python -m server`: start the gateway with settings from VBON_* variables (and .env)."""

from __future__ import annotations

import logging
import sys

import uvicorn
from fastapi import FastAPI

from server.app import create_app
from server.settings import ServerSettings
from vbon.errors import ConfigError
from vbon.settings import load_settings


def main() -> int:
    try:
        settings = load_settings(ServerSettings)
        logging.basicConfig(
            level=settings.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        # Fail on a bad model path or reward before the server starts (and before the engine
        # spends ~40 s loading); the embedded model is converted here if needed.
        if settings.backend == "local":
            # (Remote mode reports a missing model volume in /ready instead of exiting.)
            settings.resolved_model()
        reward = settings.load_reward()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serve(create_app(settings, reward_factory=lambda s: reward), settings)
    return 0


def serve(app: FastAPI, settings: ServerSettings) -> None:
    """Run until SIGTERM/SIGINT. Then uvicorn stops accepting connections, lets in-flight
    requests finish (up to the request timeout), and only then runs the lifespan's shutdown,
    which stops the engine."""
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s),
    )


if __name__ == "__main__":
    sys.exit(main())
