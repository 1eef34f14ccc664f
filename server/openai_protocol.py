"""OpenAI-compatible request models (/v1/completions, /v1/chat/completions).

Field names and defaults follow OpenAI's API, except the sampling defaults, which are ours
(vbon.sampling) so every path samples alike. `best_of` keeps its legacy meaning with our
reward model as the judge: draw best_of samples, return the `n` with the highest reward."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.protocol import (
    AdaptiveInfo,
    ChatMessage,
    StreamOptions,
    Text,
    Usage,
    check_stream_options,
    usage_options,
)
from vbon.sampling import DEFAULT_MAX_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, Sampling

# vLLM's other request extensions: accepted at their neutral value (clients written for `vllm
# serve` send some of them always), refused otherwise, since nothing here would honour them.
UNSERVED: dict[str, object] = {
    "use_beam_search": False,
    "stop_token_ids": None,
    "length_penalty": 1.0,
    "logit_bias": None,
    "allowed_token_ids": None,
    "bad_words": None,
    "prompt_logprobs": None,
    "top_logprobs": None,
    "truncate_prompt_tokens": None,
    "structured_outputs": None,
    "guided_json": None,
    "guided_regex": None,
    "guided_choice": None,
    "guided_grammar": None,
    "response_format": None,
    "logits_processors": None,
    "return_tokens_as_token_ids": False,
    "return_token_ids": False,
    "vllm_xargs": None,
    "kv_transfer_params": None,
    "tools": None,
    "tool_choice": None,
    "priority": 0,
}


def _neutral(name: str, value: object) -> bool:
    if value is None or value == UNSERVED[name] or value in ({}, []):
        return True
    if name == "response_format":  # {"type": "text"} is the default format
        return isinstance(value, dict) and value.get("type") == "text"
    if name == "top_logprobs":  # 0: none asked for
        return value == 0
    return name == "tool_choice" and value == "none"


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model, 'bon' / 'bon-<N>', or a vBoN adapter name.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(DEFAULT_TEMPERATURE, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(DEFAULT_TOP_P, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(1, ge=1, description="Choices returned.")
    best_of: int | None = Field(None, ge=1, description="Samples drawn; the n best by reward.")
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Not with best-of models."
    )
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False, description="Not with best-of models."
    )
    logprobs: Any = None
    # -- vLLM's sampling extensions, as `vllm serve` takes them (bounds: vLLM's own) --------
    top_k: int = Field(0, ge=-1, description="Extension (vLLM): 0 or -1 disables top-k.")
    min_p: float = Field(
        0.0, ge=0.0, le=1.0, allow_inf_nan=False,
        description="Extension (vLLM); not with best-of models.",
    )
    repetition_penalty: float = Field(
        1.0, gt=0.0, allow_inf_nan=False,
        description="Extension (vLLM): 1 is none; not with best-of models.",
    )
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM): no end before this many.")
    ignore_eos: bool = Field(False, description="Extension (vLLM): generate max_tokens tokens.")
    include_stop_str_in_output: bool = Field(False, description="Extension (vLLM).")
    skip_special_tokens: bool = Field(True, description="Extension (vLLM).")
    spaces_between_special_tokens: bool = Field(True, description="Extension (vLLM).")
    # Request metadata vLLM accepts; it changes nothing here.
    request_id: str | None = Field(None, description="Extension (vLLM): ignored.")
    cache_salt: str | None = Field(None, description="Extension (vLLM): ignored.")
    # vLLM's extensions this server does not honour: accepted only at their neutral value.
    use_beam_search: bool = False
    # (vLLM does not check stop_token_ids against the vocabulary, and with min_tokens an id
    # past it indexes outside the logits: an engine crash rather than a 400.)
    stop_token_ids: list[int] | None = None
    length_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    top_logprobs: int | None = None
    truncate_prompt_tokens: int | None = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: Any = None
    logits_processors: Any = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    vllm_xargs: dict[str, Any] | None = None
    kv_transfer_params: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    priority: int = 0

    @model_validator(mode="after")
    def _check(self) -> _OpenAIBase:
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.stream and (self.n > 1 or (self.best_of or 1) > 1):
            raise ValueError("stream is not supported with n > 1 or best_of > 1")
        check_stream_options(self.stream, self.stream_options)
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs are not supported by this server")
        for name in UNSERVED:
            if not _neutral(name, getattr(self, name)):
                raise ValueError(
                    f"'{name}' is not supported by this server: leave it out "
                    f"(or at {UNSERVED[name]!r})"
                )
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("'stop' takes at most 4 non-empty strings")
        if self.min_tokens > self._max_tokens():
            raise ValueError(
                f"'min_tokens' ({self.min_tokens}) must be <= max_tokens ({self._max_tokens()})"
            )
        return self

    def _max_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return Sampling(
            max_tokens=self._max_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            stop=tuple(stops),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    @property
    def include_usage(self) -> bool:
        return usage_options(self.stream_options)[0]

    @property
    def continuous_usage(self) -> bool:
        return usage_options(self.stream_options)[1]


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
        if self.stream and len(prompts) > 1:
            raise ValueError("stream takes one 'prompt' string: send one request per prompt")
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
