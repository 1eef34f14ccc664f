"""API tests against a fast fake engine (same interface as the vLLM backend). The same paths run
against the real engine in tests/test_server_engine.py."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend, bos_tokenizer


def make_client(tmp_path: Path, backend: FakeBackend | None = None, **overrides) -> TestClient:
    fields = {
        "adapters_dir": tmp_path / "adapters",
        "adapter_poll_s": 0,
        "max_n": 16,
        "max_tokens_limit": 64,
        "max_prompt_tokens": 50,
        **overrides,
    }
    settings = ServerSettings(**fields)
    fake = backend or FakeBackend()
    app = create_app(settings, backend_factory=lambda s: fake, background_load=False)
    return TestClient(app)


@pytest.fixture
def client(tmp_path: Path):
    with make_client(tmp_path) as c:
        yield c


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200
    body = r.json()
    assert body["ready"] and body["reward"]["backend"] == "vader" and body["adapters"] == []


def test_bon_returns_highest_reward_candidate(client: TestClient) -> None:
    r = client.post(
        "/v1/bon",
        json={"prompt": "The film", "n": 8, "seed": 5, "return_candidates": True, "max_tokens": 12},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    cands = body["candidates"]
    assert len(cands) == 8
    assert body["reward"] == max(c["reward"] for c in cands)
    assert [c["rank"] for c in cands] == list(range(1, 9))
    assert [c["reward"] for c in cands] == sorted((c["reward"] for c in cands), reverse=True)
    best = cands[0]
    assert body["text"] == best["text"] and body["index"] == best["index"]
    assert sorted(c["seed"] for c in cands) == list(range(5, 13))
    assert body["seed"] == 5 + body["index"]
    assert body["kl_bound"] == pytest.approx(math.log(8) - 7 / 8)
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in cands)
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + sum(
        c["tokens"] for c in cands
    )
    assert set(body["timings"]) == {"generation_s", "scoring_s", "total_s"}


def test_bon_same_seed_same_result(client: TestClient) -> None:
    req = {"prompt": "The film", "n": 4, "seed": 11}
    assert (
        client.post("/v1/bon", json=req).json()["text"]
        == client.post("/v1/bon", json=req).json()["text"]
    )


def test_bon_with_messages_uses_chat_template(tmp_path: Path) -> None:
    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        r = c.post("/v1/bon", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2})
        assert r.status_code == 200
    assert fake.calls[-1]["prompt"] == "<user>Hi\n<assistant>"
    assert fake.calls[-1]["n"] == 2


def test_sampling_defaults_come_from_core(tmp_path: Path) -> None:
    from vbon.sampling import Sampling

    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        c.post("/v1/bon", json={"prompt": "x y", "n": 2})
        c.post("/v1/completions", json={"model": "fake-model", "prompt": "x y"})
    assert fake.calls[0]["sampling"] == Sampling()
    assert fake.calls[1]["sampling"] == Sampling()


BAD_BON = [
    ({"n": 4}, "prompt"),
    ({"prompt": "", "n": 4}, "must not be empty"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "only one"),
    # Each out-of-range number names the field, the value and the whole allowed range.
    ({"prompt": "a", "n": 0}, "'n' is 0; allowed: 1 <= n <= 16"),
    ({"prompt": "a", "n": 17}, "'n' is 17; allowed: 1 <= n <= 16"),
    ({"prompt": "a", "max_tokens": 0}, "'max_tokens' is 0; allowed: 1 <= max_tokens <= 64"),
    ({"prompt": "a", "max_tokens": 65}, "'max_tokens' is 65; allowed: 1 <= max_tokens <= 64"),
    ({"prompt": "a", "temperature": -1}, "allowed: 0.0 <= temperature <= 2.0"),
    ({"prompt": "a", "temperature": 2.5}, "allowed: 0.0 <= temperature <= 2.0"),
    ({"prompt": "a", "n": 4, "temperature": 0}, "best-of-N needs temperature > 0"),
    ({"prompt": "a", "top_p": 0}, "'top_p' is 0; allowed: 0.0 < top_p <= 1.0"),
    ({"prompt": "a", "seed": -1}, "allowed: 0 <= seed <= 2147483647"),
    ({"prompt": "a", "n": "x"}, "'n' must be an integer (got 'x'); allowed: 1 <= n <= 16"),
    ({"prompt": ["a"]}, "'prompt' must be a string (got ['a'])"),
    # A union's members are ours to know: one sentence for the field, not one per member.
    ({"prompt": "a", "stop": 5}, "'stop' must be a list or a string (got 5)"),
    ({"prompt": "a", "top_k": 1.5}, "'top_k' must be an integer (got 1.5); allowed: top_k >= -1"),
    ({"messages": "hi"}, "'messages' must be a list (got 'hi')"),
    ({"prompt": "a", "bogus": 1}, "'bogus' is not a known field"),
    ({"prompt": "word " * 60}, "the prompt has 60 tokens; the limit is 50"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"messages": []}, "at least one"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
]


@pytest.mark.parametrize(("body", "needle"), BAD_BON)
def test_bon_bad_input_is_a_400_naming_the_field(
    client: TestClient, body: dict, needle: str
) -> None:
    r = client.post("/v1/bon", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"


def test_malformed_json_and_wrong_content(client: TestClient) -> None:
    r = client.post("/v1/bon", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = client.post(
        "/v1/bon", content=b"\xff\xfe\x00", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    r = client.post("/v1/bon", json=[1, 2])
    assert r.status_code == 400


def test_context_overflow_says_how_to_fix(tmp_path: Path) -> None:
    with make_client(tmp_path, FakeBackend(max_model_len=60)) as c:
        r = c.post("/v1/bon", json={"prompt": "w " * 40, "max_tokens": 30})
    assert r.status_code == 400
    assert "lower max_tokens to 20" in r.json()["error"]["message"]


def test_body_over_limit_is_413(tmp_path: Path) -> None:
    with make_client(tmp_path, max_body_bytes=2048) as c:
        r = c.post("/v1/bon", json={"prompt": "x" * 5000})
    assert r.status_code == 413


def test_unknown_route_and_method(client: TestClient) -> None:
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/bon").json()["error"]["message"].startswith("method not allowed")


def test_in_flight_limit_gives_429_with_retry_after(tmp_path: Path) -> None:
    import anyio

    fake = FakeBackend(delay_s=0.5)
    with make_client(tmp_path, fake, max_samples_in_flight=8) as c:
        results: list = []

        async def burst() -> None:
            async def one() -> None:
                results.append(
                    await anyio.to_thread.run_sync(
                        lambda: c.post("/v1/bon", json={"prompt": "a", "n": 4})
                    )
                )

            async with anyio.create_task_group() as tg:
                for _ in range(6):
                    tg.start_soon(one)

        anyio.run(burst)
        codes = sorted(r.status_code for r in results)
        assert codes.count(200) >= 2 and 429 in codes
        shed = next(r for r in results if r.status_code == 429)
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["type"] == "rate_limit_error"
        assert c.post("/v1/bon", json={"prompt": "a", "n": 4}).status_code == 200  # recovers
        assert 'vbon_rejected_total{reason="samples_in_flight"}' in c.get("/metrics").text


def test_engine_not_ready_or_dead_is_503(tmp_path: Path) -> None:
    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        fake.dead = True
        r = c.post("/v1/bon", json={"prompt": "a"})
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert c.get("/ready").status_code == 503
        # A dead engine fails liveness too, so an orchestrator restarts the process.
        health = c.get("/health")
        assert health.status_code == 503 and "died" in health.json()["reason"]


def test_engine_loading_is_alive(tmp_path: Path) -> None:
    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        fake.started = False  # loading (or restarting): not ready, but alive
        assert c.get("/ready").status_code == 503 and c.get("/health").status_code == 200


def test_a_client_that_leaves_is_counted_as_499_not_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeBackend(delay_s=5.0)
    with make_client(tmp_path, fake) as c:
        app = c.app
        body = json.dumps({"prompt": "a", "n": 2}).encode()
        sent: list[dict] = []

        async def go() -> None:
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive() -> dict:
                if messages:
                    return messages.pop()
                await asyncio.sleep(0.2)  # then the client goes away
                return {"type": "http.disconnect"}

            async def send(msg: dict) -> None:
                sent.append(msg)

            scope = {"type": "http", "method": "POST", "path": "/v1/bon", "raw_path": b"/v1/bon",
                     "query_string": b"", "headers": [(b"content-type", b"application/json")],
                     "http_version": "1.1", "scheme": "http", "server": ("t", 80),
                     "client": ("c", 1), "root_path": "", "app": app}
            await app(scope, receive, send)

        with caplog.at_level(logging.DEBUG):
            c.portal.call(go)  # type: ignore[attr-defined]
        assert sent[0]["status"] == 499 and fake.running == set()
        # A client leaving is not a server error: nothing at ERROR, no traceback in the log.
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        assert "Traceback" not in caplog.text
        assert not any(r.exc_info for r in caplog.records)
        metrics = c.get("/metrics").text
        assert 'vbon_requests_total{route="/v1/bon",status="499"} 1.0' in metrics
        assert 'status="500"' not in metrics and "vbon_client_disconnects_total 1.0" in metrics


def test_cors_preflight_is_answered_without_the_key(tmp_path: Path) -> None:
    with make_client(tmp_path, api_key="k", cors_origins=["https://app.example"]) as c:
        pre = c.options("/v1/bon", headers={"Origin": "https://app.example",
                                            "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization"})
        assert pre.status_code == 200
        assert pre.headers["access-control-allow-origin"] == "https://app.example"
        no_key = c.post("/v1/bon", json={"prompt": "a"}, headers={"Origin": "https://app.example"})
        assert no_key.status_code == 401  # the key is still required, with CORS headers
        assert no_key.headers["access-control-allow-origin"] == "https://app.example"


def test_reward_failure_is_a_clear_500(tmp_path: Path) -> None:
    class Broken:
        name = "broken"

        def score(self, prompts, completions):
            raise RuntimeError("classifier exploded")

        def describe(self):
            return {"backend": "broken"}

    settings = ServerSettings(adapters_dir=tmp_path, adapter_poll_s=0)
    # Loaded before the first request (as make_client does): with the load in the background a
    # busy machine answered 503 (not ready yet) instead of the 500 under test.
    app = create_app(
        settings,
        backend_factory=lambda s: FakeBackend(),
        reward_factory=lambda s: Broken(),
        background_load=False,
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/v1/bon", json={"prompt": "a", "n": 2})
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "reward model failed" in message and "server log" in message
    assert "exploded" not in message  # the exception's text stays in the log
    assert r.json()["error"]["code"] == "reward_model_error"


# One streamed request per streaming route (the vBoN one needs an adapter named vbon-8).
STREAM_REQUESTS = [
    ("/v1/completions", {"model": "fake-model", "prompt": "a", "stream": True}),
    (
        "/v1/chat/completions",
        {"model": "fake-model", "messages": [{"role": "user", "content": "a"}], "stream": True},
    ),
    ("/v1/vbon", {"prompt": "a", "stream": True}),
]


@pytest.mark.parametrize(("path", "body"), STREAM_REQUESTS)
def test_every_stream_sheds_with_429_before_its_200(
    tmp_path: Path, path: str, body: dict
) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-8")
    with make_client(tmp_path, max_samples_in_flight=2) as c:
        budget = c.app.state.gateway.budget
        budget.take(2)  # the server is full
        r = c.post(path, json=body)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        budget.release(2)
        with c.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and '"error"' not in "".join(events)
        assert budget.in_flight == 0  # the stream gave its unit back


class RefusingStreamBackend(FakeBackend):
    """An engine that refuses a stream's parameters at its first step, as vLLM does for a value
    it checks more strictly than our request models (or a remote upstream answering 400)."""

    async def stream(self, prompt, sampling, request_id, lora=None):  # type: ignore[override]
        from server.backend import InvalidRequest

        self.running.add(request_id)
        try:
            raise InvalidRequest("temperature must be at most 2", "temperature")
            yield  # an async generator, like the real one
        finally:
            self.running.discard(request_id)


@pytest.mark.parametrize(("path", "body"), STREAM_REQUESTS)
def test_a_stream_the_engine_refuses_at_its_start_is_a_400_not_an_event_after_a_200(
    tmp_path: Path, path: str, body: dict
) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-8")
    with make_client(tmp_path, RefusingStreamBackend()) as c:
        r = c.post(path, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "temperature" and "at most 2" in error["message"]
        assert c.app.state.gateway.budget.in_flight == 0  # its admission was given back
        metrics = c.get("/metrics").text
        assert f'route="{path}",status="400"' in metrics, metrics


def test_one_deadline_covers_every_prompt_of_a_request(tmp_path: Path) -> None:
    # Each prompt alone fits the limit; the eight together do not.
    with make_client(tmp_path, FakeBackend(delay_s=0.15), request_timeout_s=0.6) as c:
        one = c.post("/v1/completions", json={"model": "fake-model", "prompt": "a"})
        assert one.status_code == 200
        r = c.post("/v1/completions", json={"model": "fake-model", "prompt": ["a"] * 8})
    assert r.status_code == 504 and "VBON_REQUEST_TIMEOUT_S" in r.json()["error"]["message"]


class SlowReward:
    """A reward that takes its time and records the admission budget while it scores."""

    name = "slow"

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.budget = None
        self.seen_in_flight: list[int] = []

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        import time

        self.seen_in_flight.append(self.budget.in_flight if self.budget else -1)
        time.sleep(self.delay_s)
        return [0.5] * len(completions)

    def describe(self) -> dict:
        return {"backend": "slow"}


@pytest.mark.parametrize("path", ["/v1/bon", "/v1/vbon"])
def test_scoring_counts_against_the_deadline_and_the_budget(tmp_path: Path, path: str) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-8")
    reward = SlowReward(delay_s=0.0)
    settings = ServerSettings(adapters_dir=tmp_path / "adapters", adapter_poll_s=0,
                              request_timeout_s=0.5)
    app = create_app(settings, backend_factory=lambda s: FakeBackend(),
                     reward_factory=lambda s: reward, background_load=False)
    body = {"prompt": "a", "n": 4} if path == "/v1/bon" else {"prompt": "a", "score": True}
    with TestClient(app) as c:
        reward.budget = c.app.state.gateway.budget
        assert c.post(path, json=body).status_code == 200
        assert reward.seen_in_flight == [4 if path == "/v1/bon" else 1]  # still admitted
        reward.delay_s = 1.0  # generation is instant; scoring alone overruns the limit
        r = c.post(path, json=body)
    assert r.status_code == 504, r.text


def test_timeout_is_504(tmp_path: Path) -> None:
    with make_client(tmp_path, FakeBackend(delay_s=2), request_timeout_s=0.2) as c:
        r = c.post("/v1/bon", json={"prompt": "a"})
    assert r.status_code == 504 and "VBON_REQUEST_TIMEOUT_S" in r.json()["error"]["message"]


# -- vBoN and adapters --------------------------------------------------------------------


def test_vbon_without_adapter_is_404(client: TestClient) -> None:
    r = client.post("/v1/vbon", json={"prompt": "a"})
    assert r.status_code == 404 and "no vBoN adapter is installed" in r.json()["error"]["message"]


def test_vbon_picks_adapter_by_name_n_or_default(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "vbon-n4", n=4)
    make_fake_adapter(adapters / "vbon-n8", n=8)
    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        r = c.post("/v1/vbon", json={"prompt": "a", "n": 4, "score": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["adapter"]["name"] == "vbon-n4" and body["adapter"]["n"] == 4
        assert body["adapter"]["beta"] == pytest.approx(1 / 3)
        assert isinstance(body["reward"], float)
        assert str(tmp_path) not in r.text  # no server path in responses
        assert fake.calls[-1]["lora"].name.startswith("vbon-n4@v")
        r = c.post("/v1/vbon", json={"prompt": "a", "adapter": "vbon-n8"})
        assert r.json()["adapter"]["name"] == "vbon-n8" and r.json()["reward"] is None
        assert c.post("/v1/vbon", json={"prompt": "a"}).status_code == 200
        r = c.post("/v1/vbon", json={"prompt": "a", "n": 16})
        assert r.status_code == 404 and "[4, 8]" in r.json()["error"]["message"]
        r = c.post("/v1/vbon", json={"prompt": "a", "adapter": "nope"})
        assert r.status_code == 404
        for evil in ("../../etc", "/etc/passwd", "a/b", ".hidden"):
            r = c.post("/v1/vbon", json={"prompt": "a", "adapter": evil})
            assert r.status_code == 400 and "invalid adapter name" in r.json()["error"]["message"]


def test_vbon_stream_sse(tmp_path: Path) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    with (
        make_client(tmp_path) as c,
        c.stream(
            "POST", "/v1/vbon", json={"prompt": "a", "stream": True, "score": True, "seed": 3}
        ) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    assert "reward" in chunks[-1]
    assert all(ch["adapter"]["name"] == "vbon-n8" for ch in chunks)
    assert str(tmp_path) not in json.dumps(chunks)  # no server path in stream chunks
    full = "".join(ch["text"] for ch in chunks)
    with make_client(tmp_path) as c:  # same seed, same text, unstreamed
        assert c.post("/v1/vbon", json={"prompt": "a", "seed": 3}).json()["text"] == full


def test_hot_reload_installs_new_versions_and_refuses_corrupt_ones(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "vbon-n8", n=8)
    with make_client(tmp_path, admin_key="adm") as c:
        first = c.post("/v1/vbon", json={"prompt": "a"}).json()["adapter"]["version"]
        # A new complete version appears (the trainer renames it into place).
        make_fake_adapter(tmp_path / "staging", n=8, seed=1)
        import shutil

        shutil.rmtree(adapters / "vbon-n8")
        (tmp_path / "staging").rename(adapters / "vbon-n8")
        assert c.post("/admin/adapters/reload").status_code == 401  # admin key needed
        r = c.post("/admin/adapters/reload", headers={"Authorization": "Bearer adm"})
        assert r.status_code == 200 and r.json()["installed"] == [f"vbon-n8@v{first + 1}"]
        second = c.post("/v1/vbon", json={"prompt": "a"}).json()["adapter"]["version"]
        assert second == first + 1
        # A half-copied version is refused; the previous one keeps serving.
        w = adapters / "vbon-n8" / "adapter_model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
        r = c.post("/admin/adapters/reload", headers={"Authorization": "Bearer adm"})
        assert "vbon-n8" in r.json()["refused"]
        assert c.post("/v1/vbon", json={"prompt": "a"}).json()["adapter"]["version"] == second
        assert "vbon-n8" in c.get("/ready").json()["refused_adapters"]


def test_adapter_for_another_base_model_is_refused(tmp_path: Path) -> None:
    make_fake_adapter(tmp_path / "adapters" / "other", n=8, base_model="/models/gpt2")
    with make_client(tmp_path) as c:
        ready = c.get("/ready").json()
        assert ready["adapters"] == []
        # The reason says what is wrong, with paths cut to their last part.
        assert "trained on 'gpt2'" in ready["refused_adapters"]["other"]


# -- OpenAI-compatible routes ------------------------------------------------------------


def test_models_lists_base_bon_and_adapters(tmp_path: Path) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    with make_client(tmp_path) as c:
        ids = [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert ids[0] == "fake-model" and "bon" in ids and "bon-8" in ids and "vbon-n8" in ids
    assert "bon-32" not in ids  # above max_n


def test_completions_best_of_ranks_by_reward(client: TestClient) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "fake-model", "prompt": "The film", "best_of": 6, "n": 2, "seed": 1},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert body["choices"][0]["reward"] >= body["choices"][1]["reward"]
    assert body["bon"]["n"] == 6
    bon = client.post("/v1/bon", json={"prompt": "The film", "n": 6, "seed": 1}).json()
    assert body["choices"][0]["text"] == bon["text"]
    assert body["usage"]["completion_tokens"] == bon["usage"]["completion_tokens"]


def test_chat_completions_base_bon_and_vbon(tmp_path: Path) -> None:
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    fake = FakeBackend()
    with make_client(tmp_path, fake) as c:
        msgs = [{"role": "user", "content": "Review"}]
        r = c.post("/v1/chat/completions", json={"model": "fake-model", "messages": msgs})
        body = r.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant"
        assert fake.calls[-1]["lora"] is None and fake.calls[-1]["n"] == 1
        r = c.post("/v1/chat/completions", json={"model": "bon-4", "messages": msgs})
        assert fake.calls[-1]["n"] == 4 and "reward" in r.json()["choices"][0]
        r = c.post("/v1/chat/completions", json={"model": "vbon-8", "messages": msgs})
        assert r.status_code == 200 and fake.calls[-1]["lora"].name.startswith("vbon-n8")
        r = c.post(
            "/v1/chat/completions",
            json={"model": "vbon-n8", "messages": msgs, "max_completion_tokens": 5},
        )
        assert fake.calls[-1]["sampling"].max_tokens == 5


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "gpt-4", "prompt": "a"}, 404, "does not exist"),
        ({"prompt": "a"}, 400, "'model' is required"),
        ({"model": "fake-model", "prompt": "a", "best_of": 1, "n": 2}, 400, "must be >= n"),
        ({"model": "fake-model", "prompt": "a", "best_of": 4, "stream": True}, 400, "stream"),
        ({"model": "fake-model", "prompt": "a", "logprobs": 3}, 400, "logprobs"),
        ({"model": "fake-model", "prompt": "a", "best_of": 64}, 400, "1 <= n <= 16"),
        ({"model": "bon-4", "prompt": "a", "best_of": 8}, 400, "best_of=4"),
        ({"model": "fake-model", "prompt": ""}, 400, "non-empty"),
        ({"model": "fake-model", "prompt": "a", "best_of": 0}, 400, "1 <= best_of <= 16"),
        ({"model": "fake-model", "prompt": "a", "max_tokens": 0}, 400, "1 <= max_tokens <= 64"),
        ({"model": "fake-model", "prompt": "a", "top_p": 2}, 400, "'top_p' is 2; allowed: 0.0 <"),
        ({"model": "fake-model", "prompt": "a", "stop": 5}, 400, "'stop' must be"),
    ],
)
def test_openai_errors_follow_openai_shape(
    client: TestClient, body: dict, status: int, needle: str
) -> None:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_openai_stream(client: TestClient) -> None:
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
        },
    ) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"]["role"] == "assistant"


def test_openai_python_client_works(tmp_path: Path) -> None:
    """The official SDK against our routes (in-process transport)."""
    import openai

    with make_client(tmp_path) as c:
        # TestClient is an httpx.Client, so the SDK can send through it.
        sdk = openai.OpenAI(
            base_url="http://testserver/v1", api_key="x", http_client=c, max_retries=0
        )
        out = sdk.completions.create(model="fake-model", prompt="The film", best_of=4, max_tokens=8)
        assert out.choices[0].text
        chat = sdk.chat.completions.create(
            model="bon-4", messages=[{"role": "user", "content": "hi"}]
        )
        assert chat.choices[0].message.content
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            sdk.completions.create(model="nope", prompt="x")


# -- metrics, auth, logging --------------------------------------------------------------


def test_metrics_count_requests_samples_and_rewards(client: TestClient) -> None:
    client.post("/v1/bon", json={"prompt": "a", "n": 4})
    text = client.get("/metrics").text
    assert 'vbon_requests_total{route="/v1/bon",status="200"} 1.0' in text
    assert 'vbon_samples_generated_total{route="/v1/bon"} 4.0' in text
    assert 'vbon_reward_count{route="/v1/bon"} 1.0' in text
    assert "vbon_in_flight_requests" in text and "vbon_tokens_total" in text


ROUTES = [
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/bon"),
    ("POST", "/v1/vbon"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
]


def test_api_key_guards_every_route_but_health(tmp_path: Path) -> None:
    with make_client(tmp_path, api_key="s3cret-key") as c:
        assert c.get("/health").status_code == 200
        for method, path in ROUTES:
            r = c.request(method, path, json={"prompt": "a"})
            assert r.status_code == 401, (method, path)
            assert "s3cret" not in r.text
            r = c.request(
                method, path, json={"prompt": "a"}, headers={"Authorization": "Bearer wrong"}
            )
            assert r.status_code == 401
        ok = c.post(
            "/v1/bon", json={"prompt": "a", "n": 2}, headers={"Authorization": "Bearer s3cret-key"}
        )
        assert ok.status_code == 200
        # The API key does not open admin routes; without an admin key they are off.
        r = c.post("/admin/adapters/reload", headers={"Authorization": "Bearer s3cret-key"})
        assert r.status_code == 403


def test_cors_is_off_by_default(client: TestClient) -> None:
    r = client.options(
        "/v1/bon",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers


def test_bon_log_writes_trainer_format(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "bon.jsonl"
    with make_client(tmp_path, bon_log_path=log) as c:
        for i in range(3):
            c.post("/v1/bon", json={"prompt": f"p{i}", "n": 3})
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["p0", "p1", "p2"]
    assert all(len(r["responses"]) == 3 == len(r["rewards"]) for r in rows)


def test_while_loading_health_is_200_and_ready_and_api_are_503(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    class SlowStart(FakeBackend):
        async def start(self) -> None:
            import anyio

            await anyio.to_thread.run_sync(release.wait)
            await super().start()

    settings = ServerSettings(adapters_dir=tmp_path, adapter_poll_s=0)
    with TestClient(create_app(settings, backend_factory=lambda s: SlowStart())) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 503
        r = c.post("/v1/bon", json={"prompt": "a"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
            import time

            time.sleep(0.05)
        assert c.post("/v1/bon", json={"prompt": "a", "n": 2}).status_code == 200


def test_failed_startup_is_reported(tmp_path: Path) -> None:
    settings = ServerSettings(adapters_dir=tmp_path, adapter_poll_s=0, reward="no-such-reward")
    with TestClient(
        create_app(settings, backend_factory=lambda s: FakeBackend(), background_load=False)
    ) as c:
        r = c.get("/ready")
        assert r.status_code == 503 and "a setting is invalid" in r.json()["reason"]
        assert c.get("/health").status_code == 503


def test_no_server_path_or_exception_text_reaches_clients(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed start-up and a refused adapter: clients learn that, and a reference into the
    log; the paths on this server and the exception's text go only to the log."""
    secret = f"cannot open {tmp_path / 'models' / 'rm'}: the disk said no"
    adapters = tmp_path / "adapters"
    w = make_fake_adapter(adapters / "vbon-n8", n=8) / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # corrupt

    def failing(settings: ServerSettings):
        raise RuntimeError(secret)

    def bodies(c: TestClient) -> list[str]:
        return [c.get("/health").text, c.get("/ready").text, c.get("/v1/models").text]

    settings = ServerSettings(adapters_dir=adapters, adapter_poll_s=0)
    with caplog.at_level(logging.INFO):
        app = create_app(settings, backend_factory=lambda s: FakeBackend(),
                         reward_factory=failing, background_load=False)
        with TestClient(app) as c:
            bon = c.post("/v1/bon", json={"prompt": "a", "n": 2})
            assert bon.status_code == 503
            seen = [*bodies(c), bon.text]
            assert c.get("/health").status_code == c.get("/ready").status_code == 503
        # The engine's folder under tmp_path, a reward that loads, the corrupt adapter refused.
        fake = FakeBackend()
        fake.model_path = str(tmp_path / "models" / "fake-model")
        with make_client(tmp_path, fake) as c:
            ready = c.get("/ready").json()
            seen += bodies(c)
    assert ready["engine"]["model"] == "fake-model" and "path" not in ready["engine"]
    assert "corrupt weights" in ready["refused_adapters"]["vbon-n8"]
    for body in seen:
        assert str(tmp_path) not in body and "the disk said no" not in body, body
    reason = json.loads(seen[0])["reason"]
    assert "start-up failed" in reason and "server log" in reason
    ref = reason.rsplit(" ", 1)[-1]
    assert ref.startswith("err-") and ref in seen[3]  # the 503 carries the same reference
    # The log has it all: the exception under the same reference, and where the adapter is.
    assert secret in caplog.text and ref in caplog.text
    assert str(adapters / "vbon-n8") in caplog.text


def test_ready_names_a_classifier_reward_without_its_path(
    tmp_path: Path, tiny_classifier: Path
) -> None:
    from vbon.rewards import load_reward

    settings = ServerSettings(adapters_dir=tmp_path, adapter_poll_s=0)
    app = create_app(settings, backend_factory=lambda s: FakeBackend(),
                     reward_factory=lambda s: load_reward(str(tiny_classifier)),
                     background_load=False)
    with TestClient(app) as c:
        r = c.get("/ready")
    reward = r.json()["reward"]
    assert reward["backend"] == "hf-classifier" and reward["model"] == tiny_classifier.name
    assert str(tiny_classifier.parent) not in r.text


def test_a_parameter_the_engine_refuses_is_a_400_naming_it(tmp_path: Path) -> None:
    from server.backend import InvalidRequest

    class Strict(FakeBackend):
        async def generate(self, prompt, sampling, n, request_id, lora=None):
            raise InvalidRequest("top_k must be 0 (disable), or at least 1", "top_k")

    with make_client(tmp_path, Strict()) as c:
        r = c.post("/v1/bon", json={"prompt": "a", "top_k": 5})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "top_k" and "engine refused" in err["message"]


def test_prompt_tokens_are_counted_as_the_engine_counts_them(
    tmp_path: Path, embedded_model: Path
) -> None:
    """A tokenizer that adds a BOS token: the gateway's count must equal the engine's (vLLM
    tokenizes text prompts with add_special_tokens=True), or the context check passes a prompt
    the engine then refuses."""
    from vllm.renderers.params import TokenizeParams

    from server.backend import VLLMBackend

    tok = bos_tokenizer(embedded_model, tmp_path / "bos-tokenizer")
    bos = tok.convert_tokens_to_ids("<|im_start|>")
    text = "a prompt of some words"
    engine_ids = tok.encode(text, **TokenizeParams(max_total_tokens=1024).get_encode_kwargs())
    assert engine_ids[0] == bos  # the tokenizer does add a BOS
    backend = VLLMBackend(ServerSettings(adapters_dir=tmp_path))
    backend._tokenizer = tok
    assert backend.count_tokens(text) == len(engine_ids)
