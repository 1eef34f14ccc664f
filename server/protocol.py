"""Request and response models of the gateway's own routes (/v1/bon, /v1/vbon).

Defaults for sampling come from vbon.sampling, so the gateway samples exactly like the trainer
and the evaluation. Range checks live here, so a bad field gets a 400 that names it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from vbon.sampling import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    Sampling,
)


def _encodable(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they cannot be tokenized or echoed as UTF-8,
    # so they are refused here rather than failing deep in the engine.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds invalid Unicode at position {exc.start} ({exc.reason}): send UTF-8 text"
        ) from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text


class PromptFields(BaseModel):
    """Exactly one of `prompt` (raw text, sent as is) or `messages` (a chat, formatted by the
    model's chat template with the assistant turn opened)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, description="Raw text to continue.")
    messages: list[ChatMessage] | None = Field(None, description="A chat to answer.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Tokens per sample.")
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=10.0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(DEFAULT_TOP_K, ge=0, description="0 disables top-k.")
    seed: int | None = Field(
        None, ge=0, le=2**31 - 1, description="Candidate i samples with seed + i."
    )
    stop: list[Text] | Text | None = Field(None, description="Up to 4 stop strings.")

    @model_validator(mode="after")
    def _one_prompt(self) -> PromptFields:
        if self.prompt is None and self.messages is None:
            raise ValueError("give either 'prompt' (text) or 'messages' (a chat)")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give only one of 'prompt' and 'messages', not both")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' must not be empty")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must hold at least one message")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        return self

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=tuple(stops),
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = Field(description="All samples drawn, also the ones not returned.")
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class Timings(BaseModel):
    generation_s: float
    scoring_s: float
    total_s: float


class BoNRequest(PromptFields):
    n: int = Field(8, ge=1, description="N: samples drawn from the base model.")
    return_candidates: bool = Field(False, description="Also return every candidate, ranked.")


class Candidate(BaseModel):
    index: int = Field(description="Sample index within the request (seed + index).")
    rank: int = Field(description="1 = highest reward.")
    text: str
    reward: float
    tokens: int
    # (BoN answers leave out null fields, so none of these may be required.)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    seed: int | None = Field(None, description="Absent without a request seed.")


class BoNResponse(BaseModel):
    id: str
    object: Literal["bon.completion"] = "bon.completion"
    model: str
    n: int
    text: str
    reward: float
    index: int
    seed: int | None = Field(None, description="Absent without a request seed.")
    finish_reason: str | None = None
    kl_bound: float = Field(description="log N - (N-1)/N: upper bound on KL(BoN || base).")
    candidates: list[Candidate] | None = None
    usage: Usage
    timings: Timings


class VBoNRequest(PromptFields):
    adapter: str | None = Field(None, description="Adapter name; default: the default one.")
    n: int | None = Field(None, ge=2, description="Pick the adapter trained for this N.")
    score: bool = Field(False, description="Score the sample with the reward model.")
    stream: bool = Field(False, description="Stream text deltas as server-sent events.")


class AdapterInfo(BaseModel):
    name: str
    version: int
    method: str
    n: int | None
    beta: float | None
    base_model: str
    path: str


class VBoNResponse(BaseModel):
    id: str
    object: Literal["vbon.completion"] = "vbon.completion"
    model: str
    adapter: AdapterInfo
    text: str
    reward: float | None
    seed: int | None
    finish_reason: str | None
    cumulative_logprob: float | None
    usage: Usage
    timings: Timings
