"""Client exceptions. Every failure the gateway reports arrives as an APIError subclass that
carries the server's own message (OpenAI error shape: {"error": {"message", "type", ...}});
transport failures are ConnectionFailed / RequestTimedOut."""

from __future__ import annotations

from typing import Any


class VBoNClientError(Exception):
    """Base class of everything this package raises on purpose."""


class ConnectionFailed(VBoNClientError):
    """The server could not be reached (refused, DNS, reset)."""


class RequestTimedOut(VBoNClientError):
    """No answer within the client's timeout."""


class ProtocolError(VBoNClientError):
    """The server answered something this client does not understand."""


class APIError(VBoNClientError):
    """The server answered with an error status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.body = body

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


class BadRequest(APIError):
    """400/413/422: the request was refused; the message names the field and allowed range."""


class AuthenticationFailed(APIError):
    """401/403: missing or wrong API key."""


class NotFound(APIError):
    """404: unknown route, model or adapter."""


class RateLimited(APIError):
    """429: the server is busy; `retry_after` says when to come back."""


class ServiceUnavailable(APIError):
    """503: the engine is loading or has died."""


class ServerError(APIError):
    """Other 5xx (500 internal, 504 generation timeout, ...)."""


def error_class(status: int) -> type[APIError]:
    if status in (401, 403):
        return AuthenticationFailed
    if status == 404:
        return NotFound
    if status == 429:
        return RateLimited
    if status == 503:
        return ServiceUnavailable
    if status >= 500:
        return ServerError
    return BadRequest
