"""Remote mode on a real `vllm serve` (the scale-out path): the gateway process
(`python -m server`, VBON_BACKEND=remote) sends generation to a real vLLM OpenAI-compatible
server on the embedded model, plus one replica that is dead from the start; vBoN uses a real
peft adapter loaded at runtime; at the end the live replica is killed and the gateway must
answer 503 naming the upstreams, and say so in /ready.

One real upstream keeps this inside the CPU budget of a 2-core machine; the dead address plays
the second replica (connection refused), which is what a crashed replica looks like."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from clients.launch import free_port
from tests.adapters_util import make_peft_adapter
from tests.server_proc import ServerProcess, VllmServeProcess
from vbon.prompts import task_messages
from vbon.rewards import load_reward

pytestmark = pytest.mark.engine
MSGS = task_messages("The film was")
VLLM_START_TIMEOUT_S = 300


class VLLMServe(VllmServeProcess):
    """`vllm serve` on the embedded model with LoRA enabled and runtime adapter loading."""

    def __init__(self, model: Path, log_path: Path, port: int | None = None) -> None:
        args = [
            "--model", str(model),
            "--enforce-eager", "--max-model-len", "1024", "--dtype", "bfloat16",
            "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
            "--generation-config", "vllm", "--seed", "0",
        ]  # fmt: skip
        super().__init__(
            args,
            log_path,
            port=port,
            env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
            prefix=("nice", "-n", "10"),
            timeout_s=VLLM_START_TIMEOUT_S,
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, embedded_model: Path):
    tmp = tmp_path_factory.mktemp("remote")
    adapters = tmp / "adapters"
    make_peft_adapter(embedded_model, adapters / "vbon-n8", n=8, seed=0)
    upstream = VLLMServe(embedded_model, tmp / "vllm.log")
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = None
    try:
        gateway = ServerProcess(
            {
                "VBON_BACKEND": "remote",
                # The dead replica first: round robin must skip it, never fail a request on it.
                "VBON_UPSTREAMS": f"{dead},{upstream.url}",
                "VBON_MODEL": str(embedded_model),
                "VBON_ADAPTERS_DIR": str(adapters),
                "VBON_ADAPTER_POLL_S": "1",
                "VBON_UPSTREAM_HEALTH_INTERVAL_S": "1",
                "VBON_UPSTREAM_CONNECT_TIMEOUT_S": "1",
            },
            tmp / "gateway.log",
            timeout_s=120,
        )
        gateway.upstream = upstream  # type: ignore[attr-defined]
        gateway.dead = dead  # type: ignore[attr-defined]
        gateway.adapters = adapters  # type: ignore[attr-defined]
        gateway.embedded = embedded_model  # type: ignore[attr-defined]
        yield gateway
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()


def post(gw: ServerProcess, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(gw.url + path, json=body, timeout=timeout)


def test_ready_names_the_model_and_the_adapter(stack: ServerProcess) -> None:
    body = httpx.get(stack.url + "/ready").json()
    assert body["ready"], body
    assert body["engine"]["model"] == "smollm2-135m-instruct"
    assert [a["name"] for a in body["adapters"]] == ["vbon-n8"]
    # The adapter was loaded into the live upstream at install time, under its version name.
    served = httpx.get(stack.upstream.url + "/v1/models").json()["data"]
    assert "vbon-n8@v1" in {m["id"] for m in served}


def test_bon_through_remote_upstreams_with_one_dead_replica(stack: ServerProcess) -> None:
    req = {"messages": MSGS, "n": 4, "seed": 7, "return_candidates": True, "max_tokens": 16}
    # Several requests: the load spreading rotates its starting upstream, and the dead replica
    # must never turn one of them into an error.
    bodies = []
    for _ in range(3):
        r = post(stack, "/v1/bon", req)
        assert r.status_code == 200, r.text
        bodies.append(r.json())
    body = bodies[-1]
    cands = body["candidates"]
    assert len(cands) == 4 and sorted(c["seed"] for c in cands) == [7, 8, 9, 10]
    rescored = load_reward("vader").score(["x"] * 4, [c["text"] for c in cands])
    assert [c["reward"] for c in cands] == pytest.approx(rescored)
    assert body["reward"] == pytest.approx(max(rescored))
    assert all(0 < c["tokens"] <= 16 and c["cumulative_logprob"] < 0 for c in cands)
    assert body["usage"]["completion_tokens"] == sum(c["tokens"] for c in cands)
    assert body["usage"]["prompt_tokens"] > 10
    # Same seed, same answer for a single sample. (Across n>1 requests the upstream's
    # continuous batching may schedule the n sequences in different steps, and bf16 rounding
    # then depends on the batch: seen here diverging after ~6 tokens.)
    one = {**req, "n": 1, "seed": 9}
    assert post(stack, "/v1/bon", one).json()["text"] == post(stack, "/v1/bon", one).json()["text"]


def test_vbon_uses_the_runtime_loaded_adapter(stack: ServerProcess) -> None:
    greedy = {"messages": MSGS, "temperature": 0, "max_tokens": 16}
    r = post(stack, "/v1/vbon", {**greedy, "adapter": "vbon-n8", "score": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"]["name"] == "vbon-n8" and body["text"]
    assert body["usage"]["completion_tokens"] > 0 and body["reward"] is not None
    # The (random, non-zero) LoRA changes the greedy continuation: the adapter is really applied.
    base = post(stack, "/v1/chat/completions", {**greedy, "model": "smollm2-135m-instruct"})
    assert base.status_code == 200, base.text
    assert base.json()["choices"][0]["message"]["content"] != body["text"]


def test_streaming_and_hot_reloaded_adapter(stack: ServerProcess) -> None:
    with httpx.stream(
        "POST",
        stack.url + "/v1/completions",
        json={"model": "smollm2-135m-instruct", "prompt": "The film was", "max_tokens": 12,
              "stream": True},
        timeout=120,
    ) as r:  # fmt: skip
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2
    assert '"error"' not in "".join(lines)
    # A newly published adapter is served without a restart (trainer -> volume -> gateway).
    new = stack.tmp_adapter = stack.adapters / "vbon-n4"  # type: ignore[attr-defined]
    staging = stack.adapters.parent / "staging-vbon-n4"
    make_peft_adapter(stack.embedded, staging, n=4, seed=1)
    shutil.move(staging, new)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        names = [a["name"] for a in httpx.get(stack.url + "/ready").json()["adapters"]]
        if "vbon-n4" in names:
            break
        time.sleep(0.5)
    r = post(stack, "/v1/vbon", {"messages": MSGS, "n": 4, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"]["name"] == "vbon-n4"


def test_killed_replica_gives_503_naming_the_upstreams(stack: ServerProcess) -> None:
    stack.upstream.stop()
    r = post(stack, "/v1/bon", {"messages": MSGS, "n": 2, "max_tokens": 8})
    assert r.status_code == 503, r.text
    msg = r.json()["error"]["message"]
    assert stack.upstream.url in msg and stack.dead in msg
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ready = httpx.get(stack.url + "/ready")
        if ready.status_code == 503:
            break
        time.sleep(0.5)
    assert ready.status_code == 503
    assert stack.upstream.url in ready.text
    assert httpx.get(stack.url + "/health").status_code == 200
