"""Sampling parameters fuzzed against the real engine: our validation must be the engine's.

tests/reliability/test_fuzz.py fuzzes the HTTP layer on the fake engine; this one sends
hypothesis-made requests (every route, streamed and not; values inside, on and past the
bounds, prompts and stop strings with special tokens and control characters) to the real
gateway on the real vLLM engine. Each answer must be a 200 (a stream without an error event) or
a 4xx naming the field, and none of the 400s may come from the engine: a value the engine
refuses must be refused by our validation first, with the allowed range in the message.
VBON_FUZZ_ENGINE_EXAMPLES sets the number of requests (make test: 40, make reliability: 300)."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server_proc import ServerProcess

pytestmark = pytest.mark.engine
EXAMPLES = int(os.environ.get("VBON_FUZZ_ENGINE_EXAMPLES", "40"))
SEEN: Counter[str] = Counter()
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x00", "\u200b", "\ud7ff", "é", "\n"]

text = st.text(st.characters(codec="utf-8"), max_size=12) | st.sampled_from(SPECIAL)
# Most requests should reach the engine: a prompt of real words plus odd text, and each
# parameter in range seven times out of eight, else a value on or past a bound.
prompt_text = st.lists(text, max_size=3).map(lambda parts: "The film was" + "".join(parts))


def mostly(valid: st.SearchStrategy, edges: list[Any]) -> st.SearchStrategy:
    # (one_of would draw the edges half of the time: hypothesis favours small branches.)
    return st.integers(0, 7).flatmap(lambda i: st.sampled_from(edges) if i == 5 else valid)


temperature = mostly(st.floats(0, 2), [1e-320, 1e-6, 2.0000001, -0.0, -1.0, 3.0])
top_p = mostly(st.floats(0, 1, exclude_min=True), [1e-300, 0.0, 1.0000001, -0.1])
top_k = mostly(st.integers(0, 60_000), [-1, 49152, 49153, 10**9, -2])
seed = mostly(st.integers(0, 2**31 - 1), [2**31 - 1, 2**31, 2**63, -1])
stop = st.none() | text | st.lists(text, max_size=5)
max_tokens = mostly(st.integers(1, 8), [0, -1, 9])
# vLLM's sampling extensions (the OpenAI routes take them as `vllm serve` does).
EXTENSIONS = {
    "repetition_penalty": mostly(st.floats(0.5, 2), [1.0, 0.0, -1.0, 1e-300, 100.0]),
    "min_p": mostly(st.floats(0, 1), [0.0, 1.0, 1.0000001, -0.1]),
    "presence_penalty": mostly(st.floats(-2, 2), [2.0, -2.0000001, 2.1]),
    "frequency_penalty": mostly(st.floats(-2, 2), [-2.0, 2.0000001]),
    "min_tokens": mostly(st.integers(0, 8), [9, -1, 10**6]),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(0, 49151), max_size=2),  # (refused unless empty)
    "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
}


@st.composite
def requests(draw: Any) -> tuple[str, dict[str, Any]]:
    route = draw(
        st.sampled_from(["/v1/bon", "/v1/vbon", "/v1/completions", "/v1/chat/completions"])
    )
    body: dict[str, Any] = {}
    for name, strategy in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("seed", seed),
        ("stop", stop),
    ):
        if draw(st.booleans()):
            body[name] = draw(strategy)
    body["max_tokens"] = draw(max_tokens)  # (the default, 32, is over this server's limit)
    if route in ("/v1/chat/completions",) or (route != "/v1/completions" and draw(st.booleans())):
        role = st.sampled_from(["user", "system", "assistant"])
        body["messages"] = draw(
            st.lists(
                st.fixed_dictionaries({"role": role, "content": prompt_text}),
                min_size=1,
                max_size=3,
            )
        )
    else:
        body["prompt"] = draw(prompt_text)
    if route == "/v1/bon":
        body["n"] = draw(mostly(st.integers(1, 4), [0, 5]))
    elif route == "/v1/vbon":
        body["stream"] = draw(st.booleans())
    else:
        body["model"] = draw(st.sampled_from(["smollm2-135m-instruct", "bon-2", "vbon-8"]))
        body["stream"] = draw(st.booleans())
        for name, strategy in EXTENSIONS.items():
            if draw(st.integers(0, 3)) == 0:
                body[name] = draw(strategy)
    return route, body


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, embedded_model: Path, figures
) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("fuzz-engine")
    proc = ServerProcess(
        {
            "VBON_SHIPPED_ADAPTERS": "true",  # vbon-8 to fuzz the LoRA path too
            "VBON_ADAPTERS_DIR": str(tmp / "adapters"),
            "VBON_ADAPTER_POLL_S": "0",
            "VBON_MAX_N": "4",
            "VBON_MAX_TOKENS_LIMIT": "8",  # short samples: many requests in little time
            "VBON_MAX_PROMPT_TOKENS": "64",
            "VBON_MODELS_DIR": str(embedded_model.parent),
        },
        tmp / "server.log",
    )
    try:
        yield proc.url
    finally:
        proc.stop()
    if SEEN["calls"]:
        figures.add(
            "fuzz: sampling parameters on the real engine",
            inputs=SEEN["calls"],
            **{"5xx": SEEN["5xx"]},
            note=f"{SEEN['2xx']} answered 2xx, {SEEN['4xx']} 4xx naming the field, "
            f"{SEEN['engine_refused']} refused by the engine instead of by us",
        )


def check(url: str, route: str, body: dict[str, Any]) -> None:
    if body.get("stream"):
        with httpx.stream("POST", url + route, json=body, timeout=120) as r:
            raw = r.read().decode()
    else:
        r = httpx.post(url + route, json=body, timeout=120)
        raw = r.text
    SEEN["calls"] += 1
    SEEN["5xx"] += r.status_code >= 500
    assert r.status_code < 500, (route, body, r.status_code, raw[:500])
    if r.status_code == 200:
        SEEN["2xx"] += 1
        if body.get("stream"):
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]", raw[-300:]
            assert all("error" not in json.loads(e) for e in events[:-1]), (body, raw[:500])
        return
    SEEN["4xx"] += 1
    assert r.status_code in (400, 404, 422), (route, body, r.status_code, raw[:500])
    error = r.json()["error"]
    # Which field and what is allowed: the param, or for cross-field rules, the message.
    assert error["param"] or any(
        f"'{k}'" in error["message"] or k in error["message"] for k in (*body, "prompt", "messages")
    ), (body, error)
    if error["message"].startswith("the engine refused"):
        SEEN["engine_refused"] += 1
        pytest.fail(f"the engine refused what our validation let through: {body} -> {error}")


@given(req=requests())
@settings(
    max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_sampling_parameters_are_validated_as_the_engine_does(
    gateway: str, req: tuple[str, dict[str, Any]]
) -> None:
    check(gateway, *req)
