"""The generation backend the serving logic talks to: the in-process vLLM AsyncLLM here, vLLM
servers over HTTP in server/remote_backend.py (the API tests' fake is tests/fakes.py).

The serving code sees only `GenerationBackend` and the errors below; the engine is created in
the app's lifespan (`start`) and reached through app.state, never at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from vbon.sampling import Sampling

logger = logging.getLogger(__name__)


class EngineUnavailable(Exception):
    """The engine is not started, has died, or cannot take requests (-> 503)."""


class BackendError(Exception):
    """The backend failed the request in a way that is neither the client's fault nor "not
    ready" (e.g. an upstream answered with an error): answered with `status_code` and the
    error code `code`. Each backend subclasses it, so the serving code never imports one."""

    status_code: int = 502
    code: str = "backend_error"


class InvalidRequest(Exception):
    """The engine refused the request's parameters (-> 400 naming `param`): a check our request
    models missed must still be the client's 400, never a 500."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _refused(exc: Exception) -> InvalidRequest:
    return InvalidRequest(str(exc), getattr(exc, "parameter", None))


@dataclass(frozen=True)
class LoraRef:
    """A LoRA adapter version: a new version always gets a new id, so weights are never
    reloaded in place under an id that requests in flight still use."""

    name: str
    lora_id: int
    path: str


@dataclass
class Sample:
    text: str
    tokens: int
    cumulative_logprob: float | None
    finish_reason: str | None


@dataclass
class Generation:
    prompt_tokens: int
    samples: list[Sample] = field(default_factory=list)


@dataclass
class Delta:
    """One streamed piece of a single sample; the last one has finish_reason set."""

    text: str
    tokens: int
    finish_reason: str | None = None
    cumulative_logprob: float | None = None
    token_ids: list[int] = field(default_factory=list)  # this piece's tokens (local engine)


class GenerationBackend(Protocol):
    model_path: str
    max_model_len: int

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def ready(self) -> bool: ...
    def error(self) -> str | None: ...
    def fatal(self) -> str | None: ...  # broken for good: only a restart helps (liveness)
    def count_tokens(self, text: str) -> int: ...
    def render_chat(self, messages: list[dict[str, str]]) -> str: ...
    def decode(self, token_ids: list[int]) -> str: ...
    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation: ...
    def stream(
        self, prompt: str, sampling: Sampling, request_id: str, lora: LoraRef | None = None
    ) -> AsyncIterator[Delta]: ...
    async def running_requests(self) -> int: ...


class VLLMBackend:
    """vLLM's AsyncLLM in this process (its engine core runs in a child process)."""

    def __init__(self, settings: Any) -> None:
        self._settings = settings
        self.model_path = ""
        self.max_model_len = settings.max_model_len
        self._engine: Any = None
        self._tokenizer: Any = None
        self._running: set[str] = set()

    async def start(self) -> None:
        from vbon.engine import build_async_engine

        self.model_path = self._settings.resolved_model()
        # Building the engine blocks for ~40 s; keep the event loop (and /health) responsive.
        self._engine = await asyncio.to_thread(build_async_engine, self._settings, self.model_path)
        self._tokenizer = self._engine.tokenizer or self._engine.get_tokenizer()

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def ready(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def error(self) -> str | None:
        if self._engine is None:
            return "engine not started"
        if self._engine.errored:
            return "engine died; restart the server"
        return None

    def fatal(self) -> str | None:
        if self._engine is not None and self._engine.errored:
            return "the engine has died; the server must be restarted"
        return None

    def _engine_or_raise(self) -> Any:
        if self._engine is None:
            raise EngineUnavailable("the engine is still loading; retry shortly")
        if self._engine.errored:
            raise EngineUnavailable("the engine has died; the server must be restarted")
        return self._engine

    def count_tokens(self, text: str) -> int:
        # As the engine tokenizes a text prompt: with the tokenizer's special tokens (a BOS
        # for Llama-style tokenizers), so the context check matches what the engine sees.
        return len(self._tokenizer.encode(text, add_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        from vbon.prompts import render_chat

        return render_chat(self._tokenizer, messages)

    def decode(self, token_ids: list[int]) -> str:
        # As vLLM's detokenizer writes a completion (special tokens dropped).
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _lora(self, lora: LoraRef | None) -> Any:
        if lora is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora.name, lora.lora_id, lora.path)

    @contextlib.contextmanager
    def _engine_call(self, request_id: str) -> Iterator[None]:
        """Around one engine request: counted as running, and the engine's errors become ours
        (a dead engine: 503; a parameter it refuses: 400 naming it)."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        self._running.add(request_id)
        try:
            yield
        except EngineDeadError as exc:
            raise EngineUnavailable("the engine has died; the server must be restarted") from exc
        except VLLMClientError as exc:
            raise _refused(exc) from exc
        finally:
            self._running.discard(request_id)

    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from vbon.sampling import vllm_params

        engine = self._engine_or_raise()
        try:
            # logprobs=0: only the sampled tokens' log-probabilities, for cumulative_logprob.
            params = vllm_params(
                sampling, n=n, logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
            )
        except (VLLMClientError, ValueError) as exc:
            raise _refused(exc) from exc
        final = None
        with self._engine_call(request_id):
            # Cancelling this coroutine (client gone, timeout) makes vLLM abort the request.
            async for out in engine.generate(
                prompt, params, request_id, lora_request=self._lora(lora)
            ):
                final = out
        if final is None:  # pragma: no cover - vLLM always yields a final output
            raise EngineUnavailable("the engine returned no output")
        samples = [
            Sample(
                text=c.text,
                tokens=len(c.token_ids),
                cumulative_logprob=c.cumulative_logprob,
                finish_reason=c.finish_reason,
            )
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]
        return Generation(prompt_tokens=len(final.prompt_token_ids or []), samples=samples)

    async def stream(
        self, prompt: str, sampling: Sampling, request_id: str, lora: LoraRef | None = None
    ) -> AsyncIterator[Delta]:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind

        from vbon.sampling import vllm_params

        engine = self._engine_or_raise()
        try:
            params = vllm_params(sampling, n=1, output_kind=RequestOutputKind.DELTA)
        except (VLLMClientError, ValueError) as exc:
            raise _refused(exc) from exc
        # aclosing: when our consumer closes this stream (an adaptive request pruning a
        # candidate), vLLM's generator is closed at once, and it aborts the request in the
        # engine (freeing its KV blocks) before we return, not whenever it is collected.
        stream = engine.generate(prompt, params, request_id, lora_request=self._lora(lora))
        with self._engine_call(request_id):
            async with contextlib.aclosing(stream):
                async for out in stream:
                    c = out.outputs[0]
                    yield Delta(
                        text=c.text,
                        tokens=len(c.token_ids),
                        finish_reason=c.finish_reason,
                        cumulative_logprob=c.cumulative_logprob,
                        token_ids=list(c.token_ids),
                    )

    async def load_lora(self, lora: LoraRef) -> None:
        """Load an adapter version into the engine now, so a bad one fails at install time
        rather than on a user's request."""
        await self._engine_or_raise().add_lora(self._lora(lora))

    async def running_requests(self) -> int:
        if self._engine is None:
            return 0
        return int(self._engine.get_num_unfinished_requests())
