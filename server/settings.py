"""The gateway's settings: CoreSettings (model, reward, engine) plus serving limits."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from vbon.settings import CoreSettings


class ServerSettings(CoreSettings):
    host: str = Field("127.0.0.1", description="Bind address ('0.0.0.0' in containers).")
    port: int = Field(8000, ge=1, le=65535)
    api_key: SecretStr | None = Field(
        None, description="Bearer key required on every route but /health."
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for /admin routes (adapter reload); unset = admin off."
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins; off if empty.")
    adapters_dir: Path = Field(Path("adapters"), description="Where vBoN adapters are installed.")
    default_adapter: str | None = Field(
        None, description="Adapter for /v1/vbon when a request names none; default: newest."
    )
    adapter_poll_s: float = Field(
        2.0, ge=0, description="How often to look for new adapters (0 = only on admin reload)."
    )
    max_n: int = Field(32, ge=1, description="Largest N a BoN request may ask for.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens per request.")
    max_prompt_tokens: int = Field(768, ge=1, description="Longest prompt in tokens.")
    max_samples_in_flight: int = Field(
        512, ge=1, description="Samples being generated at once; above it: 429 + Retry-After."
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request time limit (504).")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    served_model_name: str | None = Field(
        None, description="Name of the base model in the API; default: the model folder name."
    )
    bon_log_path: Path | None = Field(
        None, description="Opt-in JSONL log of BoN candidates and rewards (trainer input)."
    )
    bon_log_max_bytes: int = Field(100_000_000, ge=1024, description="Rotate the log above this.")
    bon_log_backups: int = Field(5, ge=1, description="Rotated log files kept.")
    log_level: str = Field("info")
