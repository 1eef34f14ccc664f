"""One error shape for every route, OpenAI's: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every non-2xx answer (OpenAI's error shape)."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Bad input: the message names the field and the allowed range",
    401: "Missing or wrong API key",
    403: "Admin routes are off (no VBON_ADMIN_KEY)",
    404: "Unknown adapter or model",
    413: "Request body over VBON_MAX_BODY_BYTES",
    429: "Too many samples in flight; retry after Retry-After seconds",
    500: "The reward model failed",
    502: "The remote engine failed",
    503: "Engine not ready or dead; retry after Retry-After seconds",
    504: "Request over VBON_REQUEST_TIMEOUT_S",
}
# What a generation route can answer besides 200 (documented, so clients and schema-based
# fuzzers know every status they may see).
GENERATION_ERRORS = (400, 401, 404, 413, 429, 500, 502, 503, 504)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these statuses, all with the error shape."""
    return {s: {"model": ErrorResponse, "description": _DESCRIPTIONS[s]} for s in statuses}


# Streaming routes answer server-sent events when the request says `"stream": true`: each
# event's `data` is one JSON chunk (or an error in the error shape), the last is `[DONE]`.
STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                    "required": ["data"],
                }
            }
        }
    }
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(
                status, "server_error" if status >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(
        error_body(err.status, err.message, err.param, err.code),
        status_code=err.status,
        headers=err.headers,
    )


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    first_param: str | None = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        param = ".".join(loc) or None
        first_param = first_param or param
        msg = err.get("msg", "invalid value")
        msg = msg.removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            parts.append("the body is not valid JSON: send a JSON object")
            first_param = None
        elif err.get("type") == "missing":
            parts.append(f"'{param}' is required")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"'{param}' is not a known field")
        elif param:
            parts.append(f"'{param}': {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts) or "invalid request", first_param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 400 and message == "There was an error parsing the body":
            message = "the body is not UTF-8 JSON (or nests too deeply): send a JSON object"
        elif exc.status_code == 404:
            message = "no such route: see /docs for the API"
        elif exc.status_code == 405:
            message = "method not allowed on this route"
        return JSONResponse(
            error_body(exc.status_code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Never leak internals (paths, keys) in the message; the log has the traceback.
        import logging

        logging.getLogger("server").exception("unhandled error")
        return JSONResponse(
            error_body(500, f"internal error ({type(exc).__name__}); see the server log"),
            status_code=500,
        )
