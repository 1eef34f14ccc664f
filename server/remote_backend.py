"""Remote mode: the same `GenerationBackend` interface, served by one or more vLLM
OpenAI-compatible servers (`vllm serve ... --enable-lora`) over HTTP.

- One pooled `httpx.AsyncClient` for all upstreams (keep-alive connections are reused).
- A health loop checks every upstream (`/health`, then `/v1/models`): reachable, and serving the
  configured base model. Its findings are what `/ready` reports.
- Each request goes to the healthy upstream with the fewest samples in flight (ties: round
  robin). A replica that refuses the connection or answers 5xx before producing anything is
  marked down and the request moves on to the next one, so one dead replica never fails a
  request another replica can take.
- Errors name the upstream: 503 (`EngineUnavailable`: none could take it), 502
  (`UpstreamError`: an upstream answered with something unusable), 504 (`UpstreamTimeout`).
  An upstream's 400/422 (vLLM refusing a parameter the client sent) is the client's 400 naming
  that parameter (`InvalidRequest`), as the local engine's refusal is.
- VBON_UPSTREAM_API_KEY is sent to every upstream. One that refuses it (401/403: its
  `--api-key` differs, or we send none) is marked down with a reason naming the setting, and is
  not tried again until a health check finds it accepting the key: /ready says why, and
  requests get 503 rather than being passed to an upstream that will refuse them.
- Tokenization (prompt limits, chat templates) uses the tokenizer from the local model folder
  (VBON_MODEL; the gateway mounts the same models volume), so `count_tokens` and `render_chat`
  stay synchronous and free of network calls.
- LoRA: adapters are loaded by name with `/v1/load_lora_adapter` (the upstreams need
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and the adapters volume mounted at
  VBON_UPSTREAM_ADAPTERS_DIR). Each version `name@vN` is loaded on every upstream before its
  first use there, and loaded again after an upstream restarts, always from its immutable
  snapshot `VBON_ADAPTERS_DIR/.versions/name@vN` (written by server.adapter_registry; the
  gateway needs the volume read-write), never from the live folder, which may by then hold
  another version. A version nothing uses any more is unloaded (`unload_lora`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from server.backend import (
    BackendError,
    Delta,
    EngineUnavailable,
    Generation,
    InvalidRequest,
    LoraRef,
    Sample,
)
from server.serving import new_id
from vbon.sampling import Sampling

logger = logging.getLogger(__name__)


class UpstreamError(BackendError):
    """An upstream answered with an error or something unusable (-> 502)."""

    status_code = 502
    code = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """An upstream took longer than VBON_UPSTREAM_TIMEOUT_S (-> 504)."""

    status_code = 504


class _Retry(Exception):
    """This upstream cannot take the request now; another one may. `answered`: it replied
    with a server error (rather than not being reachable at all)."""

    def __init__(self, message: str, answered: bool = False) -> None:
        super().__init__(message)
        self.answered = answered


class _LoraMissing(Exception):
    """The upstream does not know the adapter (it restarted since we loaded it)."""


@dataclass
class Upstream:
    url: str
    healthy: bool = False
    reason: str = "not checked yet"
    model_id: str | None = None  # the base model name it serves (the OpenAI "model" field)
    max_model_len: int | None = None
    # Serves another model, or refuses our key: no request goes there until a health check
    # finds it fixed (unlike an unreachable one, which may be back before the next check).
    misconfigured: bool = False
    in_flight: int = 0  # samples this gateway has sent there and not yet received back
    loaded: set[str] = field(default_factory=set)  # LoRA names loaded there (as we know it)
    checked_at: float = 0.0

    def mark_down(self, reason: str) -> None:
        if self.healthy:
            logger.warning("upstream %s is down: %s", self.url, reason)
        self.healthy = False
        self.reason = reason
        self.loaded.clear()  # a restarted vLLM has forgotten its runtime-loaded adapters


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _error_fields(resp: httpx.Response) -> tuple[str, str | None]:
    """(message, parameter) of an upstream's error answer. vLLM's is OpenAI's
    {"error": {"message", "type", "param", "code"}} (older versions: the same fields at the top
    level with "object": "error"; its key check: {"error": "Unauthorized"}); FastAPI's own
    validation answers {"detail": [{"loc": [..., field], "msg"}]}."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500], None
    err = body.get("error", body) if isinstance(body, dict) else body
    if not isinstance(err, dict):
        return str(err)[:500], None
    detail = err.get("detail")
    if "message" not in err and isinstance(detail, list) and detail and isinstance(
        detail[0], dict
    ):
        names = [str(x) for x in detail[0].get("loc") or [] if isinstance(x, str)]
        param = names[-1] if names and names[-1] != "body" else None
        msg = str(detail[0].get("msg", detail[0]))
        return (f"{param}: {msg}" if param else msg)[:500], param
    if "message" not in err and detail is not None:
        return str(detail)[:500], None
    param = err.get("param")
    return str(err.get("message", err))[:500], str(param) if param else None


def _error_message(resp: httpx.Response) -> str:
    return _error_fields(resp)[0]


def model_matches(served: str, expected: str) -> bool:
    """`vllm serve /models/x` serves the id '/models/x'; the gateway may see the same folder
    under another mount point, so the folder name is what must agree."""
    return served == expected or Path(served).name == Path(expected).name


class RemoteBackend:
    """vLLM OpenAI-compatible servers as the generation engine (VBON_BACKEND=remote)."""

    # The upstreams read adapters by path, from the shared volume: the adapter registry writes
    # its per-version snapshots there (not in a private temporary folder).
    shared_snapshots = True

    def __init__(self, settings: Any, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._settings = settings
        self.model_path = str(settings.model)
        self.max_model_len = settings.max_model_len
        self.upstreams = [Upstream(u.rstrip("/")) for u in settings.upstreams]
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: Any = None
        self._model_error: str | None = "not started"
        self._model_detail: str | None = None
        self._loras: dict[str, LoraRef] = {}
        self._lora_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._rr = itertools.count()
        self._health_task: asyncio.Task[None] | None = None
        self._running: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Never raises: a missing model folder or unreachable upstreams are reported by
        `error()` (and /ready) and retried by the health loop, so /health always answers."""
        s = self._settings
        headers = {}
        if s.upstream_api_key is not None:
            headers["Authorization"] = f"Bearer {s.upstream_api_key.get_secret_value()}"
        limits = httpx.Limits(
            max_connections=s.upstream_max_connections,
            max_keepalive_connections=s.upstream_max_connections,
            keepalive_expiry=30,
        )
        self._client = httpx.AsyncClient(
            headers=headers,
            limits=limits,
            timeout=httpx.Timeout(
                s.upstream_timeout_s,
                connect=s.upstream_connect_timeout_s,
                pool=s.upstream_connect_timeout_s,
            ),
            transport=self._transport,
        )
        if not self.upstreams:
            logger.error("VBON_BACKEND=remote but VBON_UPSTREAMS is empty")
        await self._load_tokenizer()
        await self.check_all()
        self._health_task = asyncio.create_task(self._health_loop())
        logger.info("remote backend: %s", self.describe())

    async def shutdown(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
            self._health_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        try:
            path = await asyncio.to_thread(self._settings.resolved_model)
            from transformers import AutoTokenizer

            self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        except Exception as exc:
            # The full reason (path, loader exception) goes to the log only: /ready and the
            # 503s reach clients, who must not learn the server's folders or internals.
            detail = f"{type(exc).__name__}: {exc}"
            if detail != self._model_detail:
                self._model_detail = detail
                ref = new_id("err")
                logger.error(
                    "model folder for VBON_MODEL='%s' is not usable [%s]: %s",
                    self._settings.model, ref, detail,
                )
                self._model_error = (
                    "the model folder named by VBON_MODEL is not usable (the gateway needs it "
                    "for the tokenizer and chat template: mount the models volume); the server "
                    f"log has the details under {ref}"
                )
            return
        self.model_path = path
        self._model_error = None
        self._model_detail = None

    # -- health ---------------------------------------------------------------------------
    @property
    def expected_model(self) -> str:
        return self._settings.upstream_model or self.model_path

    async def check(self, up: Upstream) -> None:
        assert self._client is not None
        timeout = self._settings.upstream_connect_timeout_s
        try:
            r = await self._client.get(f"{up.url}/health", timeout=timeout)
            if r.status_code != 200:
                raise UpstreamError(f"/health answered {r.status_code}")
            r = await self._client.get(f"{up.url}/v1/models", timeout=timeout)
            if r.status_code in (401, 403):
                self._key_refused(up, r.status_code)
                up.checked_at = time.monotonic()
                return
            if r.status_code != 200:
                raise UpstreamError(f"/v1/models answered {r.status_code}: {_error_message(r)}")
            cards = r.json().get("data", [])
        except (httpx.HTTPError, UpstreamError, ValueError) as exc:
            up.mark_down(f"unreachable: {_describe(exc)}")
            up.misconfigured = False
            up.checked_at = time.monotonic()
            return
        bases = [c for c in cards if not c.get("parent")]
        expected = self.expected_model
        match = next((c for c in bases if model_matches(str(c.get("id")), expected)), None)
        up.checked_at = time.monotonic()
        if match is None:
            served = [c.get("id") for c in bases]
            msg = f"serves {served}, not the configured model '{expected}'"
            if up.reason != msg:
                logger.error("upstream %s %s (VBON_MODEL / VBON_UPSTREAM_MODEL)", up.url, msg)
            up.mark_down(msg)
            up.misconfigured = True
            return
        up.misconfigured = False
        up.model_id = str(match["id"])
        up.max_model_len = match.get("max_model_len")
        loaded_there = {str(c.get("id")) for c in cards if c.get("parent")}
        up.loaded &= loaded_there  # forget what a restarted upstream no longer has
        if not up.healthy:
            logger.info("upstream %s is up (model %s)", up.url, up.model_id)
        up.healthy = True
        up.reason = "ok"
        lens = [u.max_model_len for u in self.upstreams if u.healthy and u.max_model_len]
        self.max_model_len = min([self._settings.max_model_len, *lens])

    def _key_refused(self, up: Upstream, status: int) -> _Retry:
        """`up` answered 401/403: it wants another key than ours (or one, and we send none).
        Not a transient failure: marked down, and skipped until a health check finds it
        accepting the key (it was restarted with ours, or we were)."""
        sent = "refuses the gateway's key" if self._settings.upstream_api_key else "needs a key"
        msg = (
            f"{sent} ({status}): set VBON_UPSTREAM_API_KEY to the key the upstreams were started "
            "with (vllm serve --api-key, or VLLM_API_KEY)"
        )
        if up.reason != msg:
            logger.error("upstream %s %s", up.url, msg)
        up.mark_down(msg)
        up.misconfigured = True
        return _Retry(f"{up.url} {msg}")

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(u) for u in self.upstreams))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.upstream_health_interval_s)
            try:
                await self._load_tokenizer()
                await self.check_all()
                await self._preload_loras()
            except Exception:  # keep checking; one bad round must not stop the loop
                logger.exception("upstream health check failed")

    def ready(self) -> bool:
        return self._tokenizer is not None and any(u.healthy for u in self.upstreams)

    def error(self) -> str | None:
        if self._tokenizer is None:
            return self._model_error or "tokenizer not loaded"
        if not self.upstreams:
            return "no upstreams configured: set VBON_UPSTREAMS"
        if any(u.healthy for u in self.upstreams):
            return None
        return "no upstream is ready: " + "; ".join(f"{u.url} {u.reason}" for u in self.upstreams)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.expected_model,
            "upstreams": [
                {"url": u.url, "healthy": u.healthy, "reason": u.reason, "in_flight": u.in_flight}
                for u in self.upstreams
            ],
        }

    # -- tokenization ---------------------------------------------------------------------
    def _tok(self) -> Any:
        if self._tokenizer is None:
            raise EngineUnavailable(self._model_error or "tokenizer not loaded")
        return self._tokenizer

    def count_tokens(self, text: str) -> int:
        # As the upstream counts the prompt we send it: vLLM's /v1/completions tokenizes it with
        # add_special_tokens=True (a BOS for Llama-style tokenizers), so the context check
        # never passes a prompt the upstream then refuses.
        return len(self._tok().encode(text, add_special_tokens=True))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        from vbon.prompts import render_chat

        return render_chat(self._tok(), messages)

    def fatal(self) -> str | None:
        # Upstreams come back by themselves (the health loop follows them); restarting the
        # gateway would not help, so liveness stays up.
        return None

    def decode(self, token_ids: list[int]) -> str:
        # (Adaptive best-of-N, the only user, is refused in remote mode: the upstream streams
        # carry no token ids. Kept for the interface.)
        return self._tok().decode(token_ids, skip_special_tokens=True)

    # -- LoRA -----------------------------------------------------------------------------
    def _upstream_lora_path(self, lora: LoraRef) -> str:
        """Where the upstreams read this version: its snapshot on the adapters volume
        (`lora.path`, under VBON_ADAPTERS_DIR) as the volume is mounted there. Never the live
        folder: an upstream that restarts loads `name@vN` again, and by then the live folder
        may hold a newer version or one that was refused."""
        ours = Path(self._settings.adapters_dir)
        try:
            inside = Path(lora.path).relative_to(ours)
        except ValueError:
            raise UpstreamError(
                f"adapter {lora.name} is at '{lora.path}', outside VBON_ADAPTERS_DIR '{ours}' "
                "that the upstreams mount"
            ) from None
        return str(Path(self._settings.upstream_adapters_dir or ours) / inside)

    async def _ensure_lora(self, up: Upstream, lora: LoraRef) -> None:
        if lora.name in up.loaded:
            return
        lock = self._lora_locks.setdefault((up.url, lora.name), asyncio.Lock())
        async with lock:
            if lora.name in up.loaded:
                return
            assert self._client is not None
            body = {"lora_name": lora.name, "lora_path": self._upstream_lora_path(lora)}
            try:
                r = await self._client.post(f"{up.url}/v1/load_lora_adapter", json=body)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                up.mark_down(f"unreachable: {_describe(exc)}")
                raise _Retry(f"{up.url}: {_describe(exc)}") from exc
            except httpx.HTTPError as exc:
                raise UpstreamError(
                    f"upstream {up.url} failed loading adapter {lora.name}: {_describe(exc)}"
                ) from exc
            msg = _error_message(r) if r.status_code != 200 else ""
            if r.status_code in (401, 403):
                raise self._key_refused(up, r.status_code)
            if r.status_code == 200 or "already been loaded" in msg:
                up.loaded.add(lora.name)
                return
            if r.status_code == 404:
                raise UpstreamError(
                    f"upstream {up.url} cannot load adapters at runtime (404 on "
                    "/v1/load_lora_adapter): start it with --enable-lora and "
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
                )
            if r.status_code >= 500:
                up.mark_down(f"answered {r.status_code} loading an adapter: {msg}")
                raise _Retry(f"{up.url} answered {r.status_code}: {msg}", answered=True)
            # The folder and vLLM's text go to the log only: this message can reach a client
            # (a 502), who must not learn the server's paths.
            ref = new_id("err")
            logger.error(
                "upstream %s refused adapter %s from %s (%d) [%s]: %s",
                up.url, lora.name, body["lora_path"], r.status_code, ref, msg,
            )
            raise UpstreamError(
                f"upstream {up.url} refused adapter {lora.name} ({r.status_code}); the server "
                f"log has the details under {ref}"
            )

    async def load_lora(self, lora: LoraRef) -> None:
        """Load a new adapter version on every healthy upstream now, so that a bad adapter is
        refused at install time; upstreams that are down get it before their first use."""
        self._loras[lora.name] = lora
        healthy = [u for u in self.upstreams if u.healthy]
        results = await asyncio.gather(
            *(self._ensure_lora(u, lora) for u in healthy), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, UpstreamError)]
        if errors:
            del self._loras[lora.name]
            raise errors[0]

    async def unload_lora(self, lora: LoraRef) -> None:
        """The registry retired this version (replaced or removed, and no request holds it):
        forget it here, so the health loop no longer loads it onto restarted upstreams, and
        unload it from the upstreams, so they never reload it from its deleted snapshot (vLLM
        reads an evicted adapter again from its path). Every healthy upstream is asked, also
        one we believe lacks it (`loaded` is cleared when an upstream is marked down, which it
        may be without having restarted). Best effort: an upstream that misses this keeps an
        unused name that is never given to other weights."""
        self._loras.pop(lora.name, None)
        for up in self.upstreams:
            self._lora_locks.pop((up.url, lora.name), None)
            up.loaded.discard(lora.name)
            if self._client is None or not up.healthy:
                continue
            try:
                r = await self._client.post(
                    f"{up.url}/v1/unload_lora_adapter", json={"lora_name": lora.name}
                )
            except httpx.HTTPError as exc:
                logger.info("upstream %s: unloading %s failed: %s", up.url, lora.name,
                            _describe(exc))
                continue
            if r.status_code not in (200, 404):  # 404: it had forgotten it already
                logger.info("upstream %s: unloading %s answered %d: %s", up.url, lora.name,
                            r.status_code, _error_message(r))

    async def _preload_loras(self) -> None:
        for up in self.upstreams:
            if not up.healthy:
                continue
            for lora in list(self._loras.values()):
                if lora.name not in up.loaded:
                    with contextlib.suppress(Exception):
                        await self._ensure_lora(up, lora)

    # -- routing --------------------------------------------------------------------------
    def _order(self) -> list[Upstream]:
        """Healthy upstreams, least loaded first (ties rotate), then the ones marked down but
        serving the right model (they may be back before the next health check)."""
        start = next(self._rr)
        n = len(self.upstreams)
        rotated = [self.upstreams[(start + i) % n] for i in range(n)]
        healthy = sorted((u for u in rotated if u.healthy), key=lambda u: u.in_flight)
        down = [u for u in rotated if not u.healthy and not u.misconfigured]
        return healthy + down

    async def _dispatch(self, n: int, lora: LoraRef | None, call: Any) -> Any:
        if self._client is None:
            raise EngineUnavailable("the remote backend is not started")
        self._tok()
        candidates = self._order()
        if not candidates:
            raise EngineUnavailable(self.error() or "no upstream serves the configured model")
        failures: list[_Retry] = []
        for up in candidates:
            up.in_flight += n
            try:
                for attempt in (1, 2):
                    try:
                        if lora is not None:
                            await self._ensure_lora(up, lora)
                        return await call(up)
                    except _LoraMissing:
                        assert lora is not None
                        up.loaded.discard(lora.name)  # load it again, then retry once
                        if attempt == 2:
                            failures.append(_Retry(f"{up.url}: adapter {lora.name} not found"))
            except _Retry as exc:
                failures.append(exc)
            finally:
                up.in_flight -= n
        detail = "; ".join(str(f) for f in failures)
        if any(f.answered for f in failures):  # an upstream replied, with a server error
            raise UpstreamError(f"no upstream could complete the request: {detail}")
        raise EngineUnavailable(f"no upstream could take the request: {detail}")

    def _body(self, up: Upstream, prompt: str, sampling: Sampling, n: int, lora: LoraRef | None):
        return {
            "model": lora.name if lora is not None else up.model_id,
            "prompt": prompt,
            "n": n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else 0,
            "seed": sampling.seed,
            "stop": list(sampling.stop) or None,
            "logprobs": 0,  # only the sampled tokens: token counts and cumulative log-probs
            # vLLM's own extensions, when set: the upstream is a `vllm serve`.
            **{k: list(v) if isinstance(v, tuple) else v
               for k, v in sampling.extensions().items()},
        }

    async def _post_failed(self, up: Upstream, r: httpx.Response, lora: LoraRef | None) -> None:
        msg, param = _error_fields(r)
        if r.status_code == 404 and lora is not None and lora.name in msg:
            raise _LoraMissing(msg)
        if r.status_code in (401, 403):
            raise self._key_refused(up, r.status_code)
        if r.status_code in (400, 422):
            # vLLM refused a value the client sent (one our request models let through, e.g. a
            # sampling extension it checks more strictly): the client's 400 naming it, as with
            # the local engine. No other upstream would accept it, so no fail-over.
            logger.info("upstream %s refused a request (%d): %s", up.url, r.status_code, msg)
            if param and param not in msg:
                msg = f"{param}: {msg}"
            raise InvalidRequest(msg, param)
        if r.status_code >= 500:
            up.mark_down(f"answered {r.status_code}: {msg}")
            raise _Retry(f"{up.url} answered {r.status_code}: {msg}", answered=True)
        raise UpstreamError(f"upstream {up.url} answered {r.status_code}: {msg}")

    def _network_error(self, up: Upstream, exc: httpx.HTTPError) -> Exception:
        if isinstance(exc, httpx.PoolTimeout):
            return _Retry(
                f"{up.url}: all {self._settings.upstream_max_connections} connections busy"
            )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.RemoteProtocolError):
            up.mark_down(f"unreachable: {_describe(exc)}")
            return _Retry(f"{up.url}: {_describe(exc)}")
        if isinstance(exc, httpx.TimeoutException):
            return UpstreamTimeout(
                f"upstream {up.url} did not answer within {self._settings.upstream_timeout_s:g} s "
                "(VBON_UPSTREAM_TIMEOUT_S)"
            )
        return UpstreamError(f"upstream {up.url} failed: {_describe(exc)}")

    # -- generation -----------------------------------------------------------------------
    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation:
        async def call(up: Upstream) -> Generation:
            assert self._client is not None
            body = self._body(up, prompt, sampling, n, lora)
            try:
                r = await self._client.post(
                    f"{up.url}/v1/completions", json=body, headers={"X-Request-Id": request_id}
                )
            except httpx.HTTPError as exc:
                raise self._network_error(up, exc) from exc
            if r.status_code != 200:
                await self._post_failed(up, r, lora)
            try:
                data = r.json()
                choices = sorted(data["choices"], key=lambda c: c["index"])
                samples = []
                for c in choices:
                    lp = c.get("logprobs") or {}
                    token_lps = lp.get("token_logprobs") or []
                    samples.append(
                        Sample(
                            text=c["text"],
                            tokens=len(token_lps),
                            cumulative_logprob=float(sum(x for x in token_lps if x is not None))
                            if token_lps
                            else None,
                            finish_reason=c.get("finish_reason"),
                        )
                    )
                prompt_tokens = int(data["usage"]["prompt_tokens"])
            except (ValueError, KeyError, TypeError) as exc:
                raise UpstreamError(
                    f"upstream {up.url} sent an unreadable completion ({_describe(exc)})"
                ) from exc
            if len(samples) != n:
                raise UpstreamError(f"upstream {up.url} returned {len(samples)} of {n} samples")
            return Generation(prompt_tokens=prompt_tokens, samples=samples)

        self._running.add(request_id)
        try:
            return await self._dispatch(n, lora, call)
        finally:
            self._running.discard(request_id)

    async def stream(
        self, prompt: str, sampling: Sampling, request_id: str, lora: LoraRef | None = None
    ) -> AsyncIterator[Delta]:
        """One sample as deltas. Fail-over happens only before the first delta."""
        queue: asyncio.Queue[Delta | BaseException | None] = asyncio.Queue(maxsize=64)

        async def call(up: Upstream) -> None:
            assert self._client is not None
            body = {**self._body(up, prompt, sampling, 1, lora), "stream": True}
            cum = 0.0
            started = False
            try:
                async with self._client.stream(
                    "POST",
                    f"{up.url}/v1/completions",
                    json=body,
                    headers={"X-Request-Id": request_id},
                ) as r:
                    if r.status_code != 200:
                        await r.aread()
                        await self._post_failed(up, r, lora)
                    async for line in r.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == "[DONE]":
                            break
                        chunk = json.loads(payload)
                        if "error" in chunk:
                            raise UpstreamError(
                                f"upstream {up.url} failed mid-stream: {chunk['error']}"
                            )
                        if not chunk.get("choices"):
                            continue
                        c = chunk["choices"][0]
                        lps = (c.get("logprobs") or {}).get("token_logprobs") or []
                        cum += sum(x for x in lps if x is not None)
                        finish = c.get("finish_reason")
                        started = True
                        await queue.put(
                            Delta(
                                text=c.get("text", ""),
                                tokens=len(lps),
                                finish_reason=finish,
                                cumulative_logprob=cum if finish else None,
                            )
                        )
            except httpx.HTTPError as exc:
                err = self._network_error(up, exc)
                if started and isinstance(err, _Retry):  # text already sent: no fail-over
                    err = UpstreamError(f"upstream {up.url} failed mid-stream: {_describe(exc)}")
                raise err from exc
            except ValueError as exc:
                raise UpstreamError(f"upstream {up.url} sent a bad stream chunk: {exc}") from exc

        async def run() -> None:
            try:
                await self._dispatch(1, lora, call)
            except BaseException as exc:  # delivered to the consumer below
                await queue.put(exc)
                return
            await queue.put(None)

        self._running.add(request_id)
        task = asyncio.create_task(run())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._running.discard(request_id)
            if not task.done():
                task.cancel()  # client gone: closing the connection aborts it upstream
                with contextlib.suppress(BaseException):
                    await task

    async def running_requests(self) -> int:
        return len(self._running)
