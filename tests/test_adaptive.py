"""Adaptive best-of-N (server/adaptive.py) on the fake engine: the schedules, the decisions
against plain best-of-N's own candidates, admission, cancellation and every bad input's 400.
The same paths run on the real engine in tests/test_server_engine.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.adaptive import Plan, resolve_plan
from server.admission import SampleBudget
from server.errors import APIError
from server.protocol import AdaptiveFields, BoNRequest, Prune
from server.reward_reference import RewardReference
from server.settings import DEFAULT_ADAPTIVE
from tests.fakes import FakeBackend
from tests.test_server_api import make_client
from vbon.errors import ConfigError

DEFAULT = AdaptiveFields(wave=4, stop_at_reward=0.9, prune=Prune(at_tokens=[32], keep=0.5))


def plan(fields: dict, n: int = 16, max_tokens: int = 64, use_default: bool = False,
         remote: bool = False, quantile=None) -> Plan | None:
    return resolve_plan(AdaptiveFields(**fields), n, max_tokens, use_default, DEFAULT,
                        (-1.0, 1.0), quantile, remote)


# -- schedules -------------------------------------------------------------------------------
def test_waves_cover_n_without_overlap_and_keep_rounds_up() -> None:
    p = Plan(n=10, wave=4, target=0.5)
    assert [list(w) for w in p.waves()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    p = Plan(n=8, wave=8, at_tokens=(8,), keep=0.5)
    assert [p.kept(k) for k in (1, 2, 3, 4, 5, 8)] == [1, 1, 2, 2, 3, 4]
    assert Plan(n=8, wave=8, at_tokens=(8,), keep=0.1).kept(3) == 1  # never below one


def test_plain_requests_have_no_plan_and_defaults_fill_what_is_left_out() -> None:
    assert plan({}) is None
    assert plan({}, use_default=True) == Plan(16, 4, 0.9, (32,), 0.5)
    # The request's own target replaces the default's; its prune too.
    assert plan({"stop_at_reward": 0.5}, use_default=True) == Plan(16, 4, 0.5, (32,), 0.5)
    assert plan({"prune": {"at_tokens": [8], "keep": 0.25}}, use_default=True) == Plan(
        16, 4, 0.9, (8,), 0.25
    )
    # Without the default: a target alone gets the default wave; pruning alone one wave of N.
    assert plan({"stop_at_reward": 0.5}) == Plan(16, 4, 0.5)
    assert plan({"stop_at_reward": 0.5}, n=2) == Plan(2, 2, 0.5)
    assert plan({"prune": {"at_tokens": [8, 16], "keep": 0.5}}) == Plan(16, 16, None, (8, 16), 0.5)
    # The default's checkpoints apply where they fit max_tokens.
    assert plan({}, use_default=True, max_tokens=32) == Plan(16, 4, 0.9, (), 0.5)


def test_quantile_targets_come_from_the_reward_reference(tmp_path: Path) -> None:
    f = tmp_path / "ref.jsonl"
    f.write_text(
        "\n".join(json.dumps({"prompt": f"p{i}", "rewards": [i / 10, i / 10 + 0.05]})
                  for i in range(10))
    )
    ref = RewardReference.from_jsonl(f)
    assert ref.quantile(0.0) == min(ref.rewards) and ref.quantile(1.0) == max(ref.rewards)
    assert ref.quantile(0.5) == pytest.approx(0.475)
    assert plan({"stop_at_quantile": 0.5}, quantile=ref.quantile).target == pytest.approx(0.475)
    with pytest.raises(APIError) as e:
        plan({"stop_at_quantile": 0.5})
    assert e.value.param == "stop_at_quantile" and "VBON_REWARD_REFERENCE" in e.value.message
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "rewards": ["a"]}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        RewardReference.from_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="does not exist"):
        RewardReference.from_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("fields", "kw", "param", "says"),
    [
        ({"stop_at_reward": 0.5}, {"remote": True}, "stop_at_reward", "remote mode"),
        ({"stop_at_reward": 0.5}, {"n": 1}, "stop_at_reward", "n >= 2"),
        ({}, {"n": 1, "use_default": True}, "adaptive", "n >= 2"),
        ({"stop_at_reward": 1.5}, {}, "stop_at_reward", "-1.0 <= stop_at_reward <= 1.0"),
        ({"stop_at_reward": 0.5, "stop_at_quantile": 0.5}, {}, "stop_at_quantile", "not both"),
        ({"stop_at_reward": 0.5, "wave": 17}, {}, "wave", "1 <= wave <= n (16)"),
        ({"wave": 4}, {}, "wave", "no target"),
        ({"prune": {"at_tokens": [8, 64], "keep": 0.5}}, {}, "prune.at_tokens", "below max_tokens"),
    ],
)
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(
    fields: dict, kw: dict, param: str, says: str
) -> None:
    with pytest.raises(APIError) as e:
        plan(fields, **kw)
    assert e.value.status == 400 and e.value.param == param and says in e.value.message


# -- through the API, fake engine ------------------------------------------------------------
@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(tmp_path: Path, fake: FakeBackend):
    with make_client(tmp_path, fake, max_n=32) as c:
        yield c


BASE = {"prompt": "The film", "max_tokens": 24, "seed": 11, "return_candidates": True}


def plain_rewards(client: TestClient, n: int) -> list[float]:
    body = client.post("/v1/bon", json={**BASE, "n": n}).json()
    by_index = sorted(body["candidates"], key=lambda c: c["index"])
    return [c["reward"] for c in by_index]


def test_early_exit_stops_at_the_first_wave_holding_a_candidate_over_the_target(
    client: TestClient,
) -> None:
    plain = plain_rewards(client, 16)
    waves = [plain[i : i + 4] for i in range(0, 16, 4)]
    # A target the first wave misses and a later wave reaches.
    k = next(k for k in range(1, 4) if max(waves[k]) > max(waves[0]))
    target = max(waves[k])
    r = client.post("/v1/bon", json={**BASE, "n": 16, "wave": 4, "stop_at_reward": target})
    assert r.status_code == 200, r.text
    body = r.json()
    first = next(j for j in range(4) if max(waves[j]) >= target)
    ad = body["adaptive"]
    assert ad["stop_reason"] == "target_reached" and ad["waves"] == first + 1
    assert ad["samples"] == 4 * (first + 1) == len(body["candidates"])
    # Candidate i is plain BoN's candidate i (seed + i): same reward, and the answer is the
    # best of the waves drawn.
    for c in body["candidates"]:
        assert c["reward"] == plain[c["index"]] and c["seed"] == 11 + c["index"]
        assert c["stopped"] == "finished" and c["wave"] == c["index"] // 4
    assert body["reward"] == max(plain[: 4 * (first + 1)])
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in body["candidates"])
    assert "kl_bound" not in body
    # Never reached: all N drawn.
    r = client.post("/v1/bon", json={**BASE, "n": 8, "wave": 4, "stop_at_reward": 1.0}).json()
    assert r["adaptive"]["stop_reason"] == "n_exhausted" and r["adaptive"]["samples"] == 8


def test_pruning_keeps_the_best_prefixes_and_returns_the_best_survivor(
    client: TestClient, fake: FakeBackend
) -> None:
    req = {**BASE, "n": 8, "prune": {"at_tokens": [4, 8], "keep": 0.5}}
    body = client.post("/v1/bon", json=req).json()
    cands = {c["index"]: c for c in body["candidates"]}
    assert len(cands) == 8
    for cp in (4, 8):
        part = [c for c in cands.values()
                if any(p["tokens"] == cp for p in c["partial_rewards"])]
        at = {c["index"]: next(p["reward"] for p in c["partial_rewards"] if p["tokens"] == cp)
              for c in part}
        cut = [i for i, c in cands.items() if c["stopped"] == "pruned"
               and c["partial_rewards"][-1]["tokens"] == cp]
        kept = [i for i in at if i not in cut]
        if len(part) >= 2:
            assert len(kept) == -(-len(part) // 2)
            assert min(at[i] for i in kept) >= max(at[i] for i in cut)
        for i in cut:  # a pruned candidate shows the prefix it was judged on
            assert len(cands[i]["text"].split()) == cp and cands[i]["reward"] == at[i]
    finished = [c for c in cands.values() if c["stopped"] == "finished"]
    assert body["reward"] == max(c["reward"] for c in finished) and body["index"] in {
        c["index"] for c in finished
    }
    assert body["adaptive"]["pruned"] == sum(c["stopped"] == "pruned" for c in cands.values())
    assert body["adaptive"]["pruned"] > 0
    # Ranks: finished first by reward, then the pruned.
    ranked = sorted(cands.values(), key=lambda c: c["rank"])
    assert [c["stopped"] for c in ranked] == sorted(c["stopped"] for c in ranked)
    assert fake.running == set()
    assert client.app.state.gateway.budget.in_flight == 0  # type: ignore[attr-defined]
    # Same seed, same decisions.
    again = client.post("/v1/bon", json=req).json()
    assert again["candidates"] == body["candidates"] and again["text"] == body["text"]


def test_adaptive_default_and_the_openai_models(client: TestClient) -> None:
    d = DEFAULT_ADAPTIVE
    assert d.prune is not None
    r = client.post("/v1/bon", json={**BASE, "n": 8, "adaptive": True,
                                     "max_tokens": d.prune.at_tokens[-1] + 8})
    ad = r.json()["adaptive"]
    assert ad["wave_size"] == d.wave and ad["target"] == d.stop_at_reward
    assert ad["prune"]["at_tokens"] == d.prune.at_tokens
    models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert models["bon-16-adaptive"]["kind"] == "bon-adaptive"
    assert models["bon-32-adaptive"]["n"] == 32
    r = client.post("/v1/completions",
                    json={"model": "bon-16-adaptive", "prompt": "The film", "max_tokens": 60,
                          "seed": 11})
    assert r.status_code == 200, r.text
    bon = r.json()["bon"]
    assert bon["n"] == 16 and bon["adaptive"]["samples"] <= 16 and "kl_bound" not in bon
    direct = client.post("/v1/bon", json={"prompt": "The film", "max_tokens": 60, "seed": 11,
                                          "n": 16, "adaptive": True}).json()
    assert r.json()["choices"][0]["text"] == direct["text"]
    assert r.json()["usage"] == direct["usage"]
    for body, param in (
        ({"model": "bon-16-adaptive", "n": 2}, "n"),
        ({"model": "bon-16-adaptive", "best_of": 8}, "best_of"),
        ({"model": "bon-16-adaptive", "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"model": "bon-4", "presence_penalty": 0.5}, "presence_penalty"),
    ):
        r = client.post("/v1/chat/completions",
                        json={**body, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prune": {"at_tokens": [4], "keep": 1.0}}, "prune.keep"),
        ({"prune": {"at_tokens": [4], "keep": 0}}, "prune.keep"),
        ({"prune": {"at_tokens": [8, 4], "keep": 0.5}}, "prune"),
        ({"prune": {"at_tokens": [], "keep": 0.5}}, "prune.at_tokens"),
        ({"prune": {"at_tokens": [24], "keep": 0.5}}, "prune.at_tokens"),
        ({"prune": {"at_tokens": [4], "keep": 0.5, "x": 1}}, "prune.x"),
        ({"stop_at_reward": 1.01}, "stop_at_reward"),
        ({"stop_at_reward": "high"}, "stop_at_reward"),
        ({"stop_at_quantile": 1.0}, "stop_at_quantile"),
        ({"stop_at_quantile": 0.9}, "stop_at_quantile"),  # no reference configured
        ({"wave": 9, "stop_at_reward": 0.5}, "wave"),
        ({"wave": 0, "stop_at_reward": 0.5}, "wave"),
        ({"wave": 2}, "wave"),
        ({"n": 1, "stop_at_reward": 0.5}, "stop_at_reward"),
        ({"n": 1, "adaptive": True}, "adaptive"),
    ],
)
def test_bad_adaptive_input_is_a_400_naming_the_field(
    client: TestClient, extra: dict, param: str
) -> None:
    r = client.post("/v1/bon", json={"prompt": "The film", "max_tokens": 24, "n": 8, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert param.split(".")[-1] in err["message"]


def test_quantile_target_through_the_api(tmp_path: Path) -> None:
    ref = tmp_path / "ref.jsonl"
    ref.write_text(json.dumps({"prompt": "x", "rewards": [-0.5, 0.0, 0.5, 1.0]}) + "\n")
    with make_client(tmp_path, FakeBackend(), reward_reference=ref) as c:
        r = c.post("/v1/bon", json={**BASE, "n": 8, "stop_at_quantile": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["adaptive"]["target"] == pytest.approx(0.25)


# -- admission and cancellation --------------------------------------------------------------
def test_later_waves_wait_for_room_instead_of_failing() -> None:
    async def go() -> list[str]:
        budget = SampleBudget(4)
        budget.take(4)
        events: list[str] = []

        async def later_wave() -> None:
            await budget.take_when_free(2)
            events.append("admitted")

        task = asyncio.create_task(later_wave())
        await asyncio.sleep(0.01)
        events.append("waiting")
        budget.release(2)
        await asyncio.wait_for(task, 1)
        assert budget.in_flight == 4
        with pytest.raises(APIError) as e:
            budget.take(1)
        assert e.value.status == 429
        return events

    assert asyncio.run(go()) == ["waiting", "admitted"]


def test_a_cancelled_request_aborts_every_candidate_and_returns_its_budget(
    tmp_path: Path,
) -> None:
    fake = FakeBackend(delay_s=2.0)
    with make_client(tmp_path, fake) as c:
        gateway = c.app.state.gateway  # type: ignore[attr-defined]
        req = BoNRequest(prompt="The film", n=8, max_tokens=40, seed=3,
                         prune={"at_tokens": [30], "keep": 0.5})

        async def go() -> tuple[int, int]:
            task = asyncio.create_task(gateway.bon(req))
            await asyncio.sleep(0.3)
            live = len(fake.running)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return live, gateway.budget.in_flight

        live, in_flight = c.portal.call(go)  # type: ignore[attr-defined]
        assert live == 8 and in_flight == 0 and fake.running == set()


def test_the_benchmarks_replay_decides_as_the_gateway(client: TestClient) -> None:
    """clients.adaptive_bench chooses the default setting by replaying settings offline on
    plain BoN's candidates; the replay must take the gateway's decisions."""
    from clients.adaptive_bench import Cand, Setting, replay
    from vbon.rewards import load_reward

    vader = load_reward("vader")
    for seed in (1, 2, 3):
        plain = client.post("/v1/bon", json={**BASE, "seed": seed, "n": 16}).json()
        by_index = sorted(plain["candidates"], key=lambda c: c["index"])
        cands = []
        for c in by_index:
            words = c["text"].split(" ")
            prefix = {cp: vader.score(["x"], [" ".join(words[:cp])])[0] for cp in (4, 8)}
            cands.append(Cand(c["text"], c["reward"], c["tokens"], prefix))
        for name in ("n16:w4:t0.6", "n16:p4,8:k0.5", "n16:w4:t0.9:p4:k0.5", "n8:w2:t0.95"):
            s = Setting.parse(name)
            live = client.post("/v1/bon", json={**BASE, "seed": seed, "n": s.n,
                                                **s.fields()}).json()
            reward, tokens = replay(cands, s, Setting("default", wave=4))
            assert reward == live["reward"], (seed, name)
            if not s.at_tokens:  # nothing aborted: the tokens agree too
                assert tokens == live["usage"]["completion_tokens"], (seed, name)


def test_benchmark_settings_parse_and_bad_ones_say_the_format() -> None:
    from clients.adaptive_bench import Setting, parse_settings, spearman

    got = parse_settings("default;n16:w4:t0.9:p32:k0.5,n8:p16,32:k0.25")
    assert [s.name for s in got] == ["default", "n16:w4:t0.9:p32:k0.5", "n8:p16,32:k0.25"]
    assert got[1].fields() == {"wave": 4, "stop_at_reward": 0.9,
                               "prune": {"at_tokens": [32], "keep": 0.5}}
    assert got[2] == Setting("n8:p16,32:k0.25", 8, None, None, (16, 32), 0.25)
    assert got[0].fields() == {"adaptive": True}
    with pytest.raises(ValueError, match="n<N>:w<wave>"):
        Setting.parse("wave=4")
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 1], [2, 3]) is None
