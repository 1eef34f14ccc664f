"""Remote reward models (VBON_REWARD=http://host:port) served by vLLM's pooling runner.

Fast tests run `RemoteReward` and the gateway against a small HTTP double of vLLM's /classify
(same request and answer shapes as vLLM 0.32, checked in the engine test below); the `engine`
test serves a real tiny reward model with `vllm serve --runner pooling`, compares its scores with
the local classifier's, and kills and restarts it under a gateway."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from clients.launch import free_port
from server.app import create_app
from server.settings import ServerSettings
from tests.fakes import FakeBackend
from tests.server_proc import VllmServeProcess, serve_in_thread
from vbon.errors import ConfigError
from vbon.rewards import RemoteOptions, load_reward
from vbon.rewards.base import RewardModel, reward_health
from vbon.rewards.remote import RemoteReward, RewardServerError
from vbon.settings import CoreSettings


def logits_of(text: str, num_labels: int) -> list[float]:
    """A deterministic fake head: label j's logit depends on the text and on j."""
    return [round(len(text) * 0.37 - 3.1 * j - 2.0, 6) for j in range(num_labels)]


class ClassifyDouble:
    """vLLM's pooling server in miniature: /v1/models, /classify, /health, with faults."""

    def __init__(self, num_labels: int = 1, root: str = "/nowhere/rm", max_model_len: int = 64):
        self.num_labels = num_labels
        self.root = root
        self.max_model_len = max_model_len
        self.requests: list[dict[str, Any]] = []
        self.drop_next = 0  # close the connection without answering, this many times
        self.delay_s = 0.0
        self.mode = "ok"  # ok | error | garbage | short
        self.healthy = True
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, status: int, body: object) -> None:
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _record(self, body: Any) -> None:
                double.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )

            def do_GET(self) -> None:
                self._record(None)
                if self.path == "/health":
                    self._send(200 if double.healthy else 503, {})
                elif self.path == "/v1/models":
                    card = {"id": "rm", "root": double.root, "max_model_len": double.max_model_len}
                    self._send(200, {"object": "list", "data": [card]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._record(body)
                if double.drop_next > 0:
                    double.drop_next -= 1
                    self.close_connection = True  # no answer: the client sees a dropped link
                    return
                time.sleep(double.delay_s)
                if double.mode == "error":
                    self._send(500, {"error": {"message": "EngineCore encountered an issue"}})
                    return
                if double.mode == "garbage":
                    self._send(200, "<html>proxy error</html>")
                    return
                texts = body["input"]
                data = [
                    {"index": i, "label": "x", "probs": logits_of(t, double.num_labels),
                     "num_classes": double.num_labels}
                    for i, t in enumerate(texts)
                ]  # fmt: skip
                if double.mode == "short":
                    data = data[:-1]
                self._send(200, {"object": "list", "model": body["model"], "data": data})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def posts(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == "/classify"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def double() -> Iterator[ClassifyDouble]:
    d = ClassifyDouble()
    yield d
    d.close()


def remote(url: str, **kw: Any) -> RemoteReward:
    return RemoteReward(url, backoff_s=0.01, health_ttl_s=0.0, **kw)


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


# --- RemoteReward against the double ----------------------------------------------------------


def test_one_batched_call_with_raw_scores_and_the_key(double: ClassifyDouble) -> None:
    r = remote(double.url, api_key="sekret", max_length=512)
    assert isinstance(r, RewardModel)
    texts = ["good", "a longer completion", "bad", ""]
    got = r.score(["p"] * 4, texts)
    (post,) = double.posts()  # one POST for the whole batch
    body = post["body"]
    assert body["model"] == "rm" and body["use_activation"] is False
    assert body["input"] == ["good", "a longer completion", "bad", " "]  # empty: one space
    # Truncation to what the server can read (its max_model_len, under max_length).
    assert body["truncate_prompt_tokens"] == 64 and body["truncation_side"] == "right"
    assert post["auth"] == "Bearer sekret"
    assert all(q["auth"] == "Bearer sekret" for q in double.requests)
    # The raw logit, as served: a single-logit model never collapses to 1.0.
    assert got == [logits_of(t or " ", 1)[0] for t in texts]
    assert len(set(got)) == 4
    assert r.describe()["model"] == "rm" and r.describe()["backend"] == "remote"
    assert r.score([], []) == []
    assert len(double.posts()) == 1


def test_model_name_and_label_index(double: ClassifyDouble) -> None:
    double.num_labels = 3
    r = remote(double.url, model="rm", label=1)
    got = r.score(["p", "p"], ["one", "three"])
    assert got == [logits_of("one", 3)[1], logits_of("three", 3)[1]]
    # Default: the last label.
    assert remote(double.url).score(["p"], ["one"]) == [logits_of("one", 3)[2]]
    with pytest.raises(RewardServerError, match="out of range.*3 labels") as err:
        remote(double.url, label=5).score(["p"], ["x"])
    assert err.value.status == 502
    with pytest.raises(ConfigError, match="does not serve model 'other'.*rm"):
        remote(double.url, model="other")
    with pytest.raises(ConfigError, match="give the label's index"):
        remote(double.url, label="positive")


def test_label_by_name_from_a_shared_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"num_labels": 2, "id2label": {"0": "POSITIVE", "1": "NEGATIVE"}})
    )
    d = ClassifyDouble(num_labels=2, root=str(tmp_path))
    try:
        # As the local classifier: a label named positive wins over "the last one".
        assert remote(d.url).describe()["label_index"] == 0
        assert remote(d.url, label="negative").score(["p"], ["hi"]) == [logits_of("hi", 2)[1]]
    finally:
        d.close()


def test_connection_errors_are_retried(double: ClassifyDouble) -> None:
    r = remote(double.url, retries=2)
    double.drop_next = 2
    assert r.score(["p"], ["fine"]) == [logits_of("fine", 1)[0]]
    assert len(double.posts()) == 3
    double.drop_next = 3
    with pytest.raises(RewardServerError, match=f"reward server {double.url} is unreachable"):
        r.score(["p"], ["fine"])
    assert len(double.posts()) == 6


def test_a_connect_timeout_is_a_connection_error(
    double: ClassifyDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # (httpx's ConnectTimeout is a TimeoutException: a host that never accepts the connection
    # is unreachable, retried then a 502, not a slow server's 504.)
    r = remote(double.url, retries=2)
    r.score(["p"], ["warm"])  # resolved: the model name is known
    calls: list[str] = []

    def never_connects(method: str, path: str, **kw: object) -> None:
        calls.append(path)
        raise httpx.ConnectTimeout("timed out")

    monkeypatch.setattr(r._client, "request", never_connects)
    with pytest.raises(RewardServerError, match="unreachable") as err:
        r.score(["p"], ["x"])
    assert err.value.status == 502 and calls == ["/classify"] * 3
    assert double.url in (reward_health(r) or "")


def test_server_down_is_502_naming_it_and_unhealthy() -> None:
    url = dead_url()
    r = remote(url, retries=1)  # starting without the server is allowed (it may come later)
    with pytest.raises(RewardServerError) as err:
        r.score(["p"], ["x"])
    assert err.value.status == 502 and url in err.value.message
    assert url in (reward_health(r) or "")


def test_timeout_is_504(double: ClassifyDouble) -> None:
    r = remote(double.url, timeout_s=0.3)
    double.delay_s = 2.0
    with pytest.raises(RewardServerError, match="did not answer /classify within") as err:
        r.score(["p"], ["x"])
    assert err.value.status == 504 and double.url in err.value.message
    assert len(double.posts()) == 1  # a timeout is not retried


@pytest.mark.parametrize(
    ("mode", "match"),
    [("error", "answered /classify with 500: EngineCore"), ("garbage", "unusable"),
     ("short", "unusable")],
)  # fmt: skip
def test_error_or_garbage_is_502(double: ClassifyDouble, mode: str, match: str) -> None:
    r = remote(double.url)
    double.mode = mode
    with pytest.raises(RewardServerError, match=match) as err:
        r.score(["p", "p"], ["x", "y"])
    assert err.value.status == 502 and double.url in err.value.message


def test_health_follows_the_server(double: ClassifyDouble) -> None:
    r = remote(double.url)
    assert reward_health(r) is None
    double.healthy = False
    assert "/health answered 503" in (reward_health(r) or "")
    assert reward_health(load_reward("vader")) is None


def test_bad_urls_and_settings(monkeypatch: pytest.MonkeyPatch, double: ClassifyDouble) -> None:
    for bad in ("http://", "https://:80", "http://host:1/?x=1"):
        with pytest.raises(ConfigError, match="reward server URL"):
            load_reward(bad)
    monkeypatch.setenv("VBON_REWARD", double.url + "/")
    monkeypatch.setenv("VBON_REWARD_API_KEY", "k2")
    monkeypatch.setenv("VBON_REWARD_TIMEOUT_S", "7")
    monkeypatch.setenv("VBON_REWARD_RETRIES", "0")
    r = CoreSettings().load_reward()
    assert isinstance(r, RemoteReward) and (r.url, r.timeout_s, r.retries) == (double.url, 7, 0)
    r.score(["p"], ["x"])
    assert double.posts()[-1]["auth"] == "Bearer k2"
    # The trainer's and the evaluation's load_reward(spec) read the same settings.
    r2 = load_reward(double.url)
    assert isinstance(r2, RemoteReward) and (r2.timeout_s, r2.retries) == (7, 0)
    r3 = load_reward(double.url, remote=RemoteOptions(timeout_s=3))
    assert r3.timeout_s == 3 and r3.retries == 2


# --- the gateway with a remote reward (fake engine: the generation path is tested elsewhere) --


def gateway_client(tmp_path: Path, reward_url: str, **overrides: Any) -> TestClient:
    settings = ServerSettings(
        adapters_dir=tmp_path / "adapters",
        adapter_poll_s=0,
        reward=reward_url,
        reward_retries=1,
        **overrides,
    )
    fake = FakeBackend()
    return TestClient(create_app(settings, backend_factory=lambda s: fake, background_load=False))


def test_gateway_maps_reward_server_failures(tmp_path: Path, double: ClassifyDouble) -> None:
    req = {"prompt": "The film", "n": 4, "seed": 3, "return_candidates": True, "max_tokens": 8}
    with gateway_client(tmp_path, double.url, reward_timeout_s=0.5) as c:
        c.app.state.gateway.reward.health_ttl_s = 0.0  # see each change of the double at once
        r = c.post("/v1/bon", json=req)
        assert r.status_code == 200, r.text
        cands = r.json()["candidates"]
        assert [x["reward"] for x in cands] == [logits_of(x["text"] or " ", 1)[0] for x in cands]
        assert len(double.posts()) == 1  # one batched call for the N candidates
        ready = c.get("/ready").json()
        assert ready["ready"] and ready["reward"]["ok"] and ready["reward"]["url"] == double.url

        double.delay_s = 2.0
        r = c.post("/v1/bon", json=req)
        assert r.status_code == 504, r.text
        err = r.json()["error"]
        assert err["code"] == "reward_server_error" and double.url in err["message"]

        double.delay_s = 0.0
        double.mode = "error"
        r = c.post("/v1/bon", json=req)
        assert r.status_code == 502 and double.url in r.json()["error"]["message"]

        double.healthy = False
        ready = c.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert not body["ready"] and not body["reward"]["ok"]
        assert double.url in body["reward"]["error"]
        assert c.get("/health").status_code == 200  # liveness never depends on it


# --- a real vLLM pooling server ---------------------------------------------------------------

VLLM_START_TIMEOUT_S = 240


class PoolingServer(VllmServeProcess):
    """`vllm serve <reward model> --runner pooling`."""

    def __init__(self, model: Path, port: int, log_path: Path) -> None:
        args = [
            "--model", str(model), "--runner", "pooling", "--served-model-name", "tiny-rm",
            "--enforce-eager", "--max-model-len", "64", "--dtype", "float32",
        ]  # fmt: skip
        super().__init__(args, log_path, port=port, timeout_s=VLLM_START_TIMEOUT_S)

    def kill(self) -> None:
        """As a crash: SIGKILL to the whole process group."""
        self.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def pooling_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_reward_model: Path
) -> Iterator[tuple[PoolingServer, Path]]:
    log = tmp_path_factory.mktemp("pooling") / "vllm.log"
    server = PoolingServer(tiny_reward_model, free_port(), log)
    yield server, tiny_reward_model
    server.kill()


TEXTS = [
    "A wonderful film.",
    "Dull.",
    "the plot wanders for two hours and then it just stops, with no ending at all " * 4,
    "",
]


@pytest.mark.engine
def test_real_pooling_server_scores_like_the_local_classifier(
    pooling_server: tuple[PoolingServer, Path],
) -> None:
    server, folder = pooling_server
    from vbon.rewards.hf_classifier import HFClassifierReward

    r = remote(server.url)
    assert r.describe()["model"] == "tiny-rm"
    got = r.score(["p"] * len(TEXTS), TEXTS)
    local = HFClassifierReward(folder)
    # The local classifier cannot score an empty text: compare the rest (the long one is
    # truncated to the model's 64 tokens on both sides).
    want = local.score(["p"] * 3, TEXTS[:3])
    assert got[:3] == pytest.approx(want, abs=1e-4)
    assert len(set(got)) == len(got)
    # vLLM's default (use_activation null) squashes a single logit through a sigmoid: the
    # reward must be the raw number, not that.
    default = httpx.post(server.url + "/classify", json={"input": TEXTS[:1]}).json()
    assert default["data"][0]["probs"][0] != pytest.approx(got[0], abs=1e-3)


@pytest.mark.engine
def test_gateway_with_real_pooling_server_killed_and_restarted(
    pooling_server: tuple[PoolingServer, Path], tmp_path: Path
) -> None:
    server, folder = pooling_server
    from vbon.rewards.hf_classifier import HFClassifierReward

    local = HFClassifierReward(folder)
    port = int(server.url.rsplit(":", 1)[1])
    settings = ServerSettings(
        adapters_dir=tmp_path / "adapters", adapter_poll_s=0, reward=server.url, reward_retries=1
    )
    fake = FakeBackend()
    app = create_app(settings, backend_factory=lambda s: fake, background_load=False)
    req = {"prompt": "The film", "n": 4, "seed": 1, "return_candidates": True, "max_tokens": 12}
    with serve_in_thread(app) as gw:
        assert httpx.get(gw + "/ready").status_code == 200
        r = httpx.post(gw + "/v1/bon", json=req, timeout=60)
        assert r.status_code == 200, r.text
        cands = r.json()["candidates"]
        texts = [c["text"] for c in cands]
        assert all(texts)
        assert [c["reward"] for c in cands] == pytest.approx(
            local.score(["p"] * len(texts), texts), abs=1e-4
        )

        server.kill()  # the reward server dies mid-run
        r = httpx.post(gw + "/v1/bon", json=req, timeout=60)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == "reward_server_error" and server.url in err["message"]
        ready = httpx.get(gw + "/ready")
        assert ready.status_code == 503
        assert server.url in ready.json()["reward"]["error"]
        assert httpx.get(gw + "/health").status_code == 200

        restarted = PoolingServer(folder, port, server.log_path)
        try:
            deadline = time.monotonic() + 30
            while httpx.get(gw + "/ready").status_code != 200:  # health is cached briefly
                assert time.monotonic() < deadline, httpx.get(gw + "/ready").text
                time.sleep(0.5)
            r = httpx.post(gw + "/v1/bon", json=req, timeout=60)
            assert r.status_code == 200, r.text
            assert [c["reward"] for c in r.json()["candidates"]] == pytest.approx(
                [c["reward"] for c in cands], abs=1e-4
            )
        finally:
            restarted.kill()
