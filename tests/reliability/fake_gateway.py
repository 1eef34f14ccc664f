"""`python -m tests.reliability.fake_gateway`: the gateway exactly as `python -m server` runs it
(settings from VBON_* variables, the same uvicorn set-up via server.__main__.serve), on the fake
engine with a fixed delay per request (VBON_TEST_DELAY_S), so shutdown can be tested in seconds."""

from __future__ import annotations

import logging
import os

from server.__main__ import serve
from server.app import create_app
from server.settings import ServerSettings
from tests.fakes import FakeBackend
from vbon.settings import load_settings

if __name__ == "__main__":
    settings = load_settings(ServerSettings)
    logging.basicConfig(level=logging.INFO)
    backend = FakeBackend(delay_s=float(os.environ.get("VBON_TEST_DELAY_S", "3")))
    serve(create_app(settings, backend_factory=lambda s: backend), settings)
