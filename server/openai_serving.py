"""What the OpenAI-compatible routes mean: which model answers (`resolve_target`), what
/v1/models lists, the choices of a (chat) completion, and the chunks of a streamed one. The
router in server/routers/openai.py only translates HTTP to and from these.

`model` picks what answers: the base model, BoN ('bon' with best_of, or 'bon-<N>'), adaptive
BoN ('bon-<N>-adaptive': at most N samples, the server's default early exit and pruning), or a vBoN
adapter (its name, 'vbon' for the default, 'vbon-<N>' for the adapter trained for N)."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from server.adapter_registry import AdapterVersion
from server.errors import APIError
from server.openai_protocol import (
    BoNInfo,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessageOut,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    _OpenAIBase,
)
from server.protocol import AdaptiveFields, Usage
from server.serving import Gateway, SampleStream, new_id
from vbon.bon import kl_bound
from vbon.sampling import EXTENSIONS, Sampling

BON_RE = re.compile(r"^bon-(\d+)$")
BON_ADAPTIVE_RE = re.compile(r"^bon-(\d+)-adaptive$")
VBON_RE = re.compile(r"^vbon-(\d+)$")
DEFAULT_BON_N = 8
COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"


@dataclass
class Target:
    kind: str  # "base" | "bon" | "vbon"
    n: int  # samples to draw (at most, when adaptive)
    adapter: AdapterVersion | None = None
    adaptive: bool = False  # the server's default adaptive setting (VBON_ADAPTIVE_DEFAULT)


def resolve_target(gateway: Gateway, req: _OpenAIBase) -> Target:
    model, best_of = req.model, req.best_of
    if model == gateway.model_name:
        n = best_of or req.n
        return Target("bon" if best_of and best_of > 1 else "base", n)
    if m := BON_ADAPTIVE_RE.match(model):
        n = int(m.group(1))
        if best_of is not None and best_of != n:
            raise APIError(
                400,
                f"model '{model}' means best_of={n} (at most); drop best_of or make it {n}",
                param="best_of",
            )
        if req.n != 1:
            raise APIError(
                400,
                f"model '{model}' returns one choice (its candidates stop early): n must be 1",
                param="n",
            )
        return Target("bon", n, adaptive=True)
    if model == "bon" or BON_RE.match(model):
        m = BON_RE.match(model)
        n = int(m.group(1)) if m else (best_of or DEFAULT_BON_N)
        if m and best_of and best_of != n:
            raise APIError(
                400,
                f"model '{model}' means best_of={n}; drop best_of or make it {n}",
                param="best_of",
            )
        if n < req.n:
            raise APIError(
                400, f"model '{model}' draws {n} samples, fewer than n={req.n}", param="n"
            )
        return Target("bon", n)
    try:
        if model == "vbon":
            adapter = gateway.registry.default()
        elif m := VBON_RE.match(model):
            adapter = gateway.registry.for_n(int(m.group(1)))
        else:
            adapter = gateway.registry.get(model)
    except (LookupError, ValueError):
        names = [c.id for c in list_models(gateway).data]
        raise APIError(
            404,
            f"the model '{model}' does not exist; served: {names}",
            param="model",
            code="model_not_found",
        ) from None
    n = best_of or req.n
    return Target("vbon", n, adapter)


def list_models(gateway: Gateway) -> ModelList:
    now = int(time.time())
    cards = [
        ModelCard(id=gateway.model_name, created=now, kind="base"),
        ModelCard(id="bon", created=now, kind="bon", n=DEFAULT_BON_N, parent=gateway.model_name),
    ]
    for n in (4, 8, 16, 32):
        if n <= gateway.settings.max_n:
            cards.append(
                ModelCard(id=f"bon-{n}", created=now, kind="bon", n=n, parent=gateway.model_name)
            )
    # Adaptive best-of-N needs the in-process engine.
    if gateway.settings.backend == "local":
        for n in (4, 8, 16, 32):
            if n <= gateway.settings.max_n:
                cards.append(
                    ModelCard(
                        id=f"bon-{n}-adaptive",
                        created=now,
                        kind="bon-adaptive",
                        n=n,
                        parent=gateway.model_name,
                    )
                )
    for v in gateway.registry.all():
        cards.append(
            ModelCard(
                id=v.name,
                created=now,
                kind="vbon",
                n=v.meta.n,
                beta=v.meta.beta,
                parent=gateway.model_name,
            )
        )
    # vbon-<N>: the adapter that serves N now (a user-trained one before a shipped one).
    for n in sorted(
        {v.meta.n for v in gateway.registry.all() if v.meta.method == "vbon" and v.meta.n}
    ):
        chosen = gateway.registry.for_n(n)
        cards.append(
            ModelCard(
                id=f"vbon-{n}",
                created=now,
                kind="vbon",
                n=n,
                beta=chosen.meta.beta,
                parent=chosen.name,
            )
        )
    return ModelList(data=cards)


def chat_prompt(gateway: Gateway, req: ChatCompletionRequest) -> str:
    """The chat's messages as the one prompt text the engine completes."""
    return gateway.backend.render_chat([m.model_dump() for m in req.messages])


def check_bon_sampling(sampling: Sampling, model: str) -> None:
    """Best-of-N picks among samples of the base model's own distribution (what its KL bound,
    the reward quantiles and vBoN's training assume): a request that reshapes that
    distribution is a 400, not a quietly different method."""
    if reshaping := sampling.reshaping():
        name = reshaping[0]
        raise APIError(
            400,
            f"'{name}' changes the base model's sampling distribution, which best-of-N "
            f"('{model}') draws its candidates from: leave it at {EXTENSIONS[name]!r}, or "
            "sample without best-of (the base model with best_of 1, or a vBoN adapter)",
            param=name,
        )


async def prompt_choices(
    gateway: Gateway,
    req: _OpenAIBase,
    prompt: str,
    target: Target,
    route: str,
    after: list[Callable[[], None]] | None = None,
) -> tuple[list[dict], int, int, BoNInfo | None]:
    """(choices as text/finish_reason/reward, prompt tokens, completion tokens, best-of info)
    for one prompt. What must wait until the whole response is ready (a shadow comparison of
    a vBoN answer) goes into `after`; without it, it runs now."""
    sampling = req.sampling()
    if target.kind == "bon" or (req.best_of or 1) > 1:
        check_bon_sampling(sampling, req.model)
    prompt_tokens = gateway.check_limits(prompt, sampling, target.n)
    lora = target.adapter.ref if target.adapter else None
    if target.adaptive:
        plan = gateway.adaptive_plan(AdaptiveFields(), target.n, sampling, use_default=True)
        assert plan is not None
        out = await gateway.adaptive_best_of(prompt, prompt_tokens, sampling, plan, route)
        best = out.best
        choices = [{"text": best.text, "finish_reason": best.finish_reason, "reward": best.reward}]
        info = BoNInfo(n=target.n, adaptive=gateway.adaptive_info(plan, out))
        return choices, out.prompt_tokens, out.completion_tokens, info
    if target.kind == "bon" or (req.best_of or 1) > 1:
        scored = await gateway.best_of(prompt, sampling, target.n, route, lora)
        gen = scored.generation
        picked = scored.order[: req.n]
        choices = [
            {
                "text": gen.samples[i].text,
                "finish_reason": gen.samples[i].finish_reason,
                "reward": scored.rewards[i],
            }
            for i in picked
        ]
        info = BoNInfo(n=target.n, kl_bound=kl_bound(target.n))
    else:
        gen = await gateway.generate(prompt, sampling, target.n, route, lora)
        choices = [{"text": s.text, "finish_reason": s.finish_reason} for s in gen.samples]
        info = None
        if target.adapter and (shadow := gateway.shadow_hook(prompt, sampling, target.adapter)):
            # A vBoN answer: maybe compared with BoN, once the response is ready.
            text = gen.samples[0].text
            if after is None:
                shadow(text)
            else:
                after.append(lambda: shadow(text))
    completion = sum(s.tokens for s in gen.samples)
    return choices, gen.prompt_tokens, completion, info


async def completion(
    gateway: Gateway, req: CompletionRequest, target: Target
) -> CompletionResponse:
    """POST /v1/completions without stream: every prompt's choices, in one response."""
    choices: list[CompletionChoice] = []
    p_tok, c_tok, info = 0, 0, None
    after: list[Callable[[], None]] = []  # (shadow work starts once every prompt is answered)
    async with gateway.deadline().guard():  # one limit for all the prompts together
        for prompt in req.prompts():
            cs, p, c, info = await prompt_choices(
                gateway, req, prompt, target, COMPLETIONS_ROUTE, after
            )
            choices += [CompletionChoice(index=len(choices) + i, **ch) for i, ch in enumerate(cs)]
            p_tok, c_tok = p_tok + p, c_tok + c
    for f in after:
        f()
    return CompletionResponse(
        id=new_id("cmpl"),
        created=int(time.time()),
        model=req.model,
        choices=choices,
        usage=Usage.of(p_tok, c_tok),
        bon=info,
    )


async def chat_completion(
    gateway: Gateway, req: ChatCompletionRequest, prompt: str, target: Target
) -> ChatCompletionResponse:
    """POST /v1/chat/completions without stream; `prompt`: chat_prompt(req)."""
    async with gateway.deadline().guard():
        cs, p, c, info = await prompt_choices(gateway, req, prompt, target, CHAT_ROUTE)
    return ChatCompletionResponse(
        id=new_id("chatcmpl"),
        created=int(time.time()),
        model=req.model,
        choices=[
            ChatChoice(
                index=i,
                message=ChatMessageOut(content=ch["text"]),
                finish_reason=ch["finish_reason"],
                reward=ch.get("reward"),
            )
            for i, ch in enumerate(cs)
        ],
        usage=Usage.of(p, c),
        bon=info,
    )


@dataclass
class CompletionStream:
    """One streamed (chat) completion: the admitted sample and the OpenAI chunks that carry
    it (`chat.completion.chunk` or `text_completion`)."""

    sample: SampleStream
    model: str
    chat: bool
    on_done: Callable[[str], None] | None = None  # with the whole text, once finished
    include_usage: bool = False  # stream_options: a last chunk with the usage
    continuous_usage: bool = False  # stream_options (vLLM): usage so far on every chunk
    id: str = field(init=False)
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self.envelope([choice])

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:  # (OpenAI: every chunk then has `usage`, null but the last)
            out["usage"] = self.sample.usage().model_dump() if self.continuous_usage else None
        return out

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """The chunks to send: for a chat, first one announcing the assistant's role."""
        if self.chat:
            yield self.chunk(None, None, first=True)
        text: list[str] = []
        async for d in self.sample.deltas():
            text.append(d.text)
            yield self.chunk(d.text, d.finish_reason)
        if self.include_usage:
            yield {**self.envelope([]), "usage": self.sample.usage().model_dump()}
        if self.on_done is not None:
            self.on_done("".join(text))

    async def start(self) -> None:
        await self.sample.start()

    def release(self) -> None:
        self.sample.release()


async def finished_chunks(
    resp: CompletionResponse | ChatCompletionResponse, req: _OpenAIBase
) -> AsyncIterator[dict[str, Any]]:
    """A best-of answer with stream: true, as the chunks of a stream, sent once the winner is
    chosen (no candidate is known to win before all are scored). The response is complete
    before the 200, so a busy server still answers 429 and a slow one 504 as a status."""
    chat = isinstance(resp, ChatCompletionResponse)
    base = {
        "id": resp.id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": resp.created,
        "model": resp.model,
    }
    usage = resp.usage.model_dump()
    per_chunk = {"usage": usage if req.continuous_usage else None} if req.include_usage else {}
    for c in resp.choices:
        choice: dict[str, Any] = {"index": c.index}
        if isinstance(c, ChatChoice):
            choice["delta"] = {"role": "assistant", "content": c.message.content}
        else:
            choice.update(text=c.text, logprobs=None)
        choice.update(finish_reason=c.finish_reason, reward=c.reward)
        chunk = {**base, "choices": [choice], **per_chunk}
        if resp.bon is not None:
            chunk["bon"] = resp.bon.model_dump(exclude_none=True)
        yield chunk
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage}


def open_completion_stream(
    gateway: Gateway, req: _OpenAIBase, prompt: str, target: Target, chat: bool
) -> CompletionStream:
    """A (chat) completion with stream: true, checked and admitted before the 200 (a best-of
    model's stream is `finished_chunks`: the answer is known once every candidate is scored)."""
    assert target.kind != "bon", "best-of streams are finished_chunks"
    lora = target.adapter.ref if target.adapter else None
    route = CHAT_ROUTE if chat else COMPLETIONS_ROUTE
    sampling = req.sampling()
    sample = gateway.open_stream(prompt, sampling, route, lora)
    shadow = gateway.shadow_hook(prompt, sampling, target.adapter) if target.adapter else None
    return CompletionStream(
        sample, req.model, chat, shadow, req.include_usage, req.continuous_usage
    )
