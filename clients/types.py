"""Typed views of the gateway's responses. They mirror the server's schema (see /docs) but are
defined here, since apps talk HTTP and never import each other; unknown fields are kept so a
newer server does not break an older client."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(_Model):
    generation_s: float
    scoring_s: float
    total_s: float


class Candidate(_Model):
    index: int
    rank: int
    text: str
    reward: float
    tokens: int
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    seed: int | None = None
    stopped: str | None = None  # adaptive: "finished" or "pruned"
    wave: int | None = None
    partial_rewards: list[dict[str, float]] | None = None  # [{"tokens", "reward"}]


class AdaptiveInfo(_Model):
    stop_reason: str
    samples: int
    waves: int
    pruned: int
    target: float | None = None
    wave_size: int
    prune: dict[str, Any] | None = None


class BoNResult(_Model):
    id: str
    model: str
    n: int
    text: str
    reward: float
    index: int
    seed: int | None = None
    finish_reason: str | None = None
    kl_bound: float | None = None  # plain best-of-N only
    adaptive: AdaptiveInfo | None = None
    candidates: list[Candidate] | None = None
    usage: Usage
    timings: Timings


class AdapterInfo(_Model):
    name: str
    version: int
    method: str
    n: int | None = None
    beta: float | None = None
    base_model: str


class VBoNResult(_Model):
    id: str
    model: str
    adapter: AdapterInfo
    text: str
    reward: float | None = None
    seed: int | None = None
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    usage: Usage
    timings: Timings


class VBoNChunk(_Model):
    """One server-sent event of a streamed /v1/vbon answer."""

    id: str
    adapter: AdapterInfo
    text: str
    finish_reason: str | None = None
    reward: float | None = None


class ModelCard(_Model):
    id: str
    kind: str | None = None
    n: int | None = None
    beta: float | None = None
    parent: str | None = None


class ModelList(_Model):
    data: list[ModelCard]

    def ids(self) -> list[str]:
        return [m.id for m in self.data]


class CompletionChoice(_Model):
    index: int
    text: str | None = None
    message: dict[str, Any] | None = None
    finish_reason: str | None = None
    reward: float | None = None

    @property
    def content(self) -> str:
        if self.message is not None:
            return str(self.message.get("content") or "")
        return self.text or ""


class Completion(_Model):
    """/v1/completions and /v1/chat/completions (OpenAI shape, plus `bon` for best-of)."""

    id: str
    object: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    bon: dict[str, Any] | None = None


class Ready(_Model):
    ready: bool
    reason: str | None = None
    engine: dict[str, Any] | None = None
    reward: dict[str, Any] | None = None
    adapters: list[dict[str, Any]] = []
    refused_adapters: dict[str, str] = {}
