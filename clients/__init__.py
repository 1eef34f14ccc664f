"""Clients of the vbon gateway: a typed Python client (sync and async), a CLI
(`python -m clients`), the throughput benchmark (`python -m clients.bench`) and the quality
evaluation (`python -m clients.eval`). They talk to the gateway over HTTP only."""

from clients.client import AsyncClient, Client, RetryPolicy
from clients.errors import (
    APIError,
    AuthenticationFailed,
    BadRequest,
    ConnectionFailed,
    NotFound,
    ProtocolError,
    RateLimited,
    RequestTimedOut,
    ServerError,
    ServiceUnavailable,
    VBoNClientError,
)
from clients.types import BoNResult, Candidate, Completion, ModelList, Ready, VBoNChunk, VBoNResult

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationFailed",
    "BadRequest",
    "BoNResult",
    "Candidate",
    "Client",
    "Completion",
    "ConnectionFailed",
    "ModelList",
    "NotFound",
    "ProtocolError",
    "RateLimited",
    "Ready",
    "RequestTimedOut",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "VBoNChunk",
    "VBoNClientError",
    "VBoNResult",
]
