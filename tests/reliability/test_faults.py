"""Faults in the serving path, on the fake engine (fast; the real-engine versions run in
tests/reliability/test_load.py and tests/test_server_engine.py): a reward model that raises or
returns NaN, an engine that dies mid-request, corrupt or half-copied adapters, a client that
leaves mid-generation, and SIGTERM with requests in flight."""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.server_proc import ServerProcess, serve_in_thread


class FlakyReward:
    """Raises for prompts that say 'explode', NaN for 'nan'; VADER-like scores otherwise."""

    name = "flaky"

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        if any("explode" in p for p in prompts):
            raise RuntimeError("classifier exploded")
        if any("nan" in p for p in prompts):
            return [math.nan] * len(completions)
        return [float(c.count("good") - c.count("bad")) for c in completions]

    def describe(self) -> dict:
        return {"backend": "flaky"}


def make_app(tmp_path: Path, backend: FakeBackend, **overrides):
    settings = ServerSettings(
        adapters_dir=tmp_path / "adapters", adapter_poll_s=0, admin_key="adm", **overrides
    )
    return create_app(
        settings,
        backend_factory=lambda s: backend,
        reward_factory=lambda s: FlakyReward(),
        background_load=False,
    )


SCORING = [
    ("/v1/bon", {"n": 4}),
    ("/v1/vbon", {"score": True}),
    ("/v1/completions", {"model": "fake-model", "best_of": 3}),
    ("/v1/chat/completions", {"model": "bon-4"}),
]


def body(route: str, text: str, extra: dict) -> dict:
    if route == "/v1/chat/completions":
        return {"messages": [{"role": "user", "content": text}], **extra}
    return {"prompt": text, **extra}


def test_reward_failures_are_clear_500s_and_the_server_goes_on(tmp_path: Path, figures) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    fake = FakeBackend()
    with TestClient(make_app(tmp_path, fake), raise_server_exceptions=False) as c:
        injected = 0
        for route, extra in SCORING:
            for text, needle in (("explode", "server log has the details"), ("nan", "non-finite")):
                r = c.post(route, json=body(route, text, extra), timeout=30)
                injected += 1
                assert r.status_code == 500, (route, text, r.text)
                err = r.json()["error"]
                assert err["code"] == "reward_model_error" and needle in err["message"]
            ok = c.post(route, json=body(route, "fine", extra))
            assert ok.status_code == 200, (route, ok.text)
        assert c.get("/ready").status_code == 200
        assert fake.running == set()
    figures.add("reward raises / returns NaN", faults=injected, survived=injected,
                **{"5xx": injected}, note="500 reward_model_error, then 200")  # fmt: skip


def test_engine_death_mid_request_gives_503_and_fails_ready(tmp_path: Path, figures) -> None:
    fake = FakeBackend(delay_s=1.0)
    with serve_in_thread(make_app(tmp_path, fake)) as url:
        answers: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: answers.append(
                httpx.post(url + "/v1/bon", json={"prompt": "a"}, timeout=30)
            )
        )
        t.start()
        while not fake.running:
            time.sleep(0.01)
        fake.dead = True  # the engine dies while the request is generating
        t.join(30)
        assert answers[0].status_code == 503 and "Retry-After" in answers[0].headers
        assert "died" in answers[0].json()["error"]["message"]
        r = httpx.post(url + "/v1/bon", json={"prompt": "a"}, timeout=30)
        assert r.status_code == 503
        ready = httpx.get(url + "/ready", timeout=30)
        assert ready.status_code == 503 and ready.json()["engine"]["ok"] is False
        assert httpx.get(url + "/health", timeout=30).status_code == 503  # restart me
    figures.add("engine dies mid-request (fake)", faults=1, survived=1,
                note="in-flight and new requests 503, /ready and /health 503")  # fmt: skip


def _corrupt(folder: Path, how: str) -> None:
    weights = folder / "adapter_model.safetensors"
    if how == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:64])
    elif how == "no weights (half copied)":
        weights.unlink()
    elif how == "no metadata":
        (folder / "vbon.json").unlink()
    elif how == "garbage metadata":
        (folder / "vbon.json").write_text("{not json")
    elif how == "garbage adapter config":
        (folder / "adapter_config.json").write_text('{"r": "many"}')
    elif how == "rank over the limit":
        (folder / "adapter_config.json").write_text(
            '{"r": 512, "lora_alpha": 16, "peft_type": "LORA", "target_modules": ["q_proj"]}'
        )


CORRUPTIONS = [
    "truncated weights",
    "no weights (half copied)",
    "no metadata",
    "garbage metadata",
    "garbage adapter config",
    "rank over the limit",
]


def test_corrupt_adapters_are_refused_and_the_previous_one_keeps_serving(
    tmp_path: Path, figures
) -> None:
    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "vbon-n8", n=8)
    admin = {"Authorization": "Bearer adm"}
    with TestClient(make_app(tmp_path, FakeBackend())) as c:
        v1 = c.post("/v1/vbon", json={"prompt": "a"}).json()["adapter"]["version"]
        for how in CORRUPTIONS:
            staged = make_fake_adapter(tmp_path / "staging" / "vbon-n8", n=8, seed=7)
            _corrupt(staged, how)
            shutil.rmtree(adapters / "vbon-n8")
            staged.rename(adapters / "vbon-n8")
            r = c.post("/admin/adapters/reload", headers=admin)
            assert r.status_code == 200 and "vbon-n8" in r.json()["refused"], (how, r.json())
            served = c.post("/v1/vbon", json={"prompt": "a"})
            assert served.status_code == 200, (how, served.text)
            assert served.json()["adapter"]["version"] == v1, how
            shutil.rmtree(tmp_path / "staging")
    figures.add("corrupt / half-copied adapters", faults=len(CORRUPTIONS),
                survived=len(CORRUPTIONS), note="refused; previous version served")  # fmt: skip


def test_client_disconnect_releases_the_engine(tmp_path: Path, figures) -> None:
    fake = FakeBackend(delay_s=5.0)
    with serve_in_thread(make_app(tmp_path, fake)) as url:
        for _ in range(3):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/bon", json={"prompt": "a"}, timeout=0.5)
        deadline = time.monotonic() + 10
        while fake.running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fake.running == set(), "the engine still runs requests of clients that left"
        ready = httpx.get(url + "/ready", timeout=10).json()
        assert ready["samples_in_flight"] == 0 and ready["engine_running_requests"] == 0
    figures.add("client disconnects mid-generation (fake)", faults=3, survived=3,
                note="engine requests aborted")  # fmt: skip


@pytest.fixture
def fake_gateway(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(tmp_path / "adapters"),
            "VBON_TEST_DELAY_S": "3",
            "VBON_REQUEST_TIMEOUT_S": "30",
        },
        tmp_path / "gateway.log",
        timeout_s=60,
        module="tests.reliability.fake_gateway",
    )
    try:
        yield proc
    finally:
        proc.stop(signal.SIGKILL)


def test_sigterm_drains_requests_in_flight_before_exit(fake_gateway: ServerProcess, figures):
    url = fake_gateway.url
    answers: list[httpx.Response | Exception] = []

    def call(i: int) -> None:
        try:
            answers.append(httpx.post(url + "/v1/bon", json={"prompt": f"p{i}", "n": 2},
                                      timeout=60))  # fmt: skip
        except Exception as exc:  # recorded, so the assertion below shows it
            answers.append(exc)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while httpx.get(url + "/ready", timeout=5).json()["samples_in_flight"] < 8:
        assert time.monotonic() < deadline, "requests did not start"
        time.sleep(0.05)
    fake_gateway.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # Draining: no new work is accepted ...
    with pytest.raises(httpx.TransportError):
        httpx.post(url + "/v1/bon", json={"prompt": "late"}, timeout=5)
    # ... and every request in flight finishes normally.
    for t in threads:
        t.join(60)
    assert [getattr(a, "status_code", a) for a in answers] == [200] * 4
    assert all(a.json()["text"] for a in answers)
    # uvicorn re-raises the signal once it has shut down cleanly, so the status says SIGTERM.
    assert fake_gateway.proc.wait(30) in (0, -signal.SIGTERM)
    assert "Finished server process" in fake_gateway.tail(100_000)
    figures.add("SIGTERM with 4 requests in flight", faults=1, survived=1,
                note="4/4 answered 200, new connections refused, clean exit")  # fmt: skip
