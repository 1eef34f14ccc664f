"""Security: the API key guards every route but /health (the list comes from the app, so a new
route cannot be missed), admin routes need their own key, no secret reaches a log line or a
response, and adapter names from requests cannot reach outside the adapters folder. (CORS off
by default: tests/test_server_api.py::test_cors_is_off_by_default.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Route

from server.app import create_app
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend

API_KEY = "sk-vbon-SECRET-7f3a9c1e55"
ADMIN_KEY = "adm-vbon-SECRET-91c2d0b7aa"
SECRETS = (API_KEY, ADMIN_KEY, "SECRET-7f3a", "SECRET-91c2")


def make_app(tmp_path: Path, backend: FakeBackend | None = None, **overrides):
    keys = {"api_key": API_KEY, "admin_key": ADMIN_KEY, **overrides}
    settings = ServerSettings(adapters_dir=tmp_path / "adapters", adapter_poll_s=0, **keys)
    fake = backend or FakeBackend()
    return create_app(settings, backend_factory=lambda s: fake, background_load=False), settings


def routes(app) -> list[tuple[str, str]]:
    out = []
    for r in app.routes:
        if isinstance(r, APIRoute | Route):
            out += [(m, r.path) for m in sorted(r.methods or ()) if m != "HEAD"]
    return out


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    app, _ = make_app(tmp_path)
    with TestClient(app) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_but_health_refuses_requests_without_the_key(client, figures) -> None:
    table = routes(client.app)
    paths = {p for _, p in table}
    # The app's own list, checked against what we know it must hold.
    must = {"/v1/bon", "/v1/vbon", "/v1/completions", "/v1/chat/completions", "/v1/models",
            "/ready", "/metrics", "/openapi.json", "/docs", "/admin/adapters/reload"}  # fmt: skip
    assert must <= paths
    tried = 0
    for method, path in table:
        body = {"prompt": "a"} if method == "POST" else None
        wrong = [
            {},
            bearer("wrong"),
            bearer(API_KEY[:-1]),
            {"Authorization": f"Basic {API_KEY}"},
            {"Authorization": API_KEY},
        ]
        if path.startswith("/admin"):
            wrong.append(bearer(API_KEY))  # the API key does not open admin routes
        for headers in wrong:
            r = client.request(method, path, json=body, headers=headers)
            tried += 1
            if path == "/health":
                assert r.status_code == 200
                continue
            if method == "GET" and path.startswith("/playground"):
                # The page's static files load without a key (a browser's navigation sends
                # none); the page sends the key on its API calls, which need it.
                # (`{name}` is the route's template: no such file, a 404, still no 401.)
                assert r.status_code == (404 if "{" in path else 200), (path, r.status_code)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        right = ADMIN_KEY if path.startswith("/admin") else API_KEY
        r = client.request(method, path, json=body, headers=bearer(right))
        assert r.status_code not in (401, 403), (method, path, r.text)
    # The admin key is not an API key either.
    assert (
        client.post("/v1/bon", json={"prompt": "a"}, headers=bearer(ADMIN_KEY)).status_code == 401
    )
    figures.add("security: API/admin key on every route", inputs=tried, **{"5xx": 0},
                note=f"{len(table)} routes")  # fmt: skip


def test_admin_routes_are_off_without_an_admin_key(tmp_path: Path) -> None:
    app, _ = make_app(tmp_path, admin_key=None)
    with TestClient(app) as c:
        r = c.post("/admin/adapters/reload", headers=bearer(API_KEY))
    assert r.status_code == 403 and "VBON_ADMIN_KEY" in r.json()["error"]["message"]


def test_no_secret_in_logs_responses_or_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    app, settings = make_app(
        tmp_path, bon_log_path=tmp_path / "bon.jsonl", upstream_api_key=API_KEY
    )
    texts = [repr(settings), str(settings), settings.model_dump_json()]
    with TestClient(app, raise_server_exceptions=False) as c:
        for headers in ({}, bearer(API_KEY[:-2]), bearer(API_KEY + "x"), bearer(ADMIN_KEY)):
            for method, path in routes(app):
                r = c.request(method, path, json={"prompt": "a"}, headers=headers)
                texts += [r.text, str(r.headers)]
        r = c.post("/v1/bon", json={"prompt": "a", "n": 2}, headers=bearer(API_KEY))
        assert r.status_code == 200  # (so the BoN log below has a line)
        for path in ("/ready", "/metrics", "/openapi.json"):
            texts.append(c.get(path, headers=bearer(API_KEY)).text)
    out, err = capfd.readouterr()
    texts += [caplog.text, out, err, (tmp_path / "bon.jsonl").read_text()]
    leaks = [t for t in texts if any(s in t for s in SECRETS)]
    assert not leaks, leaks[0][:500]


OUTSIDE_NAMES = [
    "../outside",
    "../outside/evil",
    "..",
    "../../etc/passwd",
    "/etc/passwd",
    "vbon-n8/../../outside/evil",
    "..%2Foutside%2Fevil",
    "vbon-n8/..",
    "evil\x00",
    "C:\\evil",
    "~/evil",
    "vbon-n8\n",
]


def test_adapter_names_cannot_escape_the_adapters_folder(tmp_path: Path, figures) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    # A valid adapter just outside the adapters folder: reachable only by a path.
    make_fake_adapter(tmp_path / "outside" / "evil", n=3)
    make_fake_adapter(tmp_path / "outside", n=5)
    fake = FakeBackend()
    app, _ = make_app(tmp_path, fake)
    with TestClient(app) as c:
        for name in OUTSIDE_NAMES:
            for route, body in (
                ("/v1/vbon", {"prompt": "a", "adapter": name}),
                ("/v1/completions", {"prompt": "a", "model": name}),
                (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "a"}], "model": name},
                ),  # fmt: skip
            ):
                r = c.post(route, json=body, headers=bearer(API_KEY))
                assert r.status_code in (400, 404), (route, name, r.status_code)
        served = {m["id"] for m in c.get("/v1/models", headers=bearer(API_KEY)).json()["data"]}
    assert not {"evil", "outside"} & served
    used = {call["lora"].path for call in fake.calls if call["lora"] is not None}
    assert not used, used  # not one generation ran with an adapter from outside
    figures.add("security: adapter names as paths", inputs=3 * len(OUTSIDE_NAMES), **{"5xx": 0})
