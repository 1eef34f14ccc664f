"""Clients of the vbon gateway: a typed Python client (sync and async), a CLI
(`python -m clients`) and the benchmarks (`python -m clients.bench`, `clients.adaptive_bench`,
`clients.vllm_bench`). They talk to the gateway over HTTP; what a benchmark compares the gateway
with runs in its process from the core package (transformers' BoN: vbon.hf_bon) or is vLLM's
own bench client. (`python -m clients.eval` is kept as the quality evaluation's command; the
evaluation itself, an offline engine, is vbon.evaluation.)"""

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
