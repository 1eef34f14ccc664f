"""One error shape for every route, OpenAI's: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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
    502: "A remote engine or the remote reward server failed",
    503: "Engine not ready or dead; retry after Retry-After seconds",
    504: "Request over VBON_REQUEST_TIMEOUT_S, or the remote reward server timed out",
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


# pydantic names the member of a union that failed inside `loc` ("list[str]",
# "function-after[_encodable(), str]"); users know the field, not our validators.
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
_KINDS = {
    "string_type": "a string",
    "list_type": "a list",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_parsing_size": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
}
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def _clean_loc(loc: Any) -> str | None:
    parts = [
        str(p)
        for p in loc
        if p != "body" and not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))
    ]
    return ".".join(parts) or None


def _body_model(request: Request | None) -> type[BaseModel] | None:
    route = request.scope.get("route") if request is not None else None
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _allowed_range(
    model: type[BaseModel] | None, name: str, upper_limits: dict[str, int]
) -> str | None:
    """'1 <= n <= 32' from the request model's constraints and the server's own limits
    (VBON_MAX_N, ...), for a top-level numeric field; None where there is none."""
    field = model.model_fields.get(name) if model is not None and "." not in name else None
    if field is None:
        return None
    low = high = None
    for rule in field.metadata:
        if getattr(rule, "ge", None) is not None:
            low = (rule.ge, "<=")
        elif getattr(rule, "gt", None) is not None:
            low = (rule.gt, "<")
        if getattr(rule, "le", None) is not None:
            high = (rule.le, "<=")
        elif getattr(rule, "lt", None) is not None:
            high = (rule.lt, "<")
    if name in upper_limits:
        high = (upper_limits[name], "<=")
    if low and high:
        return f"{low[0]} {low[1]} {name} {high[1]} {high[0]}"
    if low:
        return f"{name} {low[1].replace('<', '>')} {low[0]}"
    return f"{name} {high[1]} {high[0]}" if high else None


def _describe_validation(
    exc: RequestValidationError,
    request: Request | None = None,
    upper_limits: dict[str, int] | None = None,
) -> tuple[str, str | None]:
    """One sentence per field: what is wrong and what is allowed (the range, the types)."""
    model = _body_model(request)
    limits = upper_limits or {}
    grouped: dict[str | None, list[dict[str, Any]]] = {}
    for err in exc.errors():
        grouped.setdefault(_clean_loc(err.get("loc", ())), []).append(err)
    parts: list[str] = []
    first_param: str | None = None
    for param, errs in grouped.items():
        first_param = first_param or param
        err = errs[0]
        kind = err.get("type")
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        allowed = _allowed_range(model, param, limits) if param else None
        if kind == "json_invalid":
            parts.append("the body is not valid JSON: send a JSON object")
            first_param = None
        elif kind == "missing":
            parts.append(f"'{param}' is required")
        elif kind == "extra_forbidden":
            parts.append(f"'{param}' is not a known field")
        elif param and kind in _BOUND_ERRORS and allowed:
            parts.append(f"'{param}' is {err.get('input')!r}; allowed: {allowed}")
        elif param and all(e.get("type") in _KINDS for e in errs):
            kinds = " or ".join(dict.fromkeys(_KINDS[e["type"]] for e in errs))
            got = repr(err.get("input"))
            got = got if len(got) <= 40 else got[:37] + "..."
            suffix = f"; allowed: {allowed}" if allowed else ""
            parts.append(f"'{param}' must be {kinds} (got {got}){suffix}")
        elif param:
            parts.append(f"'{param}': {msg}")
        else:
            parts.append(msg)
    return "; ".join(parts) or "invalid request", first_param


class ClientDisconnected(Exception):
    """The client went away before its answer; its engine work was aborted."""


# nginx's "client closed request": neither a server fault (5xx) nor a client error to answer.
CLIENT_CLOSED = 499


def install_error_handlers(app: FastAPI, upper_limits: dict[str, int] | None = None) -> None:
    """`upper_limits`: the server's own caps on request fields (n, max_tokens), named in the
    400s as the top of the allowed range."""

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        # Nobody reads this answer; it records the outcome (metrics) without a traceback.
        return Response(status_code=CLIENT_CLOSED)
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc, request, upper_limits)
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
