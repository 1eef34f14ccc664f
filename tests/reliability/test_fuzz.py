"""Bad input, systematically: every route fuzzed from the app's own OpenAPI schema
(schemathesis; valid and schema-violating requests), then the hostile bodies a schema does not
describe. Zero 5xx and responses that match the documented schema, status and content type.

The app runs on loopback (uvicorn in a thread) on the fake engine (same interface as
vLLM's): the fuzzer is after the HTTP layer, validation and error paths; the real engine's
input handling is fuzzed by tests/test_fuzz_engine.py. VBON_FUZZ_EXAMPLES sets the examples
per route (make test: 25, make reliability: 300)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from server.app import create_app
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.server_proc import serve_in_thread

EXAMPLES = int(os.environ.get("VBON_FUZZ_EXAMPLES", "25"))
API_KEY, ADMIN_KEY = "fuzz-api-key-0123456789", "fuzz-admin-key-9876543210"
MAX_BODY = 64 * 1024
SEEN: Counter[str] = Counter()
BACKEND = FakeBackend(max_model_len=256)
_ADAPTERS = Path(tempfile.mkdtemp(prefix="vbon-fuzz-"))
# Building the app loads nothing (that happens in its lifespan), so the schema can be read at
# collection time and the server started only when a test runs.
APP = create_app(
    ServerSettings(
        adapters_dir=_ADAPTERS,
        adapter_poll_s=0,
        max_n=16,
        max_tokens_limit=64,
        max_prompt_tokens=128,
        max_body_bytes=MAX_BODY,
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
    ),
    backend_factory=lambda s: BACKEND,
    background_load=False,
)
SCHEMA = schemathesis.openapi.from_dict(APP.openapi())


@pytest.fixture(scope="module")
def url(figures) -> Iterator[str]:
    make_fake_adapter(_ADAPTERS / "vbon-n8", n=8)
    try:
        with serve_in_thread(APP) as u:
            yield u
    finally:
        shutil.rmtree(_ADAPTERS, ignore_errors=True)
    if SEEN["calls"]:
        figures.add(
            "fuzz: every route from the OpenAPI schema",
            inputs=SEEN["calls"],
            **{"5xx": SEEN["5xx"]},
            note=f"{EXAMPLES} examples/route, valid + invalid; {SEEN['2xx']} answered 2xx",
        )


def auth(path: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY if path.startswith('/admin') else API_KEY}"}


@SCHEMA.parametrize()
@settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None
)
def test_every_route_answers_by_its_schema(url: str, case: schemathesis.Case) -> None:
    response = case.call(base_url=url, headers=auth(case.path), timeout=30)
    SEEN["calls"] += 1
    SEEN["5xx"] += response.status_code >= 500
    SEEN["2xx"] += 200 <= response.status_code < 300
    # Every other built-in check runs (no 5xx, documented status / content type / body schema,
    # schema-invalid input rejected). Not "schema-valid input accepted": some rules are
    # cross-field or set by the operator (exactly one of prompt/messages, VBON_MAX_N, the
    # context length), so a schema-valid body can rightly get a 400; those rules have their
    # own tests in tests/test_server_api.py.
    case.validate_response(response, excluded_checks=[positive_data_acceptance])


HOSTILE = [
    ("invalid UTF-8", b'{"prompt": "\xff\xfe caf\xc3"}', "not UTF-8 JSON"),
    ("deeply nested arrays", b"[" * 30_000 + b"]" * 30_000, "nests too deeply"),
    ("deeply nested objects", b'{"prompt": ' + b'{"a": ' * 8_000 + b"1" + b"}" * 8_001, ""),
    ("lone surrogate", b'{"prompt": "hi \\ud800"}', "invalid Unicode"),
    ("huge n", b'{"prompt": "hi", "n": 100000000000000000000000000000}', "0000000000"),
    ("n as a huge float", b'{"prompt": "hi", "n": 1e400}', "'n'"),
    ("huge max_tokens", b'{"prompt": "hi", "max_tokens": 99999999999}', "max_tokens"),
    ("NaN temperature", b'{"prompt": "hi", "temperature": NaN}', "finite"),
    ("prompt over the context", b'{"prompt": "' + b"word " * 2000 + b'"}', "prompt"),
    ("not an object", b'"just a string"', ""),
    ("null body", b"null", ""),
]
ROUTES = ["/v1/bon", "/v1/vbon", "/v1/completions", "/v1/chat/completions"]


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_bodies_get_a_4xx_before_any_generation(url: str, route: str, figures) -> None:
    calls_before = len(BACKEND.calls)
    for name, body, needle in HOSTILE:
        r = httpx.post(
            url + route,
            content=body,
            headers={**auth(route), "content-type": "application/json"},
            timeout=30,
        )
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        message = r.json()["error"]["message"]
        if route in ("/v1/bon", "/v1/vbon"):  # (OpenAI routes name their own fields)
            assert needle in message, (name, message)
    assert len(BACKEND.calls) == calls_before, "a hostile body reached the engine"
    figures.add(f"hostile bodies: {route}", inputs=len(HOSTILE), **{"5xx": 0})


def test_bodies_over_the_limit_are_refused_without_being_read(url: str, figures) -> None:
    client = httpx.Client(base_url=url, timeout=30)
    big = b'{"prompt": "' + b"x" * (MAX_BODY + 10) + b'"}'
    r = client.post("/v1/bon", content=big, headers=auth("/v1/bon"))
    assert r.status_code == 413 and "VBON_MAX_BODY_BYTES" in r.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit counts while reading
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    r = client.post("/v1/bon", content=chunks(), headers=auth("/v1/bon"))
    assert r.status_code == 413
    # A malformed Content-Length (no client library sends one): raw bytes on the socket.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/bon HTTP/1.1\r\nHost: x\r\nContent-Length: nonsense\r\n\r\n{}")
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
    figures.add("bodies over the size limit", inputs=3, **{"5xx": 0})


STREAMS = [
    ("/v1/vbon", {"prompt": "a", "stream": True, "score": True}),
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "stream": True}),
    ("/v1/chat/completions", {"model": "vbon-n8", "stream": True,
                              "messages": [{"role": "user", "content": "a"}]}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), STREAMS)
def test_streamed_answers_match_the_schema(url: str, path: str, body: dict) -> None:
    # Random bodies rarely ask for a valid stream; these do, so the event-stream branch of
    # each schema is checked for sure.
    case = SCHEMA[path]["POST"].Case(body=body, media_type="application/json")
    response = case.call(base_url=url, headers=auth(path), timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"][0].startswith("text/event-stream")
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
