"""The client and CLI against the gateway app on a fake engine, served over real HTTP on
loopback by uvicorn in a thread (fast); the retry policy against a mock transport."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from clients import (
    AsyncClient,
    AuthenticationFailed,
    BadRequest,
    Client,
    ConnectionFailed,
    NotFound,
    RateLimited,
    RetryPolicy,
    ServerError,
    ServiceUnavailable,
)
from clients.cli import main as cli_main
from clients.launch import free_port
from server.app import create_app
from server.settings import DEFAULT_ADAPTIVE, ServerSettings
from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.server_proc import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
MSGS = [{"role": "user", "content": "Continue: The film was"}]


@contextmanager
def serve(tmp: Path, backend: FakeBackend | None = None, reward_factory=None, **overrides):
    settings = ServerSettings(
        adapters_dir=tmp / "adapters",
        adapter_poll_s=0,
        max_n=16,
        max_tokens_limit=64,
        **overrides,
    )
    fake = backend or FakeBackend()
    app = create_app(
        settings,
        backend_factory=lambda s: fake,
        reward_factory=reward_factory,
        background_load=False,
    )
    with serve_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fake-gateway")
    make_fake_adapter(tmp / "adapters" / "vbon-n8", n=8)
    with serve(tmp) as u:
        yield u


def test_bon_round_trip_typed(url: str) -> None:
    with Client(url) as c:
        r = c.bon(messages=MSGS, n=6, return_candidates=True, seed=3, max_tokens=10)
    assert r.n == 6 and len(r.candidates) == 6
    assert r.reward == max(x.reward for x in r.candidates) == r.candidates[0].reward
    assert r.text == r.candidates[0].text and r.seed == 3 + r.index
    assert r.kl_bound == pytest.approx(math.log(6) - 5 / 6)
    assert r.usage.completion_tokens == sum(x.tokens for x in r.candidates)


def test_vbon_models_ready_health_openai(url: str) -> None:
    with Client(url) as c:
        v = c.vbon(prompt="The film", score=True, max_tokens=8)
        assert v.adapter.name == "vbon-n8" and v.adapter.n == 8 and v.reward is not None
        chunks = list(c.vbon_stream(prompt="The film", max_tokens=8, seed=1))
        assert chunks[-1].finish_reason is not None and chunks[-1].reward is not None
        assert "".join(ch.text for ch in chunks).strip()
        assert "bon-8" in c.models().ids() and "vbon-n8" in c.models().ids()
        ready = c.ready()
        assert ready.ready and ready.adapters[0]["name"] == "vbon-n8"
        assert c.health() == {"status": "ok"}
        comp = c.completions("bon-4", "The film", max_tokens=8)
        assert comp.bon["n"] == 4 and comp.choices[0].reward is not None
        chat = c.chat_completions("fake-model", MSGS, max_tokens=8)
        assert chat.choices[0].content
        deltas = list(c.chat_completions_stream("vbon", MSGS, max_tokens=8))
        assert deltas[-1]["choices"][0]["finish_reason"] is not None
        assert "vbon_requests_total" in c.metrics() or "# HELP" in c.metrics()


def test_async_client(url: str) -> None:
    async def go():
        async with AsyncClient(url) as c:
            rs = await asyncio.gather(*(c.bon(prompt="The film", n=4, seed=i) for i in range(5)))
            v = await c.vbon(prompt="The film", adapter="vbon-n8")
            parts = [ch async for ch in c.vbon_stream(prompt="The film", max_tokens=5)]
            return rs, v, parts

    rs, v, parts = asyncio.run(go())
    assert [r.n for r in rs] == [4] * 5 and v.adapter.name == "vbon-n8"
    assert parts[-1].finish_reason is not None


def test_errors_carry_server_message(url: str) -> None:
    with Client(url) as c:
        with pytest.raises(BadRequest) as e:
            c.bon(prompt="The film", n=17)
        assert e.value.status == 400 and e.value.param == "n" and "1 <= n <= 16" in e.value.message
        with pytest.raises(NotFound) as e2:
            c.vbon(prompt="x", adapter="nope")
        assert "nope" in e2.value.message
        with pytest.raises(NotFound, match="does not exist"):
            c.chat_completions("no-such-model", MSGS)
        with pytest.raises(ValueError):
            c.bon()  # neither prompt nor messages: refused before sending


def test_wrong_api_key(tmp_path: Path) -> None:
    with serve(tmp_path, api_key="s3cret") as u:
        with Client(u, api_key="wrong") as c, pytest.raises(AuthenticationFailed) as e:
            c.bon(prompt="The film", n=2)
        assert e.value.status == 401 and "key" in e.value.message
        with Client(u, api_key="s3cret") as c:
            assert c.bon(prompt="The film", n=2).n == 2


class BrokenReward:
    name = "broken"

    def score(self, prompts, completions):
        raise RuntimeError("classifier exploded")

    def describe(self):
        return {"backend": "broken"}


def test_server_error_and_dead_engine(tmp_path: Path) -> None:
    with serve(tmp_path, reward_factory=lambda s: BrokenReward()) as u, Client(u) as c:
        with pytest.raises(ServerError) as e:
            c.bon(prompt="The film", n=2)
        assert e.value.status == 500 and "reward model failed" in e.value.message
    fake = FakeBackend()
    with serve(tmp_path, backend=fake) as u:
        fake.dead = True
        sleeps: list[float] = []
        with Client(u, retry=RetryPolicy(max_retries=2), sleep=sleeps.append) as c:
            with pytest.raises(ServiceUnavailable) as e:
                c.bon(prompt="The film", n=2)
            assert c.retries_done == 2
        assert sleeps == [5.0, 5.0]  # the server's Retry-After: 5
        assert e.value.retry_after == 5.0


def test_429_is_retried_after_retry_after(tmp_path: Path) -> None:
    fake = FakeBackend(delay_s=0.6)
    with serve(tmp_path, backend=fake, max_samples_in_flight=4) as u:

        async def go(retries: int):
            async with AsyncClient(u, retry=RetryPolicy(max_retries=retries)) as c:
                return await asyncio.gather(
                    c.bon(prompt="The film", n=4),
                    c.bon(prompt="The film", n=4),
                    return_exceptions=True,
                )

        out = asyncio.run(go(0))
        assert sum(isinstance(x, RateLimited) for x in out) == 1
        err = next(x for x in out if isinstance(x, RateLimited))
        assert err.retry_after == 1.0 and "busy" in err.message
        out = asyncio.run(go(3))  # the second waits ~1 s (Retry-After), then succeeds
        assert all(getattr(x, "n", None) == 4 for x in out), out


def test_retry_policy_backoff_and_retry_after_date() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, json={"error": {"message": "busy", "type": "x"}})
        if len(calls) == 2:
            return httpx.Response(503, headers={"Retry-After": "2"}, text="down")
        return httpx.Response(200, json={"status": "ok"})

    sleeps: list[float] = []
    policy = RetryPolicy(max_retries=3, backoff_s=0.1)
    with Client(
        "http://x", transport=httpx.MockTransport(handler), retry=policy, sleep=sleeps.append
    ) as c:
        assert "ok" in c.metrics()
    assert len(calls) == 3
    assert 0.05 <= sleeps[0] <= 0.1  # backoff 0.1 * 2**0 with jitter, no Retry-After
    assert sleeps[1] == 2.0  # Retry-After wins over the 0.2 s backoff
    from clients.client import parse_retry_after

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("bogus") is None


def test_unreachable_server() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(ConnectionFailed) as e:
        c.health()
    assert "cannot reach" in str(e.value)


# -- CLI --------------------------------------------------------------------------------------
def test_cli_bon_table(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(
        [
            "bon",
            "The movie was",
            "-n",
            "5",
            "--show-candidates",
            "--url",
            url,
            "--seed",
            "2",
            "--max-tokens",
            "8",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "best of N=5" in out and "KL(BoN||base)" in out
    table = out.split("rank")[1].splitlines()
    assert len([ln for ln in table[2:] if ln.strip()]) == 5  # header rule + 5 rows


def test_cli_and_client_adaptive_bon(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli_main(["bon", "The movie was", "-n", "8", "--stop-at-reward", "0.5", "--wave", "2",
                   "--prune-at", "4", "--keep", "0.5", "--seed", "3", "--max-tokens", "12",
                   "--show-candidates", "--url", url])
    out = capsys.readouterr().out
    assert rc == 0 and "adaptive best of at most N=8" in out and "samples in" in out
    with Client(url) as c:
        r = c.bon("The movie was", n=8, max_tokens=40, seed=3, adaptive=True)
        assert r.adaptive is not None and r.kl_bound is None
        assert r.adaptive.wave_size == DEFAULT_ADAPTIVE.wave
        plain = c.bon("The movie was", n=8, max_tokens=40, seed=3)
        assert plain.adaptive is None and plain.kl_bound is not None
    assert cli_main(["bon", "x", "-n", "8", "--prune-at", "4,2", "--url", url]) == 1
    assert "at_tokens must be strictly increasing" in capsys.readouterr().err


def test_cli_vbon_models_ready(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["vbon", "The movie was", "--url", url]) == 0
    assert "adapter vbon-n8" in capsys.readouterr().out
    assert cli_main(["vbon", "The movie was", "--stream", "--url", url]) == 0
    assert "reward" in capsys.readouterr().out
    assert cli_main(["models", "--url", url]) == 0
    assert "bon-16" in capsys.readouterr().out
    assert cli_main(["ready", "--url", url]) == 0
    assert (
        cli_main(["chat", "hi", "--as", "chat", "--model", "bon", "--best-of", "3", "--url", url])
        == 0
    )
    assert "best of 3" in capsys.readouterr().out


def test_cli_errors_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bon", "The movie was", "-n", "99", "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 400") and "1 <= n <= 16" in err
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(Exception, match="1 <= n <= 16"):
        cli_main(["bon", "x", "-n", "99", "--url", url, "--debug"])


def test_cli_process_unreachable_and_wrong_key(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    p = subprocess.run(
        [sys.executable, "-m", "clients", "bon", "x", "--url", dead],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: cannot reach the gateway")
    with serve(tmp_path, api_key="k") as u:
        p = subprocess.run(
            [sys.executable, "-m", "clients", "models", "--url", u, "--api-key", "bad"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
    assert p.returncode == 1 and p.stderr.startswith("error: 401") and "Traceback" not in p.stderr


# -- benchmark against the fake engine (fast; the real engine run is in test_clients_engine) ---
def test_bench_fake_outputs_consistent(url: str, tmp_path: Path) -> None:
    import json

    from clients.bench import main as bench_main

    out = tmp_path / "bench"
    rc = bench_main(
        [
            "--url",
            url,
            "--methods",
            "base,bon-4,vbon",
            "--concurrency",
            "1,3",
            "--requests",
            "4",
            "--poisson-load",
            "0.5",
            "--poisson-requests",
            "3",
            "--max-tokens",
            "6",
            "--hf-n",
            "none",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = json.loads((out / "bench.json").read_text())
    closed = data["closed_loop"]
    assert [(lv["method"], lv["concurrency"]) for lv in closed] == [
        (m, c) for m in ("base", "bon-4", "vbon") for c in (1, 3)
    ]
    for lv in closed + data["open_loop"]:
        assert lv["errors"] == 0 and lv["completed"] == len(lv["outcomes"]) > 0
        assert lv["answers_per_s"] == pytest.approx(lv["completed"] / lv["wall_s"])
        tokens = sum(o["completion_tokens"] for o in lv["outcomes"])
        assert lv["gen_tokens_per_s"] == pytest.approx(tokens / lv["wall_s"])
        assert all(o["samples"] == lv["n"] for o in lv["outcomes"])
        assert all(1 * lv["n"] <= o["completion_tokens"] <= 6 * lv["n"] for o in lv["outcomes"])
        assert lv["latency_p50_s"] <= lv["latency_p95_s"] <= lv["latency_p99_s"]
        assert -1 <= lv["mean_reward"] <= 1
    assert [lv["method"] for lv in data["open_loop"]] == ["base", "bon-4", "vbon"]
    md = (out / "bench.md").read_text()
    assert md.count("| bon-4 |") == 2 + 1 + 1  # two closed levels, peak, open loop
    for png in ("throughput_vs_concurrency.png", "latency_vs_throughput.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_refuses_n_above_server_max(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clients.bench import main as bench_main

    rc = bench_main(
        [
            "--url",
            url,
            "--methods",
            "base,bon-32",
            "--hf-n",
            "none",
            "--quick",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith("error: bon-32 cannot run on this server")
    assert "1 <= n <= 16" in err[-1] and not (tmp_path / "bench.json").exists()
    assert bench_main(["--methods", "bon-x", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "unknown method 'bon-x'" in capsys.readouterr().err


def test_bench_unreachable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clients.bench import main as bench_main

    rc = bench_main(
        [
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "--quick",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 1 and "cannot reach the gateway" in capsys.readouterr().err


def test_health_reports_failed_start_up() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"status": "failed", "reason": "no model at /x"})

    sleeps: list[float] = []
    with Client("http://x", transport=httpx.MockTransport(handler), sleep=sleeps.append) as c:
        assert c.health() == {"status": "failed", "reason": "no model at /x"}
        with pytest.raises(ServiceUnavailable, match="HTTP 503"):
            c.models()  # not an error body: the status line and the text are the message
    assert len(sleeps) == 3  # models() retried 503 three times; health() did not


def test_clients_read_url_and_keys_from_their_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from clients import Client
    from clients.settings import DEFAULT_URL

    monkeypatch.delenv("VBON_URL", raising=False)
    monkeypatch.delenv("VBON_API_KEY", raising=False)
    with Client() as c:
        assert c.url == DEFAULT_URL and c.api_key is None
    monkeypatch.setenv("VBON_URL", "http://gateway.example:9000/")
    monkeypatch.setenv("VBON_API_KEY", "k-env")
    monkeypatch.setenv("VBON_MAX_N", "not-a-number")  # the server's settings are not ours
    with Client() as c:
        assert c.url == "http://gateway.example:9000" and c.api_key == "k-env"
    with Client(api_key="k-arg") as c:
        assert c.api_key == "k-arg"
