"""Request and response models of the gateway's own routes (/v1/bon, /v1/vbon).

Defaults for sampling come from vbon.sampling, so the gateway samples exactly like the trainer
and the evaluation. Range checks live here, so a bad field gets a 400 that names it."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

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


class TextPart(BaseModel):
    """An OpenAI content part; only text ones (a text-only model has no use for the others)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="'text' (images, audio, files: not supported).")
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart] = Field(
        description="The text, or OpenAI content parts of type 'text' (joined into one text)."
    )

    @field_validator("content")
    @classmethod
    def _join_parts(cls, v: str | list[TextPart]) -> str:
        # Clients written for OpenAI (and vLLM's bench) send parts; the template takes text.
        return v if isinstance(v, str) else "".join(p.text for p in v)


class PromptFields(BaseModel):
    """Exactly one of `prompt` (raw text, sent as is) or `messages` (a chat, formatted by the
    model's chat template with the assistant turn opened)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | None = Field(None, description="Raw text to continue.")
    messages: list[ChatMessage] | None = Field(None, description="A chat to answer.")
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, description="Tokens per sample.")
    # vLLM refuses temperatures above 2; the bound here must be the engine's.
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(DEFAULT_TOP_K, ge=-1, description="0 (or -1, as in vLLM) disables top-k.")
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
            top_k=max(self.top_k, 0),
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


class Prune(BaseModel):
    """Pruning: at each checkpoint the running candidates' partial completions are scored and
    only the best `keep` fraction of them goes on; the others are aborted in the engine."""

    model_config = ConfigDict(extra="forbid")

    at_tokens: list[int] = Field(
        min_length=1,
        max_length=8,
        description="Checkpoints in generated tokens, increasing, each below max_tokens.",
    )
    keep: float = Field(
        allow_inf_nan=False,
        description="Fraction of the running candidates kept at each checkpoint (at least 1), "
        "0 < keep < 1.",
    )

    @field_validator("keep")
    @classmethod
    def _keep(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"keep is {v}; allowed: 0 < keep < 1")
        return v

    @model_validator(mode="after")
    def _increasing(self) -> Prune:
        if any(t < 1 for t in self.at_tokens):
            raise ValueError(f"at_tokens holds token counts >= 1, got {self.at_tokens}")
        if any(b <= a for a, b in zip(self.at_tokens, self.at_tokens[1:], strict=False)):
            raise ValueError(f"at_tokens must be strictly increasing, got {self.at_tokens}")
        return self


class AdaptiveFields(BaseModel):
    """Adaptive best-of-N (see server/adaptive.py): early exit and pruning."""

    model_config = ConfigDict(extra="forbid")

    wave: int | None = Field(
        None, ge=1,
        description="Candidates started together; the next wave starts only if no finished "
        "candidate reached the target. Default with a target: the server's default wave.",
    )
    stop_at_reward: float | None = Field(
        None, allow_inf_nan=False,
        description="Early exit: stop after the first wave holding a candidate with at least "
        "this reward (within the reward model's range).",
    )
    stop_at_quantile: float | None = Field(
        None, gt=0.0, lt=1.0, allow_inf_nan=False,
        description="Early exit with the target given as this quantile of the base model's "
        "reward distribution (needs VBON_REWARD_REFERENCE).",
    )
    prune: Prune | None = Field(None, description="Prune low partial rewards at checkpoints.")

    def given(self) -> list[str]:
        return [f for f in ("wave", "stop_at_reward", "stop_at_quantile", "prune")
                if getattr(self, f) is not None]


class BoNRequest(PromptFields, AdaptiveFields):
    n: int = Field(8, ge=1, description="N: samples drawn from the base model (at most).")
    return_candidates: bool = Field(False, description="Also return every candidate, ranked.")
    adaptive: bool = Field(
        False,
        description="Use the server's default adaptive setting (VBON_ADAPTIVE_DEFAULT) for the "
        "adaptive fields this request leaves out.",
    )

    # (Checks that need n, max_tokens or the server's settings are in server/adaptive.py's
    # resolve_plan, so that each 400 names its field.)


class PartialReward(BaseModel):
    tokens: int = Field(description="Checkpoint: the prefix's length in generated tokens.")
    reward: float


class Candidate(BaseModel):
    index: int = Field(description="Sample index within the request (seed + index).")
    rank: int = Field(description="1 = highest reward (finished candidates before pruned).")
    text: str = Field(description="The completion; for a pruned one, the prefix judged.")
    reward: float = Field(description="Reward of `text`.")
    tokens: int = Field(description="Tokens generated (a pruned one's include those after the "
                        "checkpoint that the engine made before the abort took effect).")
    # (BoN answers leave out null fields, so none of these may be required.)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    seed: int | None = Field(None, description="Absent without a request seed.")
    stopped: Literal["finished", "pruned"] | None = Field(
        None, description="Adaptive requests: finished, or pruned at a checkpoint."
    )
    wave: int | None = Field(None, description="Adaptive requests: the wave it ran in (0-based).")
    partial_rewards: list[PartialReward] | None = Field(
        None, description="Adaptive requests: the reward of its prefix at each checkpoint."
    )


class AdaptiveInfo(BaseModel):
    stop_reason: Literal["target_reached", "n_exhausted"] = Field(
        description="target_reached: a wave held a candidate at or over the target; "
        "n_exhausted: all N were drawn (or no target was set)."
    )
    samples: int = Field(description="Candidates started (<= n).")
    waves: int
    pruned: int = Field(description="Candidates aborted at a checkpoint.")
    target: float | None = Field(None, description="The reward target used, if any.")
    wave_size: int
    prune: Prune | None = None


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
    kl_bound: float | None = Field(
        None,
        description="log N - (N-1)/N: upper bound on KL(BoN || base); plain best-of-N only.",
    )
    adaptive: AdaptiveInfo | None = Field(None, description="Adaptive requests: what happened.")
    candidates: list[Candidate] | None = None
    usage: Usage
    timings: Timings


class StreamOptions(BaseModel):
    """OpenAI's `stream_options` (with vLLM's `continuous_usage_stats`)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = Field(
        False, description="End the stream with a chunk holding the whole request's usage."
    )
    continuous_usage_stats: bool | None = Field(
        False, description="Extension (vLLM): with include_usage, usage so far on every chunk."
    )


def usage_options(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a last chunk with the request's usage, the usage so far on every chunk)."""
    include = bool(options and options.include_usage)
    return include, bool(include and options and options.continuous_usage_stats)


def check_stream_options(stream: bool, options: StreamOptions | None) -> None:
    if options is not None and not stream:  # (as vLLM and OpenAI answer it)
        raise ValueError("'stream_options' can only be given with stream: true")


class VBoNRequest(PromptFields):
    adapter: str | None = Field(None, description="Adapter name; default: the default one.")
    n: int | None = Field(None, ge=2, description="Pick the adapter trained for this N.")
    score: bool = Field(False, description="Score the sample with the reward model.")
    stream: bool = Field(False, description="Stream text deltas as server-sent events.")
    stream_options: StreamOptions | None = Field(
        None, description="With stream: include_usage adds a last chunk with the usage."
    )

    @model_validator(mode="after")
    def _stream_options(self) -> VBoNRequest:
        check_stream_options(self.stream, self.stream_options)
        return self


class AdapterInfo(BaseModel):
    name: str
    version: int
    method: str
    n: int | None
    beta: float | None
    base_model: str  # (no `path`: responses never show the server's file system)


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
