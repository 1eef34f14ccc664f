"""OpenAI-compatible request models (/v1/completions, /v1/chat/completions).

Field names and defaults follow OpenAI's API, except the sampling defaults, which are ours
(vbon.sampling) so every path samples alike. `best_of` keeps its legacy meaning with our
reward model as the judge: draw best_of samples, return the `n` with the highest reward."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol import AdaptiveInfo, ChatMessage, Text, Usage
from vbon.sampling import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampling


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model, 'bon' / 'bon-<N>', or a vBoN adapter name.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="Extension (vLLM): 0 disables top-k.")
    n: int = Field(1, ge=1, description="Choices returned.")
    best_of: int | None = Field(None, ge=1, description="Samples drawn; the n best by reward.")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    logprobs: Any = None

    @model_validator(mode="after")
    def _check(self) -> _OpenAIBase:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.stream and (self.n > 1 or (self.best_of or 1) > 1):
            raise ValueError("stream is not supported with n > 1 or best_of > 1")
        if self.presence_penalty or self.frequency_penalty:
            raise ValueError(
                "presence_penalty and frequency_penalty are not supported: "
                "leave them at 0 (they would change the sampling distribution)"
            )
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        return self

    def _max_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(
            max_tokens=self._max_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stops),
        )


class CompletionRequest(_OpenAIBase):
    prompt: Text | list[Text] = Field(description="Text to continue (one string, or a list).")
    echo: bool = False
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompt(self) -> CompletionRequest:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("'prompt' must be a non-empty string or list of them")
        if len(prompts) > 16:
            raise ValueError("'prompt' takes at most 16 strings per request")
        if self.echo or self.suffix:
            raise ValueError("echo and suffix are not supported")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatCompletionRequest(_OpenAIBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def _max_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "vbon"
    kind: str = Field(description="base, bon, bon-adaptive or vbon")
    n: int | None = None
    beta: float | None = None
    parent: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class BoNInfo(BaseModel):
    n: int = Field(description="Samples drawn for best-of (at most, when adaptive).")
    kl_bound: float | None = Field(
        None, description="log N - (N-1)/N, the bound on KL(BoN || base); plain best-of only."
    )
    adaptive: AdaptiveInfo | None = Field(None, description="Adaptive best-of: what happened.")


class _Choice(BaseModel):
    index: int
    finish_reason: str | None
    logprobs: None = None
    reward: float | None = Field(None, description="Extension: the reward (best-of only).")


class CompletionChoice(_Choice):
    text: str


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Choice):
    message: ChatMessageOut


class _CompletionEnvelope(BaseModel):
    id: str
    created: int
    model: str
    usage: Usage
    bon: BoNInfo | None = Field(None, description="Extension: present for best-of requests.")


class CompletionResponse(_CompletionEnvelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatCompletionResponse(_CompletionEnvelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
