"""Typed HTTP clients for the vbon gateway, sync (`Client`) and async (`AsyncClient`).

    from clients import Client
    with Client("http://127.0.0.1:8000") as c:
        best = c.bon(messages=[{"role": "user", "content": "..."}], n=8)
        print(best.text, best.reward)

Both retry 429 (busy) and 503 (engine loading) with exponential backoff, waiting at least what
the server's Retry-After asks; every other error raises at once with the server's message.

Layout (the httpx way): each route is built once, by a module-level function that returns a
`_Request` (method, path, JSON body, how to read the answer); `_BaseClient` holds what both clients
share (settings, auth headers, the retry decision); `Client` and `AsyncClient` only send, blocking
or awaited, so each public method is: build the request, send it, read the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from clients.errors import (
    APIError,
    ConnectionFailed,
    ProtocolError,
    RequestTimedOut,
    ServerError,
    error_class,
)
from clients.settings import ClientSettings
from clients.types import BoNResult, Completion, ModelList, Ready, VBoNChunk, VBoNResult

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def default_url() -> str:
    return ClientSettings().url


@dataclass
class RetryPolicy:
    """Retry `statuses` up to `max_retries` times. The wait before retry k (0-based) is
    max(Retry-After, backoff_s * 2**k * jitter in [0.5, 1]), capped at max_wait_s."""

    max_retries: int = 3
    backoff_s: float = 0.5
    max_wait_s: float = 30.0
    statuses: frozenset[int] = field(default_factory=lambda: frozenset({429, 503}))

    def wait_s(self, attempt: int, retry_after: float | None) -> float:
        backoff = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.0)
        return min(self.max_wait_s, max(backoff, retry_after or 0.0))


# -- errors: status -> typed exception -------------------------------------------------------
def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (either delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def api_error(resp: httpx.Response) -> APIError:
    """The server's error (OpenAI shape) as an exception carrying its message."""
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("message"):
        message = str(err["message"])
        etype, param, code = err.get("type"), err.get("param"), err.get("code")
    else:
        text = resp.text.strip().replace("\n", " ")[:200]
        message = f"HTTP {resp.status_code} {resp.reason_phrase}" + (f": {text}" if text else "")
        etype = param = code = None
    return error_class(resp.status_code)(
        resp.status_code,
        message,
        type=etype,
        param=param,
        code=code,
        retry_after=retry_after,
        body=body,
    )


def _stream_error(data: dict[str, Any]) -> APIError:
    err = data.get("error") or {}
    status = {"timeout_error": 504, "service_unavailable": 503, "rate_limit_error": 429}.get(
        err.get("type"), 500
    )
    cls = error_class(status) if status != 500 else ServerError
    return cls(status, str(err.get("message", "stream failed")), type=err.get("type"))


def _transport_error(exc: httpx.HTTPError, url: str) -> Exception:
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimedOut(f"no answer from {url} within the timeout ({type(exc).__name__})")
    if isinstance(exc, httpx.ConnectError | httpx.RemoteProtocolError | httpx.ReadError):
        return ConnectionFailed(
            f"cannot reach the gateway at {url} ({exc or type(exc).__name__}): "
            "is it running? start it with `python -m server` or pass --url"
        )
    return ConnectionFailed(f"request to {url} failed: {type(exc).__name__}: {exc}")


# -- reading answers: JSON -> result types, server-sent events -> events ---------------------
def _json(resp: httpx.Response) -> Any:
    return resp.json()


def _text(resp: httpx.Response) -> str:
    return resp.text


def _as_is(event: Any) -> Any:
    return event


def _model(model: type[M]) -> Callable[[httpx.Response], M]:
    """A reader validating the JSON answer as `model`; anything else is a ProtocolError."""

    def read(resp: httpx.Response) -> M:
        try:
            return model.model_validate(resp.json())
        except ValueError as exc:
            raise ProtocolError(
                f"unexpected answer from {resp.request.url}: {str(exc)[:300]}"
            ) from exc

    return read


_DONE = object()  # the `data: [DONE]` that ends a stream


def _sse_event(line: str) -> Any:
    """One line of a server-sent event stream: None (not data), _DONE (the end) or the event's
    JSON; an error event raises as the APIError it names."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return _DONE
    obj = json.loads(data)
    if isinstance(obj, dict) and "error" in obj:
        raise _stream_error(obj)
    return obj


# -- building requests: one function per route, shared by both clients -----------------------
@dataclass(frozen=True)
class _Request(Generic[T]):
    """One API call: what to send, which statuses are answers and how to `read` the answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    body: dict[str, Any] | None = None
    admin: bool = False  # authenticate with the admin key
    ok: tuple[int, ...] = (200,)

    def streamed(self) -> _Request[T]:
        """The same call asking for server-sent events ("stream": true in the body)."""
        return dataclasses.replace(self, body={**(self.body or {}), "stream": True})


@dataclass(frozen=True)
class _Sampling:
    """The sampling keywords every generating route takes, stated once (the public methods pass
    them positionally, in this order); None is left out of the body: the server's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None

    def body(self) -> dict[str, Any]:
        return _drop_none(dataclasses.asdict(self))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _prompt_fields(prompt: str | None, messages: list[dict[str, str]] | None) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text) or messages (a chat)")
    return {"prompt": prompt} if prompt is not None else {"messages": messages}


def _adaptive_fields(adaptive: bool | dict[str, Any] | None) -> dict[str, Any]:
    """The body fields for bon's `adaptive` (see `Client.bon`)."""
    if adaptive is None or adaptive is False:
        return {}
    if adaptive is True:
        return {"adaptive": True}
    return _drop_none(dict(adaptive))


_HEALTH = _Request("GET", "/health", _json, ok=(200, 503))
_READY = _Request("GET", "/ready", _model(Ready), ok=(200, 503))
_METRICS = _Request("GET", "/metrics", _text)
_MODELS = _Request("GET", "/v1/models", _model(ModelList))
_RELOAD_ADAPTERS = _Request("POST", "/admin/adapters/reload", _json, admin=True)


def _bon(
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    n: int,
    return_candidates: bool,
    sampling: _Sampling,
    adaptive: bool | dict[str, Any] | None,
) -> _Request[BoNResult]:
    body = {
        **_prompt_fields(prompt, messages),
        "n": n,
        "return_candidates": return_candidates,
        **sampling.body(),
        **_adaptive_fields(adaptive),
    }
    return _Request("POST", "/v1/bon", _model(BoNResult), body)


def _vbon(
    prompt: str | None,
    messages: list[dict[str, str]] | None,
    adapter: str | None,
    n: int | None,
    score: bool,
    sampling: _Sampling,
) -> _Request[VBoNResult]:
    body = {
        **_prompt_fields(prompt, messages),
        **_drop_none({"adapter": adapter, "n": n}),
        "score": score,
        "stream": False,
        **sampling.body(),
    }
    return _Request("POST", "/v1/vbon", _model(VBoNResult), body)


def _completions(
    model: str, prompt: str | list[str], fields: dict[str, Any]
) -> _Request[Completion]:
    body = {"model": model, "prompt": prompt, **_drop_none(fields)}
    return _Request("POST", "/v1/completions", _model(Completion), body)


def _chat_completions(
    model: str, messages: list[dict[str, str]], fields: dict[str, Any]
) -> _Request[Completion]:
    body = {"model": model, "messages": messages, **_drop_none(fields)}
    return _Request("POST", "/v1/chat/completions", _model(Completion), body)


# -- the clients ------------------------------------------------------------------------------
class _BaseClient:
    """What the sync and async clients share: settings, building the HTTP request (auth header
    included) and the retry decision. The subclasses add only the sending."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        admin_key: str | None,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        env = ClientSettings()
        self.api_key = api_key if api_key is not None else env.api_key
        self.admin_key = admin_key if admin_key is not None else env.admin_key
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.retries_done = 0  # total retries made by this client (the benchmark reports it)

    def _build(self, req: _Request[Any]) -> httpx.Request:
        key = self.admin_key if req.admin else self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self._http.build_request(req.method, req.path, json=req.body, headers=headers)

    def _retry_wait(self, resp: httpx.Response, attempt: int) -> float:
        """How long to wait before retrying this error answer (already read); raises its
        APIError when it is not to be retried (any other status, or retries used up)."""
        err = api_error(resp)
        if resp.status_code in self.retry.statuses and attempt < self.retry.max_retries:
            return self.retry.wait_s(attempt, err.retry_after)
        raise err


class Client(_BaseClient):
    """Blocking client. `sleep` is injectable for tests of the retry policy."""

    _http: httpx.Client

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(url, api_key, admin_key, timeout, retry)
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)
        self._sleep = sleep

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------------------
    def _send(self, req: _Request[Any], stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = self._http.send(self._build(req), stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self.url) from exc
            if resp.status_code in req.ok:
                return resp
            if stream:
                resp.read()
                resp.close()
            self._sleep(self._retry_wait(resp, attempt))
            attempt += 1
            self.retries_done += 1

    def _call(self, req: _Request[T]) -> T:
        return req.read(self._send(req))

    def _stream(self, req: _Request[Any], read: Callable[[Any], T]) -> Iterator[T]:
        """Send `req` streamed; `read` turns each event's JSON into what is yielded."""
        resp = self._send(req.streamed(), stream=True)
        try:
            for line in resp.iter_lines():
                event = _sse_event(line)
                if event is _DONE:
                    return
                if event is not None:
                    yield read(event)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        finally:
            resp.close()

    # -- routes -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Liveness: {"status": "ok"}, or {"status": "failed", "reason": ...} (a 503) when the
        server's start-up failed for good."""
        return self._call(_HEALTH)

    def ready(self) -> Ready:
        """Readiness; a 503 (still loading) is an answer here, not an error."""
        return self._call(_READY)

    def metrics(self) -> str:
        """The Prometheus metrics page, as text."""
        return self._call(_METRICS)

    def models(self) -> ModelList:
        """The models the gateway serves (OpenAI /v1/models; `.ids()` lists their ids)."""
        return self._call(_MODELS)

    def bon(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        n: int = 8,
        return_candidates: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        adaptive: bool | dict[str, Any] | None = None,
    ) -> BoNResult:
        """Best-of-N (/v1/bon) for a `prompt` (text) or `messages` (a chat): n samples, the one
        the reward model ranks highest returned. `adaptive`: True for the server's default
        adaptive setting, or a dict of adaptive fields (wave, stop_at_reward, stop_at_quantile,
        prune={"at_tokens": [...], "keep": f}). Sampling keywords left None take the server's
        defaults."""
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        return self._call(_bon(prompt, messages, n, return_candidates, s, adaptive))

    def vbon(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        n: int | None = None,
        score: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> VBoNResult:
        """One sample from a vBoN adapter (/v1/vbon): `adapter` by name, or the one trained for
        `n`, else the server's default; `score` also asks the reward model for its reward."""
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        return self._call(_vbon(prompt, messages, adapter, n, score, s))

    def vbon_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        n: int | None = None,
        score: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> Iterator[VBoNChunk]:
        """`vbon` streamed: text chunks as generated; the last carries finish_reason (and the
        reward when scored)."""
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        req = _vbon(prompt, messages, adapter, n, score, s)
        yield from self._stream(req, VBoNChunk.model_validate)

    def completions(self, model: str, prompt: str | list[str], **fields: Any) -> Completion:
        """OpenAI /v1/completions; `fields` are OpenAI's (max_tokens, best_of, n, seed, ...)."""
        return self._call(_completions(model, prompt, fields))

    def chat_completions(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Completion:
        """OpenAI /v1/chat/completions; `fields` are OpenAI's (max_tokens, best_of, n, ...)."""
        return self._call(_chat_completions(model, messages, fields))

    def chat_completions_stream(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Iterator[dict[str, Any]]:
        """`chat_completions` streamed: OpenAI's chunk objects, as dicts."""
        yield from self._stream(_chat_completions(model, messages, fields), _as_is)

    def reload_adapters(self) -> dict[str, Any]:
        """POST /admin/adapters/reload (needs the admin key)."""
        return self._call(_RELOAD_ADAPTERS)


class AsyncClient(_BaseClient):
    """The same API for asyncio: `async with AsyncClient(url) as c: await c.bon(...)`; each
    method is documented on `Client`."""

    _http: httpx.AsyncClient

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 300.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        super().__init__(url, api_key, admin_key, timeout, retry)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, transport=transport, limits=limits
        )
        self._sleep = sleep

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport --------------------------------------------------------------------------
    async def _send(self, req: _Request[Any], stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                resp = await self._http.send(self._build(req), stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self.url) from exc
            if resp.status_code in req.ok:
                return resp
            if stream:
                await resp.aread()
                await resp.aclose()
            await self._sleep(self._retry_wait(resp, attempt))
            attempt += 1
            self.retries_done += 1

    async def _call(self, req: _Request[T]) -> T:
        return req.read(await self._send(req))

    async def _stream(self, req: _Request[Any], read: Callable[[Any], T]) -> AsyncIterator[T]:
        """Send `req` streamed; `read` turns each event's JSON into what is yielded."""
        resp = await self._send(req.streamed(), stream=True)
        try:
            async for line in resp.aiter_lines():
                event = _sse_event(line)
                if event is _DONE:
                    return
                if event is not None:
                    yield read(event)
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        finally:
            await resp.aclose()

    # -- routes (documented on Client) ------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._call(_HEALTH)

    async def ready(self) -> Ready:
        return await self._call(_READY)

    async def metrics(self) -> str:
        return await self._call(_METRICS)

    async def models(self) -> ModelList:
        return await self._call(_MODELS)

    async def bon(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        n: int = 8,
        return_candidates: bool = False,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        adaptive: bool | dict[str, Any] | None = None,
    ) -> BoNResult:
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        return await self._call(_bon(prompt, messages, n, return_candidates, s, adaptive))

    async def vbon(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        n: int | None = None,
        score: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> VBoNResult:
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        return await self._call(_vbon(prompt, messages, adapter, n, score, s))

    async def vbon_stream(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        adapter: str | None = None,
        n: int | None = None,
        score: bool = True,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> AsyncIterator[VBoNChunk]:
        s = _Sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        req = _vbon(prompt, messages, adapter, n, score, s)
        async for chunk in self._stream(req, VBoNChunk.model_validate):
            yield chunk

    async def completions(self, model: str, prompt: str | list[str], **fields: Any) -> Completion:
        return await self._call(_completions(model, prompt, fields))

    async def chat_completions(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Completion:
        return await self._call(_chat_completions(model, messages, fields))

    async def chat_completions_stream(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._stream(_chat_completions(model, messages, fields), _as_is):
            yield chunk

    async def reload_adapters(self) -> dict[str, Any]:
        return await self._call(_RELOAD_ADAPTERS)
