"""Typed HTTP clients for the vbon gateway, sync (`Client`) and async (`AsyncClient`).

    from clients import Client
    with Client("http://127.0.0.1:8000") as c:
        best = c.bon(messages=[{"role": "user", "content": "..."}], n=8)
        print(best.text, best.reward)

Both retry 429 (busy) and 503 (engine loading) with exponential backoff, waiting at least what
the server's Retry-After asks; every other error raises at once with the server's message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from clients.errors import (
    APIError,
    ConnectionFailed,
    ProtocolError,
    RequestTimedOut,
    ServerError,
    error_class,
)
from clients.types import BoNResult, Completion, ModelList, Ready, VBoNChunk, VBoNResult

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    return os.environ.get("VBON_URL", DEFAULT_URL)


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


def _prompt_fields(prompt: str | None, messages: list[dict[str, str]] | None) -> dict[str, Any]:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt (text) or messages (a chat)")
    return {"prompt": prompt} if prompt is not None else {"messages": messages}


def _adaptive_fields(adaptive: bool | dict[str, Any] | None) -> dict[str, Any]:
    """`adaptive`: True for the server's default adaptive setting, or a dict of the adaptive
    fields (wave, stop_at_reward, stop_at_quantile, prune={"at_tokens": [...], "keep": f})."""
    if adaptive is None or adaptive is False:
        return {}
    if adaptive is True:
        return {"adaptive": True}
    return _drop_none(dict(adaptive))


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _sse_data(line: str) -> str | None:
    return line[5:].strip() if line.startswith("data:") else None


class _Requests:
    """Request bodies and response parsing shared by the sync and async clients."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        admin_key: str | None,
        timeout: float,
        retry: RetryPolicy | None,
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("VBON_API_KEY")
        self.admin_key = admin_key if admin_key is not None else os.environ.get("VBON_ADMIN_KEY")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.retries_done = 0  # total retries made by this client (the benchmark reports it)

    def headers(self, admin: bool = False) -> dict[str, str]:
        key = self.admin_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    @staticmethod
    def bon_body(
        prompt, messages, n, return_candidates, sampling, adaptive=None
    ) -> dict[str, Any]:
        return {
            **_prompt_fields(prompt, messages),
            "n": n,
            "return_candidates": return_candidates,
            **_drop_none(sampling),
            **_adaptive_fields(adaptive),
        }

    @staticmethod
    def vbon_body(prompt, messages, adapter, n, score, stream, sampling) -> dict[str, Any]:
        return {
            **_prompt_fields(prompt, messages),
            **_drop_none({"adapter": adapter, "n": n}),
            "score": score,
            "stream": stream,
            **_drop_none(sampling),
        }

    @staticmethod
    def parse(model: Any, resp: httpx.Response) -> Any:
        try:
            return model.model_validate(resp.json())
        except ValueError as exc:
            raise ProtocolError(
                f"unexpected answer from {resp.request.url}: {str(exc)[:300]}"
            ) from exc


def _sampling(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: str | list[str] | None,
) -> dict[str, Any]:
    return {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop,
    }


class Client(_Requests):
    """Blocking client. `sleep` is injectable for tests of the retry policy."""

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
    def _send(
        self, method: str, path: str, *, json_body=None, admin=False, stream=False, ok=(200,)
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                req = self._http.build_request(
                    method, path, json=json_body, headers=self.headers(admin)
                )
                resp = self._http.send(req, stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self.url) from exc
            if resp.status_code in ok:
                return resp
            if stream:
                resp.read()
                resp.close()
            err = api_error(resp)
            if resp.status_code in self.retry.statuses and attempt < self.retry.max_retries:
                self._sleep(self.retry.wait_s(attempt, err.retry_after))
                attempt += 1
                self.retries_done += 1
                continue
            raise err

    def _sse(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        resp = self._send("POST", path, json_body=body, stream=True)
        try:
            for line in resp.iter_lines():
                data = _sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if isinstance(obj, dict) and "error" in obj:
                    raise _stream_error(obj)
                yield obj
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        finally:
            resp.close()

    # -- routes -----------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """Liveness: {"status": "ok"}, or {"status": "failed", "reason": ...} (a 503) when the
        server's start-up failed for good."""
        return self._send("GET", "/health", ok=(200, 503)).json()

    def ready(self) -> Ready:
        """Readiness; a 503 (still loading) is an answer here, not an error."""
        return self.parse(Ready, self._send("GET", "/ready", ok=(200, 503)))

    def metrics(self) -> str:
        return self._send("GET", "/metrics").text

    def models(self) -> ModelList:
        return self.parse(ModelList, self._send("GET", "/v1/models"))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.bon_body(prompt, messages, n, return_candidates, s, adaptive)
        return self.parse(BoNResult, self._send("POST", "/v1/bon", json_body=body))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.vbon_body(prompt, messages, adapter, n, score, False, s)
        return self.parse(VBoNResult, self._send("POST", "/v1/vbon", json_body=body))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.vbon_body(prompt, messages, adapter, n, score, True, s)
        for obj in self._sse("/v1/vbon", body):
            yield VBoNChunk.model_validate(obj)

    def completions(self, model: str, prompt: str | list[str], **fields: Any) -> Completion:
        """OpenAI /v1/completions; `fields` are OpenAI's (max_tokens, best_of, n, seed, ...)."""
        body = {"model": model, "prompt": prompt, **_drop_none(fields)}
        return self.parse(Completion, self._send("POST", "/v1/completions", json_body=body))

    def chat_completions(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Completion:
        body = {"model": model, "messages": messages, **_drop_none(fields)}
        return self.parse(Completion, self._send("POST", "/v1/chat/completions", json_body=body))

    def chat_completions_stream(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Iterator[dict[str, Any]]:
        body = {"model": model, "messages": messages, **_drop_none(fields), "stream": True}
        yield from self._sse("/v1/chat/completions", body)

    def reload_adapters(self) -> dict[str, Any]:
        """POST /admin/adapters/reload (needs the admin key)."""
        return self._send("POST", "/admin/adapters/reload", admin=True).json()


class AsyncClient(_Requests):
    """The same API for asyncio: `async with AsyncClient(url) as c: await c.bon(...)`."""

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

    async def _send(
        self, method: str, path: str, *, json_body=None, admin=False, stream=False, ok=(200,)
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                req = self._http.build_request(
                    method, path, json=json_body, headers=self.headers(admin)
                )
                resp = await self._http.send(req, stream=stream)
            except httpx.HTTPError as exc:
                raise _transport_error(exc, self.url) from exc
            if resp.status_code in ok:
                return resp
            if stream:
                await resp.aread()
                await resp.aclose()
            err = api_error(resp)
            if resp.status_code in self.retry.statuses and attempt < self.retry.max_retries:
                await self._sleep(self.retry.wait_s(attempt, err.retry_after))
                attempt += 1
                self.retries_done += 1
                continue
            raise err

    async def _sse(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        resp = await self._send("POST", path, json_body=body, stream=True)
        try:
            async for line in resp.aiter_lines():
                data = _sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if isinstance(obj, dict) and "error" in obj:
                    raise _stream_error(obj)
                yield obj
        except httpx.HTTPError as exc:
            raise _transport_error(exc, self.url) from exc
        finally:
            await resp.aclose()

    async def health(self) -> dict[str, Any]:
        return (await self._send("GET", "/health", ok=(200, 503))).json()

    async def ready(self) -> Ready:
        return self.parse(Ready, await self._send("GET", "/ready", ok=(200, 503)))

    async def metrics(self) -> str:
        return (await self._send("GET", "/metrics")).text

    async def models(self) -> ModelList:
        return self.parse(ModelList, await self._send("GET", "/v1/models"))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.bon_body(prompt, messages, n, return_candidates, s, adaptive)
        return self.parse(BoNResult, await self._send("POST", "/v1/bon", json_body=body))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.vbon_body(prompt, messages, adapter, n, score, False, s)
        return self.parse(VBoNResult, await self._send("POST", "/v1/vbon", json_body=body))

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
        s = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
        body = self.vbon_body(prompt, messages, adapter, n, score, True, s)
        async for obj in self._sse("/v1/vbon", body):
            yield VBoNChunk.model_validate(obj)

    async def completions(self, model: str, prompt: str | list[str], **fields: Any) -> Completion:
        body = {"model": model, "prompt": prompt, **_drop_none(fields)}
        return self.parse(Completion, await self._send("POST", "/v1/completions", json_body=body))

    async def chat_completions(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> Completion:
        body = {"model": model, "messages": messages, **_drop_none(fields)}
        resp = await self._send("POST", "/v1/chat/completions", json_body=body)
        return self.parse(Completion, resp)

    async def chat_completions_stream(
        self, model: str, messages: list[dict[str, str]], **fields: Any
    ) -> AsyncIterator[dict[str, Any]]:
        body = {"model": model, "messages": messages, **_drop_none(fields), "stream": True}
        async for obj in self._sse("/v1/chat/completions", body):
            yield obj

    async def reload_adapters(self) -> dict[str, Any]:
        return (await self._send("POST", "/admin/adapters/reload", admin=True)).json()
