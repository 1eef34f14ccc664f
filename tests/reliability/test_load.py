"""Load and faults on the real gateway process and the real vLLM engine (embedded model), over
loopback. Part of `make reliability` (marker `reliability`; not in `make test`: a few minutes).

1. Overload: measure capacity closed-loop, then send BoN-4 requests open-loop (Poisson) at
   VBON_LOAD_FACTOR x that rate for VBON_LOAD_SECONDS. The gateway must shed with 429 +
   Retry-After (never 5xx, never a hung request), and recover to full service afterwards.
   RSS of the gateway and its engine process is taken after a warm-up and after the run.
2. SIGTERM with requests in flight on the real engine: all answered, then a clean exit.
3. The engine process is killed: /ready turns 503 and requests answer 503 at once.
Figures go to the reliability summary table."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from tests.server_proc import ServerProcess
from vbon.prompts import default_prompt_file, load_prompts

pytestmark = pytest.mark.reliability
SECONDS = float(os.environ.get("VBON_LOAD_SECONDS", "45"))
FACTOR = float(os.environ.get("VBON_LOAD_FACTOR", "4"))
BUDGET = 32  # samples in flight: 8 BoN-4 requests
TIMEOUT_S = 120
PROMPTS = load_prompts(default_prompt_file("eval"))
BODY = {"n": 4, "max_tokens": 16}


def start_gateway(tmp: Path, embedded_model: Path) -> ServerProcess:
    return ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(tmp / "adapters"),
            "VBON_MODELS_DIR": str(embedded_model.parent),
            "VBON_MAX_SAMPLES_IN_FLIGHT": str(BUDGET),
            "VBON_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        },
        tmp / "gateway.log",
    )


def tree_rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):  # (a child may just have exited)
            total += p.memory_info().rss
    return total / 2**20


@dataclass
class Shot:
    status: int  # 0: no answer (transport error or client timeout)
    latency_s: float
    retry_after: str | None


async def one(client: httpx.AsyncClient, rng: random.Random) -> Shot:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/bon", json={"prompt": rng.choice(PROMPTS), **BODY})
        return Shot(r.status_code, time.perf_counter() - t0, r.headers.get("retry-after"))
    except httpx.HTTPError:
        return Shot(0, time.perf_counter() - t0, None)


def client_for(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=url,
        timeout=TIMEOUT_S + 30,
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
    )


async def closed_loop(url: str, concurrency: int, seconds: float) -> list[Shot]:
    rng = random.Random(1)
    shots: list[Shot] = []
    end = time.monotonic() + seconds
    async with client_for(url) as client:

        async def worker() -> None:
            while time.monotonic() < end:
                shots.append(await one(client, rng))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return shots


async def open_loop(url: str, rate: float, seconds: float) -> list[Shot]:
    rng = random.Random(2)
    tasks = []
    async with client_for(url) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            tasks.append(asyncio.ensure_future(one(client, rng)))
            await asyncio.sleep(rng.expovariate(rate))
        return list(await asyncio.gather(*tasks))


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path):
    proc = start_gateway(tmp_path_factory.mktemp("load"), embedded_model)
    yield proc
    proc.stop(signal.SIGKILL)


def test_overload_is_shed_memory_stays_flat_and_service_recovers(
    gateway: ServerProcess, figures
) -> None:
    url = gateway.url
    # Warm-up (prefix cache, allocator pools), then the baseline RSS and capacity.
    asyncio.run(closed_loop(url, 4, 10))
    rss_before = tree_rss_mb(gateway.proc.pid)
    base = asyncio.run(closed_loop(url, BUDGET // BODY["n"], 20))
    ok = [s for s in base if s.status == 200]
    assert len(ok) == len(base), {s.status for s in base}
    capacity = len(ok) / 20
    alone = [s.latency_s for s in asyncio.run(closed_loop(url, 1, 8)) if s.status == 200]

    shots = asyncio.run(open_loop(url, FACTOR * capacity, SECONDS))
    statuses = [s.status for s in shots]
    accepted = [s.latency_s for s in shots if s.status == 200]
    shed = [s for s in shots if s.status in (429, 503)]
    bad = sorted({st for st in statuses if st not in (200, 429, 503)})
    rss_after = tree_rss_mb(gateway.proc.pid)

    # Load gone: back to full service, nothing left in flight.
    deadline = time.monotonic() + 60
    while (ready := httpx.get(url + "/ready", timeout=10).json())["samples_in_flight"]:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    after = asyncio.run(closed_loop(url, 1, 8))
    figures.add(
        "load: BoN-4 open loop above capacity",
        inputs=len(shots),
        **{"5xx": sum(st >= 500 and st != 503 for st in statuses)},
        shed=len(shed),
        rss_growth_mb=rss_after - rss_before,
        note=(
            f"capacity {capacity:.2f}/s, offered {FACTOR:.0f}x for {SECONDS:.0f} s; accepted "
            f"{len(accepted)}, p50 {pct(accepted, 50):.1f} s, p99 {pct(accepted, 99):.1f} s "
            f"(alone {statistics.median(alone):.1f} s); RSS {rss_before:.0f}->{rss_after:.0f} MB; "
            f"after: {sum(s.status == 200 for s in after)}/{len(after)} ok, "
            f"median {statistics.median(s.latency_s for s in after):.1f} s"
        ),
    )
    assert not bad, f"statuses other than 200/429/503: {bad}"  # no 5xx, no hung request
    assert shed and all(s.retry_after for s in shed), "overload was not shed with Retry-After"
    assert accepted and max(accepted) < TIMEOUT_S
    assert all(s.status == 200 for s in after) and ready["engine_running_requests"] == 0
    # Flat memory: what one run of overload adds is small next to the ~2-3 GB the gateway and
    # its engine hold (a leak per request would add up over thousands of requests).
    assert rss_after - rss_before < max(256.0, 0.1 * rss_before), (rss_before, rss_after)


def test_sigterm_drains_real_engine_requests(gateway: ServerProcess, figures) -> None:
    answers: list[int] = []

    def call(i: int) -> None:
        try:
            r = httpx.post(
                gateway.url + "/v1/bon",
                json={"prompt": PROMPTS[i], "n": 4, "max_tokens": 32},
                timeout=TIMEOUT_S,
            )
            answers.append(r.status_code)
        except httpx.HTTPError:
            answers.append(0)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while httpx.get(gateway.url + "/ready", timeout=10).json()["samples_in_flight"] < 16:
        assert time.monotonic() < deadline, "requests did not start"
        time.sleep(0.02)
    gateway.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(TIMEOUT_S)
    assert answers == [200] * 4
    assert gateway.proc.wait(120) in (0, -signal.SIGTERM)
    figures.add("SIGTERM, real engine, 4 BoN-4 in flight", faults=1, survived=1,
                note="4/4 answered 200, clean exit")  # fmt: skip


def test_engine_process_killed_gives_503_not_a_hang(
    tmp_path: Path, embedded_model: Path, figures
) -> None:
    gw = start_gateway(tmp_path, embedded_model)
    try:
        assert httpx.post(gw.url + "/v1/bon", json={"prompt": "a", **BODY}, timeout=60).is_success
        children = psutil.Process(gw.proc.pid).children(recursive=True)
        engines = [c for c in children if "EngineCore" in " ".join(c.cmdline() + [c.name()])]
        victim = engines[0] if engines else children[0]
        victim.kill()
        deadline = time.monotonic() + 60
        while httpx.get(gw.url + "/ready", timeout=10).status_code != 503:
            # A request is what makes vLLM notice at the latest.
            httpx.post(gw.url + "/v1/bon", json={"prompt": "a", **BODY}, timeout=60)
            assert time.monotonic() < deadline, "/ready still 200 a minute after engine death"
            time.sleep(0.5)
        r = httpx.post(gw.url + "/v1/bon", json={"prompt": "a", **BODY}, timeout=60)
        assert r.status_code == 503 and "Retry-After" in r.headers, r.text
        # Liveness fails too, so an orchestrator restarts the process (the engine is gone).
        assert httpx.get(gw.url + "/health", timeout=10).status_code == 503
    finally:
        gw.stop(signal.SIGKILL)
    figures.add("engine process killed (real engine)", faults=1, survived=1,
                note="/ready and /health 503 (restart); requests 503 at once")  # fmt: skip
