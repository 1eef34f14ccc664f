"""The clients' settings (env prefix VBON_): where the gateway is and the keys to send. Read
from the environment only, not from `.env`, which holds the server's own settings."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VBON_", extra="ignore")

    url: str = Field(DEFAULT_URL, description="The gateway's base URL.")
    api_key: str | None = Field(None, description="Bearer key for the API routes.")
    admin_key: str | None = Field(None, description="Bearer key for /admin routes.")
