"""ASGI middleware: API keys, body size limit, per-route metrics. Pure ASGI, so streaming
responses pass through untouched."""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from server.errors import error_body
from server.metrics import Metrics

Scope = dict[str, Any]
PUBLIC_PATHS = {"/health"}
# Fixed label values: a route label per request path would let clients grow the metrics.
METERED_ROUTES = {
    "/v1/bon",
    "/v1/vbon",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/ready",
}


async def _send_error(send: Any, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _bearer(scope: Scope) -> str | None:
    for k, v in scope.get("headers", []):
        if k == b"authorization":
            text = v.decode("latin-1")
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
    return None


def _playground_page(scope: Scope) -> bool:
    # A browser's navigation to the page sends no key; the page then asks for it and sends it
    # on its API calls. Only reading the static files is exempt (served only when
    # VBON_PLAYGROUND is on; off, these paths are 404).
    path = scope["path"]
    return scope.get("method") in ("GET", "HEAD") and (
        path == "/playground" or path.startswith("/playground/")
    )


def key_matches(given: str | None, expected: str) -> bool:
    # Constant time, so the comparison leaks nothing about the key.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class AuthMiddleware:
    """With an API key set, every route but /health (and reading the playground's static
    files) needs `Authorization: Bearer <key>`.
    /admin routes need the admin key instead (and are off without one)."""

    def __init__(self, app: Any, api_key: str | None, admin_key: str | None) -> None:
        self.app = app
        self.api_key = api_key
        self.admin_key = admin_key

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or _playground_page(scope):
            return await self.app(scope, receive, send)
        given = _bearer(scope)
        if scope["path"].startswith("/admin"):
            if self.admin_key is None:
                return await _send_error(send, 403, "admin routes are off: set VBON_ADMIN_KEY")
            if not key_matches(given, self.admin_key):
                return await _send_error(
                    send,
                    401,
                    "missing or wrong admin key: send 'Authorization: Bearer <admin key>'",
                    [(b"www-authenticate", b"Bearer")],
                )
            return await self.app(scope, receive, send)
        if self.api_key is not None and not key_matches(given, self.api_key):
            return await _send_error(
                send,
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                [(b"www-authenticate", b"Bearer")],
            )
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over the limit with 413, before they are read into memory."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    return await _send_error(send, 400, "invalid Content-Length header")
                if too_big:
                    return await _send_error(
                        send, 413, f"request body over {self.max_bytes} bytes (VBON_MAX_BODY_BYTES)"
                    )
        seen = 0
        refused = False  # the 413 went out: the app's own answer is dropped

        async def limited_receive() -> Any:
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # Answer now and tell the app the client left: raising here would reach
                    # FastAPI's body parser, which turns any error into a 400.
                    refused = True
                    await _send_error(
                        send, 413, f"request body over {self.max_bytes} bytes (VBON_MAX_BODY_BYTES)"
                    )
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Any) -> None:
            if not refused:
                await send(msg)

        await self.app(scope, limited_receive, guarded_send)


class MetricsMiddleware:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/health"):
            return await self.app(scope, receive, send)
        status = 500
        t0 = time.perf_counter()
        route = scope["path"] if scope["path"] in METERED_ROUTES else "other"
        gauge = self.metrics.in_flight.labels(route)
        gauge.inc()

        async def send_wrapper(msg: Any) -> None:
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            gauge.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            if status == 429:
                self.metrics.rejected.labels("samples_in_flight").inc()
            elif status == 503:
                self.metrics.rejected.labels("not_ready").inc()
