"""Shadow BoN (VBON_SHADOW_BON_FRACTION): vBoN answers compared afterwards with N fresh base
samples, exported in /metrics. Fast tests on the fake engine (a gate holds the shadow's base
generation so that the tests can observe it in flight), plus one real-engine test at the end."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.admission import SampleBudget
from server.app import create_app
from server.backend import Generation, LoraRef
from server.errors import APIError
from server.metrics import Metrics
from server.settings import ServerSettings
from server.shadow import EFFECTIVE_N_CAP, ShadowBoN, effective_n, rank_quantile
from tests.adapters_util import make_fake_adapter, make_peft_adapter
from tests.fakes import FakeBackend
from tests.server_proc import ServerProcess
from vbon.sampling import Sampling

ADAPTER = "vbon-n8"
N = 8
PROMPT = "The film was"


class GatedBackend(FakeBackend):
    """FakeBackend whose shadow generations (request ids 'shadow-...') wait for `gate`, and
    fail instead if `fail_shadow` is set; users' requests are untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()  # set from the test's thread
        self.gate.set()
        self.fail_shadow = False
        self.shadow_ids: list[str] = []

    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation:
        if request_id.startswith("shadow-"):
            self.shadow_ids.append(request_id)
            self.running.add(request_id)
            try:
                while not self.gate.is_set():
                    await asyncio.sleep(0.005)
                if self.fail_shadow:
                    raise RuntimeError("engine exploded")
            finally:
                self.running.discard(request_id)
        return await super().generate(prompt, sampling, n, request_id, lora)


class RiggedReward:
    """Puts the vBoN answer (`answer`) at a known rank: every other text of a call gets the
    rewards 0, 1, 2, ... in turn, `answer` gets `answer_reward`."""

    name = "rigged"

    def __init__(self, answer: str, answer_reward: float) -> None:
        self.answer = answer
        self.answer_reward = answer_reward
        self.fail = False
        self.calls: list[list[str]] = []

    def score(self, prompts: list[str], completions: list[str]) -> list[float]:
        self.calls.append(list(completions))
        if self.fail:
            raise RuntimeError("classifier exploded")
        others = iter(range(len(completions)))
        return [
            self.answer_reward if c == self.answer else float(next(others)) for c in completions
        ]

    def describe(self) -> dict:
        return {"backend": "rigged"}


def vbon_answer(seed: int, max_tokens: int) -> str:
    """The fake engine's text for /v1/vbon with this seed (the adapter does not change it)."""
    return FakeBackend()._sample(PROMPT, Sampling(max_tokens=max_tokens, seed=seed), seed).text


def long_answer_seed(max_tokens: int = 24) -> int:
    """A seed whose answer has several words, so no unseeded base sample repeats it."""
    return next(s for s in range(100) if len(vbon_answer(s, max_tokens).split()) >= 6)


def make_client(
    tmp_path: Path,
    backend: FakeBackend,
    reward: RiggedReward | None = None,
    **overrides: object,
) -> TestClient:
    make_fake_adapter(tmp_path / "adapters" / ADAPTER, n=N)
    fields: dict = {
        "adapters_dir": tmp_path / "adapters",
        "adapter_poll_s": 0,
        "shadow_bon_fraction": 1.0,
        "shadow_max_load": 1.0,
        "max_samples_in_flight": 64,
        **overrides,
    }
    app = create_app(
        ServerSettings(**fields),
        backend_factory=lambda s: backend,
        reward_factory=(lambda s: reward) if reward is not None else None,
        background_load=False,
    )
    return TestClient(app)


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the /metrics text (None if absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def wait_for(c: TestClient, name: str, **labels: str) -> str:
    """/metrics once `name{labels}` is there (the shadow job runs in the background)."""
    deadline = time.monotonic() + 20
    while True:
        text = c.get("/metrics").text
        if metric(text, name, **labels):
            return text
        assert time.monotonic() < deadline, f"{name} {labels} never appeared:\n{text}"
        time.sleep(0.02)


def shadow_count(text: str, outcome: str) -> float:
    return metric(text, "vbon_shadow_requests_total", adapter=ADAPTER, outcome=outcome) or 0.0


# -- the definitions -------------------------------------------------------------------------
def test_rank_quantile_counts_below_and_half_the_ties() -> None:
    assert rank_quantile(2.5, [0, 1, 2, 3, 4, 5, 6, 7]) == 3 / 8
    assert rank_quantile(3.0, [0, 1, 2, 3, 4, 5, 6, 7]) == 3.5 / 8
    assert rank_quantile(9.0, [0, 1, 2, 3]) == 1.0
    assert rank_quantile(-1.0, [0, 1, 2, 3]) == 0.0
    assert rank_quantile(1.0, [1, 1, 1, 1]) == 0.5


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_a_true_bon_answer_averages_n_over_n_plus_1(n: int) -> None:
    """By simulation: the best of N base samples against N fresh ones averages N/(N+1), a base
    sample 0.5 (ties included), and effective_n inverts N/(N+1)."""
    rng = random.Random(n)
    trials = 20_000
    bon, base, discrete = 0.0, 0.0, 0.0
    for _ in range(trials):
        fresh = [rng.gauss(0, 1) for _ in range(n)]
        bon += rank_quantile(max(rng.gauss(0, 1) for _ in range(n)), fresh)
        base += rank_quantile(rng.gauss(0, 1), fresh)
        # A reward with few values (many ties): a base sample still averages 0.5.
        discrete += rank_quantile(rng.randint(0, 2), [rng.randint(0, 2) for _ in range(n)])
    # Standard error of each mean < 0.3 / sqrt(20000) = 0.002: 0.01 is 5 SE.
    assert bon / trials == pytest.approx(n / (n + 1), abs=0.01)
    assert base / trials == pytest.approx(0.5, abs=0.01)
    assert discrete / trials == pytest.approx(0.5, abs=0.01)
    assert effective_n(n / (n + 1)) == pytest.approx(n)


def test_effective_n_of_a_base_sample_is_one_and_is_capped() -> None:
    assert effective_n(0.5) == 1.0
    assert effective_n(0.0) == 0.0
    assert effective_n(1.0) == EFFECTIVE_N_CAP


# -- admission: leases --------------------------------------------------------------------
def test_a_lease_fits_or_is_refused_and_users_revoke_it_newest_first() -> None:
    budget = SampleBudget(10)
    revoked: list[str] = []
    old = budget.lease(4, lambda: revoked.append("old"))
    new = budget.lease(4, lambda: revoked.append("new"))
    assert old is not None and new is not None and budget.in_flight == 8
    assert budget.lease(4, lambda: None) is None  # no room: refused, nothing revoked
    budget.take(3)  # a user: the newest lease makes room, the older one keeps running
    assert revoked == ["new"] and new.revoked and not old.revoked and budget.in_flight == 7
    new.release()  # (the holder's own release afterwards changes nothing)
    assert budget.in_flight == 7 and budget.preemptible == 4
    with pytest.raises(APIError):  # 12 never fit: no lease is sacrificed for nothing
        budget.take(12)
    assert revoked == ["new"]
    old.release()
    budget.release(3)
    assert budget.in_flight == 0 and budget.preemptible == 0


def test_a_later_adaptive_wave_revokes_a_lease_instead_of_waiting() -> None:
    async def go() -> list[str]:
        budget = SampleBudget(4)
        revoked: list[str] = []
        budget.take(2)
        lease = budget.lease(2, lambda: revoked.append("shadow"))
        assert lease is not None
        await asyncio.wait_for(budget.take_when_free(2), 1)
        assert budget.in_flight == 4
        return revoked

    assert asyncio.run(go()) == ["shadow"]


# -- through the gateway ---------------------------------------------------------------------
def test_fraction_one_exports_the_rank_of_a_rigged_answer(tmp_path: Path) -> None:
    seed = long_answer_seed()
    answer = vbon_answer(seed, 24)
    reward = RiggedReward(answer, answer_reward=2.5)  # base rewards 0..7: 3 below it
    backend = GatedBackend()
    with make_client(tmp_path, backend, reward) as c:
        body = {"prompt": PROMPT, "seed": seed, "max_tokens": 24, "temperature": 0.7}
        r = c.post("/v1/vbon", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == answer
        text = wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="compared")
    hist = {"adapter": ADAPTER}
    assert metric(text, "vbon_shadow_rank_quantile_count", **hist) == 1
    assert metric(text, "vbon_shadow_rank_quantile_sum", **hist) == pytest.approx(3 / 8)
    assert metric(text, "vbon_shadow_rank_quantile_bucket", le="0.3", **hist) == 0
    assert metric(text, "vbon_shadow_rank_quantile_bucket", le="0.4", **hist) == 1
    assert metric(text, "vbon_shadow_reward_gap_count", **hist) == 1
    assert metric(text, "vbon_shadow_reward_gap_bucket", le="-2.0", **hist) == 1
    assert metric(text, "vbon_shadow_reward_gap_mean", **hist) == pytest.approx(2.5 - 7)
    assert metric(text, "vbon_shadow_effective_n", **hist) == pytest.approx(0.375 / 0.625)
    assert metric(text, "vbon_shadow_expected_rank_quantile", **hist) == pytest.approx(8 / 9)
    assert metric(text, "vbon_samples_generated_total", route="shadow") == N
    # One score call: the N base samples and the answer together.
    assert len(reward.calls) == 1 and len(reward.calls[0]) == N + 1 and answer in reward.calls[0]
    # The base model (no LoRA), the request's sampling but no seed.
    user, shadow = backend.calls
    assert user["lora"] is not None and user["n"] == 1
    assert shadow["lora"] is None and shadow["n"] == N and shadow["prompt"] == PROMPT
    assert shadow["sampling"] == user["sampling"].with_(seed=None)


def sse_request(c: TestClient, path: str, body: dict) -> None:
    with c.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"error"' not in "".join(events)


MSGS = [{"role": "user", "content": "Review a film"}]


@pytest.mark.parametrize(
    ("path", "body", "stream"),
    [
        ("/v1/vbon", {"prompt": PROMPT, "stream": True, "score": True}, True),
        ("/v1/chat/completions", {"model": "vbon", "messages": MSGS}, False),
        ("/v1/chat/completions", {"model": "vbon-8", "messages": MSGS, "stream": True}, True),
        ("/v1/completions", {"model": ADAPTER, "prompt": PROMPT}, False),
    ],
)
def test_every_vbon_route_is_shadowed(tmp_path: Path, path: str, body: dict, stream: bool) -> None:
    backend = GatedBackend()
    with make_client(tmp_path, backend) as c:  # (the default reward: VADER)
        if stream:
            sse_request(c, path, body)
        else:
            r = c.post(path, json=body)
            assert r.status_code == 200, r.text
        text = wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="compared")
        q = metric(text, "vbon_shadow_rank_quantile_sum", adapter=ADAPTER)
        assert q is not None and 0 <= q <= 1
        assert backend.calls[-1]["lora"] is None and backend.calls[-1]["n"] == N
        # BoN and base requests are not vBoN answers: no more comparisons.
        assert c.post("/v1/bon", json={"prompt": PROMPT, "n": 2}).status_code == 200
        r = c.post("/v1/completions", json={"model": "fake-model", "prompt": PROMPT})
        assert r.status_code == 200
        assert len(backend.shadow_ids) == 1


def test_fraction_zero_draws_nothing(tmp_path: Path) -> None:
    backend = GatedBackend()
    with make_client(tmp_path, backend, shadow_bon_fraction=0) as c:
        assert c.app.state.gateway.shadow is None
        for _ in range(5):
            assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        text = c.get("/metrics").text
    assert backend.shadow_ids == [] and len(backend.calls) == 5
    assert "vbon_shadow_rank_quantile_count" not in text
    assert shadow_count(text, "compared") == 0


def test_a_fraction_samples_that_share_of_answers(tmp_path: Path) -> None:
    backend = GatedBackend()
    with make_client(tmp_path, backend, shadow_bon_fraction=0.25, shadow_max_jobs=40) as c:
        shadow = c.app.state.gateway.shadow
        shadow.rng = random.Random(7)
        draws = random.Random(7)
        expected = sum(draws.random() < 0.25 for _ in range(40))
        for _ in range(40):
            assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        deadline = time.monotonic() + 20
        while shadow.running and time.monotonic() < deadline:
            time.sleep(0.02)
        text = c.get("/metrics").text
    assert 0 < expected < 40
    assert shadow_count(text, "compared") == expected == len(backend.shadow_ids)


def test_the_answer_never_waits_for_the_shadow(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.gate.clear()  # the shadow's base generation cannot finish
    with make_client(tmp_path, backend, shadow_max_jobs=1) as c:
        r = c.post("/v1/vbon", json={"prompt": PROMPT})
        assert r.status_code == 200, r.text
        sse_request(c, "/v1/vbon", {"prompt": PROMPT, "stream": True})
        # Both answers are out while the first comparison is provably still generating (and
        # the second was skipped: VBON_SHADOW_MAX_JOBS=1).
        shadow = c.app.state.gateway.shadow
        assert shadow.running == 1 and len(backend.shadow_ids) == 1
        assert backend.shadow_ids[0] in backend.running
        text = c.get("/metrics").text
        assert shadow_count(text, "compared") == 0 and shadow_count(text, "skipped_busy") == 1
        backend.gate.set()
        text = wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="compared")
        assert c.app.state.gateway.budget.in_flight == 0


@pytest.mark.parametrize("where", ["engine", "reward"])
def test_a_shadow_failure_never_fails_the_answer(tmp_path: Path, where: str) -> None:
    backend = GatedBackend()
    reward = RiggedReward("no such answer", 0.0)
    backend.fail_shadow = where == "engine"
    reward.fail = where == "reward"
    with make_client(tmp_path, backend, reward) as c:
        r = c.post("/v1/vbon", json={"prompt": PROMPT})
        assert r.status_code == 200 and r.json()["text"], r.text
        text = wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="failed")
        assert shadow_count(text, "compared") == 0
        assert c.app.state.gateway.budget.in_flight == 0
        # A user's own scoring still fails loudly when the reward is broken: only shadow
        # failures are swallowed.
        if where == "reward":
            bad = c.post("/v1/vbon", json={"prompt": PROMPT, "score": True})
            assert bad.status_code == 500


def test_no_spare_capacity_skips_the_shadow(tmp_path: Path) -> None:
    backend = GatedBackend()
    # 8 shadow samples would exceed half of 10: skipped, and never started.
    with make_client(tmp_path, backend, max_samples_in_flight=10, shadow_max_load=0.5) as c:
        assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        text = c.get("/metrics").text
    assert shadow_count(text, "skipped_busy") == 1 and backend.shadow_ids == []


@pytest.mark.parametrize("extra", [{"temperature": 0}, {"repetition_penalty": 1.3}])
def test_no_bon_to_compare_with_skips_the_shadow(tmp_path: Path, extra: dict) -> None:
    # Greedy decoding would draw N copies of one text (vLLM refuses n > 1 there), and a
    # reshaped distribution's best-of-N is not the base model's BoN-N.
    backend = GatedBackend()
    with make_client(tmp_path, backend) as c:
        body = {"model": ADAPTER, "prompt": PROMPT, "max_tokens": 8, **extra}
        assert c.post("/v1/completions", json=body).status_code == 200
        text = c.get("/metrics").text
    assert shadow_count(text, "skipped_unsupported") == 1 and backend.shadow_ids == []
    assert shadow_count(text, "failed") == 0


def test_a_lease_revoked_before_its_job_starts_is_counted_shed(tmp_path: Path) -> None:
    async def run() -> tuple[float, int]:
        backend = GatedBackend()
        metrics = Metrics()
        budget = SampleBudget(10)

        async def score(prompt: str, texts: list[str]) -> list[float]:
            return [0.0] * len(texts)

        shadow = ShadowBoN(backend, budget, score, metrics, fraction=1.0, max_load=1.0,
                           max_jobs=2, timeout_s=10)  # fmt: skip
        assert shadow.maybe_submit(PROMPT, Sampling(), ADAPTER, N, "an answer")
        budget.take(10)  # a user, in the same loop turn: the job never ran a step
        await asyncio.sleep(0.05)
        shed = metrics.shadow_requests.labels(ADAPTER, "shed")._value.get()
        return shed, budget.in_flight

    shed, in_flight = asyncio.run(run())
    assert shed == 1 and in_flight == 10


class OrderedBackend(GatedBackend):
    """Records when each generation starts and ends, user and shadow (each takes a while)."""

    def __init__(self) -> None:
        super().__init__()
        self.delay_s = 0.05
        self.events: list[str] = []

    async def generate(
        self, prompt: str, sampling: Sampling, n: int, request_id: str, lora: LoraRef | None = None
    ) -> Generation:
        kind = "shadow" if request_id.startswith("shadow-") else "user"
        self.events.append(f"{kind} start")
        try:
            return await super().generate(prompt, sampling, n, request_id, lora)
        finally:
            self.events.append(f"{kind} end")


def test_a_multi_prompt_completion_is_shadowed_after_its_last_prompt(tmp_path: Path) -> None:
    backend = OrderedBackend()
    with make_client(tmp_path, backend, shadow_max_jobs=4) as c:
        body = {"model": ADAPTER, "prompt": [PROMPT, PROMPT + " again"], "max_tokens": 8}
        assert c.post("/v1/completions", json=body).status_code == 200
        wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="compared")
    # Both of the user's generations were done before any shadow draw began.
    first_shadow = backend.events.index("shadow start")
    assert backend.events[:first_shadow] == ["user start", "user end"] * 2, backend.events


def test_users_take_the_room_back_from_shadow_work(tmp_path: Path) -> None:
    """A server full of users plus a running shadow job: the next user is admitted (the
    shadow is cancelled, its engine request aborted, counted as shed), never a 429."""
    backend = GatedBackend()
    backend.gate.clear()
    with make_client(tmp_path, backend, max_samples_in_flight=10) as c:
        gateway = c.app.state.gateway
        assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        assert gateway.shadow.running == 1 and gateway.budget.in_flight == N
        gateway.budget.take(2)  # users hold the rest: the server is full
        r = c.post("/v1/bon", json={"prompt": PROMPT, "n": 4})
        assert r.status_code == 200, r.text
        text = wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="shed")
        assert backend.shadow_ids[0] not in backend.running  # aborted in the engine
        assert gateway.shadow.running == 0
        assert metric(text, "vbon_rejected_total", reason="samples_in_flight") is None
        gateway.budget.release(2)
        assert gateway.budget.in_flight == 0


def test_a_429_that_shadow_work_cannot_prevent_leaves_it_running(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.gate.clear()
    with make_client(tmp_path, backend, max_samples_in_flight=10) as c:
        gateway = c.app.state.gateway
        assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        gateway.budget.take(2)
        # 11 samples never fit in 10, shadow or not: the 429 is not the shadow's doing.
        r = c.post("/v1/bon", json={"prompt": PROMPT, "n": 11})
        assert r.status_code == 429
        assert gateway.shadow.running == 1 and backend.shadow_ids[0] in backend.running
        gateway.budget.release(2)
        backend.gate.set()
        wait_for(c, "vbon_shadow_requests_total", adapter=ADAPTER, outcome="compared")


def test_shutdown_cancels_running_shadow_work(tmp_path: Path) -> None:
    backend = GatedBackend()
    backend.gate.clear()
    with make_client(tmp_path, backend) as c:
        shadow = c.app.state.gateway.shadow
        assert c.post("/v1/vbon", json={"prompt": PROMPT}).status_code == 200
        assert shadow.running == 1
    assert shadow.running == 0 and backend.running == set()


def test_settings_are_validated() -> None:
    from pydantic import ValidationError

    for bad in ({"shadow_bon_fraction": 1.5}, {"shadow_max_load": 0}, {"shadow_max_jobs": 0}):
        with pytest.raises(ValidationError):
            ServerSettings(**bad)


# -- the real engine -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_server(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path) -> Iterator:
    tmp = tmp_path_factory.mktemp("shadow-gateway")
    make_peft_adapter(embedded_model, tmp / "adapters" / "vbon-n4", n=4, seed=0)
    proc = ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(tmp / "adapters"),
            "VBON_MODELS_DIR": str(embedded_model.parent),
            "VBON_SHADOW_BON_FRACTION": "1",
        },
        tmp / "server.log",
    )
    yield proc
    proc.stop()


@pytest.mark.engine
def test_shadow_on_the_real_engine(engine_server: ServerProcess) -> None:
    url = engine_server.url
    body = {"messages": MSGS, "max_tokens": 16}
    r = httpx.post(url + "/v1/vbon", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["adapter"]["name"] == "vbon-n4", r.text
    labels = {"adapter": "vbon-n4"}
    deadline = time.monotonic() + 120
    while True:
        text = httpx.get(url + "/metrics").text
        if metric(text, "vbon_shadow_requests_total", outcome="compared", **labels):
            break
        assert metric(text, "vbon_shadow_requests_total", outcome="failed", **labels) is None
        assert time.monotonic() < deadline, text
        time.sleep(0.5)
    assert metric(text, "vbon_shadow_rank_quantile_count", **labels) == 1
    q = metric(text, "vbon_shadow_rank_quantile_sum", **labels)
    assert q is not None and 0 <= q <= 1 and (q * 8) == int(q * 8)  # a multiple of 1/(2N)
    assert metric(text, "vbon_shadow_expected_rank_quantile", **labels) == pytest.approx(0.8)
    assert metric(text, "vbon_samples_generated_total", route="shadow") == 4
    assert json.loads(httpx.get(url + "/ready").text)["ready"]
