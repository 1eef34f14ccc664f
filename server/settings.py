"""The gateway's settings: CoreSettings (model, reward, engine) plus serving limits."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import NoDecode

from server.protocol import AdaptiveFields, Prune
from vbon.settings import CoreSettings

# Chosen on the training prompts by `python -m clients.adaptive_bench --select` (docs/adaptive.md):
# with n = 32, the fewest tokens within one SE of BoN-16's reward at 128 tokens.
DEFAULT_ADAPTIVE = AdaptiveFields(
    wave=2, stop_at_reward=0.86, prune=Prune(at_tokens=[48], keep=0.5)
)


def _is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine (a hostname other than
    localhost counts as reachable: it may resolve to any interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ServerSettings(CoreSettings):
    host: str = Field("127.0.0.1", description="Bind address ('0.0.0.0' in containers).")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    allow_no_key: bool = Field(
        False,
        description="Serve without VBON_API_KEY on a VBON_HOST other than loopback (an open API: "
        "only behind your own authenticating proxy or on a trusted network).",
    )
    api_key: SecretStr | None = Field(
        None,
        # Validated when unset too: the check below must also see the default None.
        validate_default=True,
        description="Bearer key required on every route but /health and the /playground page "
        "(whose API calls send it); required when VBON_HOST "
        "is not loopback, unless VBON_ALLOW_NO_KEY=true.",
    )
    admin_key: SecretStr | None = Field(
        None, description="Bearer key for /admin routes (adapter reload); unset = admin off."
    )
    cors_origins: list[str] = Field(default_factory=list, description="CORS origins; off if empty.")
    default_adapter: str | None = Field(
        None,
        description="Adapter for /v1/vbon when a request names none; default: the vBoN-8 "
        "adapter (a user-trained one before the shipped one), else the newest.",
    )
    shipped_adapters: bool = Field(
        True,
        description="At start, install the adapters shipped with vbon (vBoN-4/8/16 for the "
        "embedded model) into VBON_ADAPTERS_DIR where missing; an adapter you train for the "
        "same N takes precedence.",
    )
    adapter_poll_s: float = Field(
        2.0, ge=0, description="How often to look for new adapters (0 = only on admin reload)."
    )
    max_n: int = Field(32, ge=1, description="Largest N a BoN request may ask for.")
    max_tokens_limit: int = Field(512, ge=1, description="Largest max_tokens per request.")
    max_prompt_tokens: int = Field(768, ge=1, description="Longest prompt in tokens.")
    max_samples_in_flight: int = Field(
        512, ge=1, description="Samples being generated or scored at once; above it: 429 + "
        "Retry-After (before any 200, streams included)."
    )
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Time limit of a whole request (504): its generations and scoring, all "
        "its prompts.",
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    served_model_name: str | None = Field(
        None, description="Name of the base model in the API; default: the model folder name."
    )
    bon_log_path: Path | None = Field(
        None, description="Opt-in JSONL log of BoN candidates and rewards (trainer input)."
    )
    bon_log_max_bytes: int = Field(100_000_000, ge=1024, description="Rotate the log above this.")
    bon_log_backups: int = Field(5, ge=1, description="Rotated log files kept.")
    bon_log_redact: str | None = Field(
        None,
        description="Redaction hook for the BoN log, 'package.module:function': called with each "
        "record (a dict: prompt, responses, rewards), returns the record to write or None to "
        "skip it; imported at start (an import error fails start-up).",
    )
    adaptive_default: AdaptiveFields = Field(
        DEFAULT_ADAPTIVE,
        description="Adaptive best-of-N setting used by 'adaptive': true and the "
        "'bon-<N>-adaptive' models, as JSON in the request's shape, e.g. "
        '{"wave": 2, "stop_at_reward": 0.86, "prune": {"at_tokens": [48], "keep": 0.5}}. '
        "The default target suits the embedded VADER reward (range -1..1): with another reward "
        "model give your own target, or a quantile with VBON_REWARD_REFERENCE.",
    )
    reward_reference: Path | None = Field(
        None,
        description="JSONL of base-model rewards (a BoN log or a trainer reference file) for "
        "'stop_at_quantile' targets; use one drawn at the max_tokens you serve.",
    )
    log_level: str = Field("info", description="Log level (debug, info, warning, error).")
    playground: bool = Field(
        True,
        description="Serve the playground page at /playground (static files; the page itself "
        "loads without a key and asks for VBON_API_KEY for its API calls); false = 404.",
    )
    # -- remote mode (VBON_BACKEND=remote): generation on vLLM OpenAI-compatible servers ------
    backend: Literal["local", "remote"] = Field(
        "local",
        description="'local': vLLM in this process; 'remote': send generation to VBON_UPSTREAMS "
        "(`vllm serve` replicas) and keep only the tokenizer and the reward here.",
    )
    upstreams: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Base URLs of the vLLM servers, comma-separated or a JSON list "
        "(e.g. 'http://vllm-0:8000,http://vllm-1:8000').",
    )
    upstream_model: str | None = Field(
        None,
        description="Model id the upstreams must serve; default: VBON_MODEL's folder (compared "
        "by folder name, so the mount points may differ).",
    )
    upstream_adapters_dir: Path | None = Field(
        None,
        description="Where the upstreams see VBON_ADAPTERS_DIR (the shared adapters volume); "
        "default: the same path.",
    )
    upstream_api_key: SecretStr | None = Field(
        None, description="Bearer key for the upstreams (`vllm serve --api-key`)."
    )
    upstream_timeout_s: float = Field(
        280.0, gt=0, description="Longest wait for one upstream answer (then 504)."
    )
    upstream_connect_timeout_s: float = Field(
        3.0, gt=0, description="Connect timeout; an upstream that does not connect is skipped."
    )
    upstream_health_interval_s: float = Field(
        5.0, gt=0, description="How often every upstream is health-checked."
    )
    upstream_max_connections: int = Field(
        256, ge=1, description="Pooled HTTP connections to all upstreams together."
    )
    # -- shadow BoN (docs/shadow.md): is vBoN still as good as BoN on today's traffic? ------
    shadow_bon_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Fraction of vBoN answers (/v1/vbon and vBoN models on the OpenAI routes) "
        "that are also compared, after the answer is sent, with N fresh base samples of the "
        "same prompt (N: the adapter's); results in /metrics as vbon_shadow_*. 0 = off; e.g. "
        "0.02. Costs N extra samples per comparison, only when there is spare capacity.",
    )
    shadow_max_load: float = Field(
        0.5,
        gt=0,
        le=1,
        description="A shadow comparison starts only if the samples in flight, its own N "
        "included, stay within this share of VBON_MAX_SAMPLES_IN_FLIGHT; users' requests "
        "cancel running ones whenever they need the room.",
    )
    shadow_max_jobs: int = Field(
        2, ge=1, description="Most shadow comparisons running at once (beyond: skipped)."
    )

    def request_caps(self) -> dict[str, tuple[int, str]]:
        """The server's own upper limits on request fields: field -> (limit, the setting that
        sets it). Validation messages and the gateway's limit checks both read them here."""
        n = (self.max_n, "VBON_MAX_N")
        tokens = (self.max_tokens_limit, "VBON_MAX_TOKENS_LIMIT")
        return {"n": n, "best_of": n, "max_tokens": tokens, "max_completion_tokens": tokens}

    @field_validator("api_key")
    @classmethod
    def _key_off_loopback(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # On api_key rather than the whole model: the error then names VBON_API_KEY and quotes
        # only its value (None or ''), never the other settings, which may hold secrets.
        host = str(info.data.get("host", ""))
        missing = v is None or not v.get_secret_value()
        if missing and not _is_loopback(host) and not info.data.get("allow_no_key", False):
            raise ValueError(
                f"required with VBON_HOST={host}, which other machines can reach: set "
                "VBON_API_KEY to a long random key (e.g. `openssl rand -hex 32`; clients "
                "send 'Authorization: Bearer <key>'), or bind to VBON_HOST=127.0.0.1, or "
                "set VBON_ALLOW_NO_KEY=true to serve an open API on purpose"
            )
        return v

    @field_validator("upstreams", mode="before")
    @classmethod
    def _split_upstreams(cls, v: object) -> object:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [u for u in text.replace(",", " ").split() if u]
        return v

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, v: list[str]) -> list[str]:
        for u in v:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"upstream '{u}' must start with http:// or https://")
        return [u.rstrip("/") for u in v]
