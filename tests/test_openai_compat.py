"""Clients written for `vllm serve` work unchanged (fake engine; the same paths run on the real
engine with vLLM's own bench client in tests/test_server_engine.py): vLLM's sampling extensions
pass through or get a 400 naming them, streams honour stream_options, best-of models stream
their winner, and chat content may come as OpenAI content parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.adapters_util import make_fake_adapter
from tests.fakes import FakeBackend
from tests.test_server_api import make_client
from vbon.sampling import Sampling

MSGS = [{"role": "user", "content": "Review"}]


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def client(tmp_path: Path, fake: FakeBackend):
    make_fake_adapter(tmp_path / "adapters" / "vbon-n8", n=8)
    with make_client(tmp_path, fake) as c:
        yield c


def events(client: TestClient, route: str, body: dict) -> list[dict]:
    with client.stream("POST", route, json=body) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_vllm_sampling_extensions_reach_the_engine(client: TestClient, fake: FakeBackend) -> None:
    body = {
        "model": "fake-model", "prompt": "The film", "max_tokens": 8, "top_k": -1,
        "repetition_penalty": 1.3, "min_p": 0.05, "presence_penalty": 0.5,
        "frequency_penalty": -0.5, "min_tokens": 2, "ignore_eos": True,
        "include_stop_str_in_output": True, "skip_special_tokens": False,
        "spaces_between_special_tokens": False, "request_id": "abc", "cache_salt": "s",
        # Unserved extensions at their neutral values are accepted (clients send them).
        "use_beam_search": False, "length_penalty": 1.0, "logit_bias": {}, "priority": 0,
        "response_format": {"type": "text"}, "stop_token_ids": [],
    }
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert fake.calls[-1]["sampling"] == Sampling(
        max_tokens=8, top_k=0, repetition_penalty=1.3, min_p=0.05, presence_penalty=0.5,
        frequency_penalty=-0.5, min_tokens=2, ignore_eos=True, include_stop_str_in_output=True,
        skip_special_tokens=False, spaces_between_special_tokens=False,
    )
    r = client.post("/v1/chat/completions", json={"model": "vbon-8", "messages": MSGS,
                                                  "repetition_penalty": 1.1})
    assert r.status_code == 200 and fake.calls[-1]["sampling"].repetition_penalty == 1.1
    assert fake.calls[-1]["lora"] is not None


def test_extensions_are_neutral_in_what_samples_record() -> None:
    # Run identities and adapter metadata written before the extensions existed keep meaning.
    assert set(Sampling().to_dict()) == {"max_tokens", "temperature", "top_p", "top_k", "seed",
                                         "stop"}
    assert Sampling(ignore_eos=True).to_dict()["ignore_eos"] is True
    assert Sampling(min_p=0.1, ignore_eos=True).reshaping() == ["min_p"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_tokens": 9, "max_tokens": 8}, "min_tokens"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"guided_json": {"type": "object"}}, "guided_json"),
        ({"stop_token_ids": [2]}, "stop_token_ids"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ({"stream": True, "prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(
    client: TestClient, extra: dict, param: str
) -> None:
    r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "a", **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param or f"'{param}'" in err["message"], err


@pytest.mark.parametrize("model", ["bon-4", "bon", "bon-8-adaptive"])
def test_best_of_refuses_a_reshaped_distribution(client: TestClient, model: str) -> None:
    for name, value in (("repetition_penalty", 1.2), ("min_p", 0.1), ("frequency_penalty", 1)):
        r = client.post("/v1/chat/completions",
                        json={"model": model, "messages": MSGS, name: value, "max_tokens": 24})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == name and "best-of-N" in err["message"]
    # Neutral values and the end-of-sample controls are fine: vLLM's bench sends them.
    r = client.post("/v1/chat/completions", json={
        "model": model, "messages": MSGS, "repetition_penalty": 1.0, "ignore_eos": True,
        "min_tokens": 1, "max_tokens": 24})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(("route", "chat"), [("/v1/completions", False),
                                             ("/v1/chat/completions", True)])
def test_include_usage_ends_the_stream_with_the_usage(
    client: TestClient, route: str, chat: bool
) -> None:
    body = {"model": "fake-model", "max_tokens": 12, "seed": 3, "stream": True}
    body.update({"messages": MSGS} if chat else {"prompt": "The film"})
    plain = events(client, route, body)
    assert all("usage" not in e for e in plain)  # not asked: as before
    chunks = events(client, route, {**body, "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert last["choices"] == [] and all(e["usage"] is None for e in content)
    full = client.post(route, json={**body, "stream": False}).json()
    assert last["usage"] == full["usage"]  # the same seed: the same sample, the same count
    text = "".join(
        (e["choices"][0]["delta"].get("content") or "") if chat else e["choices"][0]["text"]
        for e in content
    )
    assert text == (full["choices"][0]["message"]["content"] if chat
                    else full["choices"][0]["text"])
    # vLLM's continuous_usage_stats: the usage so far on every chunk, growing to the total.
    cont = events(client, route, {**body, "stream_options": {"include_usage": True,
                                                             "continuous_usage_stats": True}})
    seen = [e["usage"]["completion_tokens"] for e in cont]
    assert seen == sorted(seen) and seen[-1] == full["usage"]["completion_tokens"]


def test_vbon_stream_include_usage(client: TestClient) -> None:
    body = {"prompt": "The film", "max_tokens": 12, "seed": 3, "stream": True}
    chunks = events(client, "/v1/vbon", {**body, "stream_options": {"include_usage": True}})
    full = client.post("/v1/vbon", json={**body, "stream": False}).json()
    assert chunks[-1]["usage"] == full["usage"]
    assert all("usage" not in c for c in chunks[:-1])
    assert all("usage" not in c for c in events(client, "/v1/vbon", body))
    every = events(client, "/v1/vbon", {**body, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    seen = [c["usage"]["completion_tokens"] for c in every]
    assert seen == sorted(seen) and every[-1]["usage"] == full["usage"]


@pytest.mark.parametrize("model", ["bon-4", "bon-8-adaptive"])
@pytest.mark.parametrize("chat", [False, True])
def test_best_of_streams_its_winner(client: TestClient, model: str, chat: bool) -> None:
    route = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": model, "max_tokens": 24, "seed": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": MSGS} if chat else {"prompt": "The film"})
    *content, last = events(client, route, body)
    full = client.post(route, json={**body, "stream": False, "stream_options": None}).json()
    assert last["usage"] == full["usage"] and last["choices"] == []
    (chunk,) = content
    choice, want = chunk["choices"][0], full["choices"][0]
    got = choice["delta"]["content"] if chat else choice["text"]
    assert got == (want["message"]["content"] if chat else want["text"])
    assert choice["reward"] == want["reward"] and chunk["bon"] == full["bon"]
    assert choice["finish_reason"] == want["finish_reason"]


def test_best_of_stream_is_shed_before_its_200(tmp_path: Path) -> None:
    with make_client(tmp_path, max_samples_in_flight=2) as c:
        r = c.post("/v1/completions", json={"model": "bon-4", "prompt": "a", "stream": True})
    assert r.status_code == 429 and r.headers["Retry-After"]


def test_chat_content_parts_are_joined(client: TestClient, fake: FakeBackend) -> None:
    parts = [{"type": "text", "text": "Rev"}, {"type": "text", "text": "iew"}]
    r = client.post("/v1/chat/completions",
                    json={"model": "fake-model", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text
    prompt = fake.calls[-1]["prompt"]
    client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS})
    assert fake.calls[-1]["prompt"] == prompt
    r = client.post("/v1/chat/completions", json={
        "model": "fake-model",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]})
    assert r.status_code == 400 and "content" in r.json()["error"]["message"]
